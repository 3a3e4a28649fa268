#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for dvmm's tests and benchmarks.
#
#   eval "$(scripts/pg-throwaway.sh start)"   # prints export lines on stdout
#   cargo test -p dvmm-store-postgres
#   scripts/pg-throwaway.sh stop              # uses DVMM_PG_DATADIR
#
# `start` installs the PostgreSQL server with apt when it is missing, runs
# initdb in a fresh temporary directory (as the `postgres` system user when
# run as root, because initdb refuses root), starts the server on a free
# loopback port and prints `export` lines for DATABASE_URL, DVMM_PG_DATADIR,
# DVMM_PG_BIN and DVMM_PG_USER. Everything else goes to stderr so the output
# can be eval'ed. Works without a tty (CI).
set -euo pipefail

PG_MAJOR="${DVMM_PG_MAJOR:-15}"

log() { printf 'pg-throwaway: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

find_bin() {
    local dir
    for dir in "/usr/lib/postgresql/${PG_MAJOR}/bin" /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            printf '%s\n' "$dir"
            return 0
        fi
    done
    local initdb
    if initdb="$(command -v initdb 2>/dev/null)"; then
        dirname "$initdb"
        return 0
    fi
    return 1
}

install_server() {
    [ "$(id -u)" -eq 0 ] || die "PostgreSQL server binaries are missing and installing them needs root"
    command -v apt-get >/dev/null || die "PostgreSQL server binaries are missing and apt-get is not available"
    log "installing the PostgreSQL server with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    # The cluster the package creates is left alone; we run our own.
    apt-get install -y -qq "postgresql-${PG_MAJOR}" >&2 ||
        apt-get install -y -qq postgresql >&2
}

# Prints a free TCP port on 127.0.0.1.
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' && return 0
    fi
    local port
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        # A refused connection means nothing listens there.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    return 1
}

# Runs a command as the cluster's owner.
as_owner() {
    local owner="$1"
    shift
    if [ "$(id -un)" = "$owner" ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$owner" -- "$@"
    else
        su -s /bin/sh "$owner" -c "$(printf '%q ' "$@")"
    fi
}

start() {
    local bin
    if ! bin="$(find_bin)"; then
        install_server
        bin="$(find_bin)" || die "no initdb found after installing PostgreSQL"
    fi

    local owner
    if [ "$(id -u)" -eq 0 ]; then
        owner=postgres
        if ! id "$owner" >/dev/null 2>&1; then
            log "creating system user $owner"
            useradd --system --user-group --home-dir /nonexistent --shell /usr/sbin/nologin "$owner"
        fi
    else
        owner="$(id -un)"
    fi

    local base
    base="$(mktemp -d "${TMPDIR:-/tmp}/dvmm-pg.XXXXXX")"
    chmod 0755 "$base"
    local datadir="$base/data" sockdir="$base/socket"
    mkdir -p "$sockdir"
    chown "$owner" "$base" "$sockdir"

    # A random superuser password keeps the password path (scram) exercised
    # and the cluster closed to other local users.
    local password
    password="$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    local pwfile="$base/pwfile"
    printf '%s\n' "$password" >"$pwfile"
    chown "$owner" "$pwfile"
    chmod 0600 "$pwfile"

    log "initdb in $datadir as $owner"
    as_owner "$owner" "$bin/initdb" -D "$datadir" -U postgres --pwfile="$pwfile" \
        --auth=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >"$base/initdb.log" 2>&1 ||
        as_owner "$owner" "$bin/initdb" -D "$datadir" -U postgres --pwfile="$pwfile" \
            --auth=scram-sha-256 --encoding=UTF8 --no-locale >"$base/initdb.log" 2>&1 ||
        { cat "$base/initdb.log" >&2; die "initdb failed"; }
    rm -f "$pwfile"

    local port attempt
    for attempt in 1 2 3 4 5; do
        port="$(free_port)" || die "no free port found"
        # Settings go into the config file so that `pg_ctl restart` keeps them.
        cat >>"$datadir/postgresql.auto.conf" <<EOF
listen_addresses = '127.0.0.1'
port = ${port}
unix_socket_directories = '${sockdir}'
max_connections = 400
shared_buffers = 256MB
EOF
        if as_owner "$owner" "$bin/pg_ctl" start -D "$datadir" -l "$base/server.log" -w -t 60 >&2; then
            break
        fi
        log "start on port $port failed (attempt $attempt)"
        tail -n 5 "$base/server.log" >&2 || true
        [ "$attempt" -lt 5 ] || die "could not start PostgreSQL"
    done

    # pg_ctl -w already waited; confirm that TCP answers too.
    local ready=0
    for _ in $(seq 1 60); do
        if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
            ready=1
            break
        fi
        sleep 0.5
    done
    [ "$ready" -eq 1 ] || die "PostgreSQL did not become ready on port $port"
    log "$("$bin/postgres" --version) ready on 127.0.0.1:$port (data $datadir)"

    printf 'export DATABASE_URL=%q\n' "postgres://postgres:${password}@127.0.0.1:${port}/postgres"
    printf 'export DVMM_PG_DATADIR=%q\n' "$datadir"
    printf 'export DVMM_PG_BIN=%q\n' "$bin"
    printf 'export DVMM_PG_USER=%q\n' "$owner"
}

stop() {
    local datadir="${DVMM_PG_DATADIR:-}"
    [ -n "$datadir" ] || die "DVMM_PG_DATADIR is not set: nothing to stop"
    case "$(basename "$(dirname "$datadir")")" in
        dvmm-pg.*) ;;
        *) die "refusing to remove $datadir: not a directory made by this script" ;;
    esac
    local bin="${DVMM_PG_BIN:-}"
    [ -n "$bin" ] || bin="$(find_bin)" || die "no pg_ctl found"
    if [ -f "$datadir/PG_VERSION" ]; then
        local owner
        owner="$(stat -c %U "$datadir")"
        as_owner "$owner" "$bin/pg_ctl" stop -D "$datadir" -m fast -w >&2 ||
            log "pg_ctl stop failed (server already down?)"
    fi
    rm -rf "$(dirname "$datadir")"
    log "removed $(dirname "$datadir")"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
