#!/bin/bash
# Builds the podvisor node bundle and, given an image name, the installer image:
#   deploy/image/build.sh [--no-build] [IMAGE]
# The bundle (target/podvisor-bundle/, and target/podvisor-bundle.tar.gz for installs by hand) holds
#   install.sh  bin/podvisor  guest/{vmlinux,initramfs.cpio,podvisor-agent}  systemd/podvisor.service
#   cni/10-podvisor.conflist  config.toml
# --no-build packages the existing target/release/podvisor and target/guest/ files. The image is built
# with $CONTAINER_TOOL (default docker; podman works) from deploy/image/Containerfile.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "${1:-}" = --no-build ]; then
  shift
else
  cargo build --release -p cri-server >&2
  guest/build.sh >/dev/null
fi
OUT=$TARGET/podvisor-bundle
rm -rf "$OUT"
install -D -m 0755 deploy/install.sh "$OUT/install.sh"
install -D -m 0755 "$TARGET/release/podvisor" "$OUT/bin/podvisor"
install -D -m 0644 "$TARGET/guest/vmlinux" "$OUT/guest/vmlinux"
install -D -m 0644 "$TARGET/guest/initramfs.cpio" "$OUT/guest/initramfs.cpio"
install -D -m 0755 "$TARGET/guest/podvisor-agent" "$OUT/guest/podvisor-agent"
install -D -m 0644 deploy/systemd/podvisor.service "$OUT/systemd/podvisor.service"
install -D -m 0644 deploy/cni/10-podvisor.conflist "$OUT/cni/10-podvisor.conflist"
install -D -m 0644 deploy/config.toml "$OUT/config.toml"
tar -C "$OUT" -czf "$TARGET/podvisor-bundle.tar.gz" .
echo "bundle: $OUT ($TARGET/podvisor-bundle.tar.gz)" >&2
if [ -n "${1:-}" ]; then
  "${CONTAINER_TOOL:-docker}" build -f deploy/image/Containerfile -t "$1" "$OUT"
fi
