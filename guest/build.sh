#!/bin/bash
# Build the guest artifacts the VMM boots:
#   target/guest/initramfs.cpio  uncompressed newc: /dev/{console,null}, base dirs, the static agent as /init
#   target/guest/vmlinux         the guest kernel (guest/kernel/build.sh, cached under ~/.cache/podvisor/kernel)
#   target/guest/podvisor-agent  the same static agent, which native pods run on the node
#
#   guest/build.sh [--extra SRC:DST]...   extra files are added to the initramfs (podvisor-initramfs --extra)
#
# Prints the two paths on stdout (initramfs first, then kernel); progress goes to stderr. Idempotent: cargo and
# the kernel cache skip work already done, and outputs are only replaced when their content changes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/guest
TRIPLE=x86_64-unknown-linux-gnu
mkdir -p "$OUT"

# The agent: static, non-PIE (no load-time relocations: ~310 KB smaller than static-pie), size-optimized
# ([profile.agent] in the workspace Cargo.toml). --target keeps the RUSTFLAGS away from host build scripts and
# the other crates' artifacts. libseccomp (libcontainer's seccomp) is linked statically from libseccomp-dev.
echo "building podvisor-agent (static)" >&2
LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=${LIBSECCOMP_LIB_PATH:-/usr/lib/x86_64-linux-gnu} \
  RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static' \
  cargo build -q -p podvisor-agent --profile agent --target "$TRIPLE" >&2
AGENT=$TARGET_DIR/$TRIPLE/agent/podvisor-agent
if readelf -l "$AGENT" | grep -q "Requesting program interpreter" || readelf -d "$AGENT" | grep -q NEEDED; then
  echo "error: $AGENT is dynamically linked" >&2
  readelf -d "$AGENT" | grep NEEDED >&2 || true
  exit 1
fi

if ! cmp -s "$AGENT" "$OUT/podvisor-agent"; then
  cp -f "$AGENT" "$OUT/podvisor-agent.tmp"
  mv -f "$OUT/podvisor-agent.tmp" "$OUT/podvisor-agent"
fi

echo "building initramfs" >&2
cargo build -q -p podvisor-initramfs >&2
TMP=$OUT/initramfs.cpio.new
trap 'rm -f "$TMP"' EXIT
"$TARGET_DIR/debug/podvisor-initramfs" --agent "$AGENT" --out "$TMP" "$@" >&2
if cmp -s "$TMP" "$OUT/initramfs.cpio"; then
  rm -f "$TMP"
else
  mv -f "$TMP" "$OUT/initramfs.cpio"
fi

echo "building guest kernel (cached)" >&2
KERNEL=$("$ROOT/guest/kernel/build.sh")
if [ ! -s "$KERNEL" ]; then
  echo "error: guest/kernel/build.sh did not produce a kernel (got '$KERNEL')" >&2
  exit 1
fi
if ! cmp -s "$KERNEL" "$OUT/vmlinux"; then
  cp -f "$KERNEL" "$OUT/vmlinux.tmp"
  mv -f "$OUT/vmlinux.tmp" "$OUT/vmlinux"
fi

echo "agent $(stat -c %s "$AGENT") bytes, initramfs $(stat -c %s "$OUT/initramfs.cpio") bytes," \
  "kernel $(stat -c %s "$OUT/vmlinux") bytes" >&2
echo "$OUT/initramfs.cpio"
echo "$OUT/vmlinux"
