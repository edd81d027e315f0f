#!/bin/bash
# The whole podvisor test suite, from a fresh clone: host set-up, guest build (kernel cached under
# ~/.cache/podvisor), format and lint checks, then every unit, integration and VM test.
# VM tests need /dev/kvm: when it exists they are required to run (PODVISOR_REQUIRE_KVM=1);
# when it does not, they print "SKIPPED <test>: <reason>".
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
e2e/setup-host.sh
guest/build.sh >/dev/null
if [ -e /dev/kvm ]; then
  export PODVISOR_REQUIRE_KVM=1
else
  echo "NOTE: /dev/kvm is missing: VM tests will be SKIPPED" >&2
fi
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace -- --nocapture 2>&1
