#!/usr/bin/env bash
# The whole test suite. Builds govmomi's vcsim if it is not built yet, starts a
# throwaway PostgreSQL unless DATABASE_URL names one, runs every test of the
# workspace, and stops what it started. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

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
    eval "$started"
    trap 'bash scripts/pg-throwaway.sh stop >&2 || true' EXIT
  elif [ "${DVMM_REQUIRE_SERVICES:-}" = 1 ]; then
    echo "test.sh: could not start PostgreSQL and DVMM_REQUIRE_SERVICES=1" >&2
    exit 1
  else
    echo "test.sh: could not start PostgreSQL; its tests will skip" >&2
  fi
fi

cargo test --workspace --all-features "$@"
