#!/bin/bash
# Single-node developer install: set up the host, build the guest (kernel cached under ~/.cache/podvisor)
# and the daemon, install the guest files (kernel, initramfs, and the agent native pods run) to /usr/share/podvisor, then run the daemon in the foreground
# with its embedded defaults (socket /run/podvisor/podvisor.sock, state /var/lib/podvisor).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
e2e/setup-host.sh
mapfile -t GUEST < <(guest/build.sh)
install -D -m 0644 "${GUEST[0]}" /usr/share/podvisor/initramfs.cpio
install -D -m 0644 "${GUEST[1]}" /usr/share/podvisor/vmlinux
install -D -m 0755 "$(dirname "${GUEST[0]}")/podvisor-agent" /usr/share/podvisor/podvisor-agent
# Pods need a CNI network: the single-node default (bridge podvisor0, 10.99.0.0/16) unless there is one.
if ! compgen -G "/etc/cni/net.d/*.conflist" >/dev/null && ! compgen -G "/etc/cni/net.d/*.conf" >/dev/null \
  && ! compgen -G "/etc/cni/net.d/*.json" >/dev/null; then
  install -D -m 0644 deploy/cni/10-podvisor.conflist /etc/cni/net.d/10-podvisor.conflist
fi
cargo build --release -p cri-server
exec "$ROOT/target/release/podvisor" "$@"
