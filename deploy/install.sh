#!/bin/bash
# podvisor node installer: puts the daemon, the guest kernel + initramfs, the systemd unit, the config and
# (on a node with no CNI network yet) the default CNI network on a host, and runs podvisor.service.
#
#   install.sh install              install or update; restarts podvisor.service only if a file changed
#                                   (a restart ends every pod VM on the node: drain it first)
#   install.sh uninstall [--purge]  stop and remove; --purge also removes the state (/var/lib/podvisor:
#                                   images, pod records, logs), /etc/podvisor and the CNI IP allocations
#   install.sh status               exit 0 if the unit is active and the socket answers CRI Version
#   install.sh daemonset            for the installer DaemonSet: install, label the node, then idle
#                                   (checking the daemon every minute) until SIGTERM
#
# By hand: as root on the node, from an unpacked bundle (deploy/image/build.sh) or from a repository
# checkout after `cargo build --release -p cri-server` and `guest/build.sh`. In the installer container
# the host's / is mounted at HOST_ROOT and host commands run in PID 1's namespaces through nsenter
# (the pod has hostPID).
#
# Environment:
#   HOST_ROOT               where the host's / is (default /; the DaemonSet sets /host)
#   PODVISOR_CONFIG         config.toml to install, replacing the node's (the DaemonSet's ConfigMap);
#                           unset: the bundled default is written only if the node has none
#   NODE_NAME               label this node podvisor.io/installed=<version> with the pod's service account
#                           (DaemonSet and uninstall Job; by hand it is skipped)
#   PODVISOR_SKIP_CHECK=1   install even if `podvisor check` fails
#   PODVISOR_SERVE_TIMEOUT  seconds to wait for the socket after a (re)start (default 60; 0: no wait)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOST_ROOT=${HOST_ROOT:-/}
HOST_ROOT=${HOST_ROOT%/} # "" when the host is /

# Host paths (the same as the daemon's defaults and deploy/systemd/podvisor.service).
BIN=/usr/local/bin/podvisor
GUEST_DIR=/usr/share/podvisor
UNIT=/etc/systemd/system/podvisor.service
CONFIG_DIR=/etc/podvisor
CONFIG=$CONFIG_DIR/config.toml
CNI_DIR=/etc/cni/net.d
CNI_CONF=$CNI_DIR/10-podvisor.conflist
SOCKET=/run/podvisor/podvisor.sock
RUN_DIR=/run/podvisor
STATE_DIR=/var/lib/podvisor
CNI_IPAM_DIR=/var/lib/cni/networks/podvisor # host-local allocations of the default network
LABEL=podvisor.io/installed

# Sources: a bundle / the installer image (bin/, guest/ beside this script) or a repository checkout.
if [ -e "$HERE/bin/podvisor" ]; then
  SRC_BIN=$HERE/bin/podvisor
  SRC_GUEST=$HERE/guest
else
  TARGET=${CARGO_TARGET_DIR:-$HERE/../target}
  SRC_BIN=$TARGET/release/podvisor
  SRC_GUEST=$TARGET/guest
fi
SRC_UNIT=$HERE/systemd/podvisor.service
SRC_CNI=$HERE/cni/10-podvisor.conflist
SRC_CONFIG=${PODVISOR_CONFIG:-$HERE/config.toml}

log() { echo "podvisor-install: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}
# A host path as this script sees it.
h() { printf '%s%s' "$HOST_ROOT" "$1"; }
# Runs a command on the host (in PID 1's namespaces when this script runs in a container).
host_run() {
  if [ -z "$HOST_ROOT" ]; then
    "$@"
  else
    nsenter -t 1 -m -u -i -n -p -- "$@"
  fi
}

CHANGED=()
# put SRC HOST_PATH MODE: replaces the host file atomically if its content differs.
put() {
  local dst
  dst=$(h "$2")
  if cmp -s "$1" "$dst"; then
    return 0
  fi
  install -D -m "$3" "$1" "$dst.new"
  mv -f "$dst.new" "$dst"
  CHANGED+=("$2")
  log "installed $2"
}

# The CRI RuntimeService/Version call over the socket (HTTP/2 with curl; an empty request message is
# the 5-byte gRPC frame header). Succeeds if the daemon answers with grpc-status 0 as "podvisor".
cri_version() {
  local sock out
  sock=$(h "$SOCKET")
  [ -S "$sock" ] || return 1
  if ! curl --version 2>/dev/null | grep -q HTTP2; then
    return 0 # no HTTP/2 curl here: the socket existing is all we can check
  fi
  out=$(printf '\0\0\0\0\0' | curl -sS --max-time 5 --http2-prior-knowledge --unix-socket "$sock" \
    -X POST -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @- -D - -o - \
    http://localhost/runtime.v1.RuntimeService/Version 2>/dev/null | tr -c '[:print:]\n' ' ') || return 1
  grep -q 'grpc-status: 0' <<<"$out" && grep -q podvisor <<<"$out"
}

installed_version() { host_run "$BIN" --version 2>/dev/null | awk '{print $2}'; }

# Sets (VALUE) or removes (no VALUE) this node's podvisor.io/installed label through the API server.
label_node() {
  local sa=/var/run/secrets/kubernetes.io/serviceaccount value=null host=${KUBERNETES_SERVICE_HOST:-}
  if [ -z "${NODE_NAME:-}" ] || [ ! -r "$sa/token" ] || [ -z "$host" ]; then
    return 0
  fi
  if [ -n "${1:-}" ]; then
    value="\"$1\""
  fi
  case $host in *:*) host="[$host]" ;; esac
  if curl -sS --fail --max-time 10 --cacert "$sa/ca.crt" -H "Authorization: Bearer $(cat "$sa/token")" \
    -H 'Content-Type: application/merge-patch+json' -X PATCH \
    --data "{\"metadata\":{\"labels\":{\"$LABEL\":$value}}}" \
    "https://$host:${KUBERNETES_SERVICE_PORT:-443}/api/v1/nodes/$NODE_NAME" >/dev/null; then
    log "node $NODE_NAME: $LABEL=${1:-(removed)}"
  else
    log "warning: could not label node $NODE_NAME (RBAC of the service account?)"
  fi
}

has_cni_network() {
  compgen -G "$(h "$CNI_DIR")/*.conflist" >/dev/null || compgen -G "$(h "$CNI_DIR")/*.conf" >/dev/null ||
    compgen -G "$(h "$CNI_DIR")/*.json" >/dev/null
}

do_install() {
  [ "$(id -u)" = 0 ] || die "run as root"
  local f
  for f in "$SRC_BIN" "$SRC_GUEST/vmlinux" "$SRC_GUEST/initramfs.cpio" "$SRC_GUEST/podvisor-agent" "$SRC_UNIT" \
    "$SRC_CNI"; do
    [ -s "$f" ] || die "$f is missing (build with: cargo build --release -p cri-server && guest/build.sh)"
  done
  [ -e "$SRC_CONFIG" ] || die "$SRC_CONFIG is missing"
  put "$SRC_BIN" "$BIN" 0755
  put "$SRC_GUEST/vmlinux" "$GUEST_DIR/vmlinux" 0644
  put "$SRC_GUEST/initramfs.cpio" "$GUEST_DIR/initramfs.cpio" 0644
  put "$SRC_GUEST/podvisor-agent" "$GUEST_DIR/podvisor-agent" 0755
  put "$SRC_UNIT" "$UNIT" 0644
  # An explicit config (the ConfigMap) is authoritative; the bundled default never replaces the node's.
  if [ -n "${PODVISOR_CONFIG:-}" ] || [ ! -e "$(h "$CONFIG")" ]; then
    put "$SRC_CONFIG" "$CONFIG" 0644
  fi
  # The default network (bridge podvisor0, 10.99.0.0/16) only where no CNI network is configured (the
  # daemon uses the lexically first file in /etc/cni/net.d); an existing one is never replaced.
  if ! has_cni_network; then
    put "$SRC_CNI" "$CNI_CONF" 0644
  fi
  if [ ! -e "$(h /opt/cni/bin/bridge)" ] && [ ! -e "$(h /usr/lib/cni/bridge)" ]; then
    log "warning: no CNI plugins in /opt/cni/bin or /usr/lib/cni (Debian: apt-get install containernetworking-plugins)"
  fi

  if [ "${PODVISOR_SKIP_CHECK:-0}" != 1 ]; then
    host_run "$BIN" check >&2 ||
      die "podvisor check failed: podvisor.service was not (re)started (fix the host, or PODVISOR_SKIP_CHECK=1)"
  fi

  host_run systemctl daemon-reload
  host_run systemctl enable podvisor.service 2>&1 | sed 's/^/podvisor-install: /' >&2
  if [ ${#CHANGED[@]} -gt 0 ] || ! host_run systemctl is-active --quiet podvisor.service; then
    log "restarting podvisor.service (every pod VM on this node ends)"
    host_run systemctl restart podvisor.service
  else
    log "nothing changed, podvisor.service left running"
  fi

  local timeout=${PODVISOR_SERVE_TIMEOUT:-60} i
  for ((i = 0; i < timeout; i++)); do
    cri_version && break
    sleep 1
  done
  if [ "$timeout" -gt 0 ] && ! cri_version; then
    die "podvisor.service does not answer on $SOCKET after ${timeout}s (journalctl -u podvisor on the node)"
  fi
  log "podvisor $(installed_version) installed"
}

do_uninstall() {
  [ "$(id -u)" = 0 ] || die "run as root"
  local purge=0
  [ "${1:-}" = --purge ] && purge=1
  if [ -e "$(h "$UNIT")" ]; then
    log "stopping podvisor.service (every pod VM on this node ends)"
    host_run systemctl disable --now podvisor.service 2>&1 | sed 's/^/podvisor-install: /' >&2 || true
  fi
  rm -f "$(h "$BIN")" "$(h "$UNIT")" "$(h "$CONFIG")"
  rm -rf "$(h "$GUEST_DIR")" "$(h "$RUN_DIR")"
  # The default network file only if it is still ours, unchanged.
  if cmp -s "$SRC_CNI" "$(h "$CNI_CONF")"; then
    rm -f "$(h "$CNI_CONF")"
  elif [ -e "$(h "$CNI_CONF")" ]; then
    log "kept $CNI_CONF (edited on this node)"
  fi
  if [ "$purge" = 1 ]; then
    rm -rf "$(h "$STATE_DIR")" "$(h "$CONFIG_DIR")" "$(h "$CNI_IPAM_DIR")"
    log "purged $STATE_DIR, $CONFIG_DIR, $CNI_IPAM_DIR"
  else
    rmdir "$(h "$CONFIG_DIR")" 2>/dev/null || true
    if [ -e "$(h "$STATE_DIR")" ]; then
      log "kept $STATE_DIR (images, pod records; remove with --purge)"
    fi
  fi
  host_run systemctl daemon-reload || true
  label_node ""
  log "podvisor uninstalled"
}

do_status() {
  local rc=0 v
  if v=$(installed_version) && [ -n "$v" ]; then
    echo "binary   $BIN: podvisor $v"
  else
    echo "binary   $BIN: missing"
    rc=1
  fi
  echo "unit     podvisor.service: $(host_run systemctl is-active podvisor.service 2>/dev/null || true)" \
    "($(host_run systemctl is-enabled podvisor.service 2>/dev/null || true))"
  host_run systemctl is-active --quiet podvisor.service || rc=1
  if cri_version; then
    echo "socket   $SOCKET: answers CRI Version"
  else
    echo "socket   $SOCKET: not serving"
    rc=1
  fi
  return $rc
}

do_daemonset() {
  do_install
  label_node "$(installed_version)"
  SLEEPER=""
  trap 'log "stopping (podvisor stays installed; see docs/install.md to uninstall)"; kill "$SLEEPER" 2>/dev/null || true; exit 0' TERM INT
  local healthy=1
  while true; do
    sleep 60 &
    SLEEPER=$!
    wait "$SLEEPER" || true
    if do_status >/dev/null; then
      [ $healthy = 1 ] || log "podvisor serves again"
      healthy=1
    else
      [ $healthy = 0 ] || log "podvisor.service is not serving (journalctl -u podvisor on the node)"
      healthy=0
    fi
  done
}

case ${1:-} in
install) do_install ;;
uninstall) do_uninstall "${2:-}" ;;
status) do_status ;;
daemonset) do_daemonset ;;
*)
  echo "usage: $0 install | uninstall [--purge] | status | daemonset" >&2
  exit 2
  ;;
esac
