#!/bin/bash
# The whole podvisor test suite, from a fresh clone: host set-up, guest build (kernel cached under
# ~/.cache/podvisor), format and lint checks, the offline checks of deploy/ (e2e/validate-deploy.sh), then every
# unit, integration and VM test.
# VM tests need /dev/kvm: when it exists they are required to run (PODVISOR_REQUIRE_KVM=1);
# when it does not, they print "SKIPPED <test>: <reason>".
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
e2e/setup-host.sh
# setup-host.sh installed the Python clients: tests that need them must not skip.
export PODVISOR_REQUIRE_PYTHON=1
guest/build.sh >/dev/null
if [ -e /dev/kvm ]; then
  export PODVISOR_REQUIRE_KVM=1
else
  echo "NOTE: /dev/kvm is missing: VM tests will be SKIPPED" >&2
fi
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
e2e/validate-deploy.sh
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
set +e
cargo test --workspace --no-fail-fast -- --nocapture 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole workspace (cargo prints one "test result" line per test binary).
skipped=$(grep -c "^SKIPPED " "$LOG" || true)
awk -v skipped="$skipped" '/^test result:/ {
    for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) }
  } END { printf "total: %d passed, %d failed, %d skipped\n", p, f, skipped }' "$LOG"
exit "$status"
