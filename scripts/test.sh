#!/usr/bin/env bash
# The whole test suite. Builds govmomi's vcsim if it is not built yet, starts a
# throwaway PostgreSQL unless DATABASE_URL names one, runs every test of the
# workspace, and stops what it started. Extra arguments go to `cargo test`.
#
# Tests that skip for want of a service append `<test>: <why>` to the file
# named by DVMM_SKIP_LOG; the summary at the end counts them, so a skipped
# test is not mistaken for a passing one. With DVMM_REQUIRE_SERVICES=1 a
# missing service fails its tests instead.
set -euo pipefail
cd "$(dirname "$0")/.."

skip_log=$(mktemp "${TMPDIR:-/tmp}/dvmm-skips.XXXXXX")
export DVMM_SKIP_LOG="$skip_log"
pg_started=
cleanup() {
  if [ -n "$pg_started" ]; then
    bash scripts/pg-throwaway.sh stop >&2 || true
  fi
  rm -f "$skip_log"
}
trap cleanup EXIT

if [ -z "${VCSIM_BIN:-}" ]; then
  if bash scripts/build-vcsim.sh >&2; then
    export VCSIM_BIN="$PWD/target/vcsim/bin/vcsim"
  elif [ "${DVMM_REQUIRE_SERVICES:-}" = 1 ]; then
    echo "test.sh: could not build vcsim and DVMM_REQUIRE_SERVICES=1" >&2
    exit 1
  else
    echo "test.sh: could not build vcsim; its tests will skip" >&2
  fi
fi

if [ -z "${DATABASE_URL:-}" ]; then
  if started=$(bash scripts/pg-throwaway.sh start); then
    # Exports DATABASE_URL, and DVMM_PG_DATADIR/DVMM_PG_BIN/DVMM_PG_USER,
    # which the restart test needs to stop and start the server.
    eval "$started"
    pg_started=1
  elif [ "${DVMM_REQUIRE_SERVICES:-}" = 1 ]; then
    echo "test.sh: could not start PostgreSQL and DVMM_REQUIRE_SERVICES=1" >&2
    exit 1
  else
    echo "test.sh: could not start PostgreSQL; its tests will skip" >&2
  fi
fi

status=0
# --no-fail-fast: one failing test binary must not hide the others' results.
cargo test --workspace --all-features --no-fail-fast "$@" || status=$?

skipped=$(grep -c '' "$skip_log" || true)
echo "skipped tests: $skipped"
if [ "$skipped" -gt 0 ]; then
  sort "$skip_log" | sed 's/^/  /'
  if [ "${DVMM_REQUIRE_SERVICES:-}" = 1 ]; then
    # Every skip helper fails under this flag; one that logged anyway is a bug.
    echo "test.sh: tests skipped although DVMM_REQUIRE_SERVICES=1" >&2
    [ "$status" -ne 0 ] || status=1
  fi
fi
exit "$status"
