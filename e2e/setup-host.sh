#!/bin/bash
# Installs what podvisor needs on a fresh Debian host (idempotent; apt runs only if something is missing):
# protoc for the gRPC code generators, the guest kernel toolchain, mkfs tools for block images,
# qemu-system-x86 (the peer VMM of the boot benchmark), docker-registry + skopeo + apache2-utils (htpasswd)
# for the image-service registry tests, containerd (the peer of the image pull benchmark; only a private
# instance the bench starts itself is used), containernetworking-plugins + iptables + iproute2 (pod
# networking: bridge, host-local, portmap in /usr/lib/cni), shellcheck (e2e/validate-deploy.sh lints
# deploy/*.sh) and the Rust components the checks use.
set -euo pipefail
PKGS=(protobuf-compiler libseccomp-dev linux-source-6.1 flex bison libelf-dev bc e2fsprogs erofs-utils busybox-static cpio
      qemu-system-x86 ca-certificates docker-registry skopeo apache2-utils containerd shellcheck
      containernetworking-plugins iptables iproute2)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
if command -v rustup >/dev/null; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >&2
  done
fi
# Clients we did not write, for the e2e tests, in a venv: PyPI container-runtime-interface-api (CRI v1),
# the Kubernetes Python client (its WebSocket exec/port-forward client for the streaming server) and
# kubernetes-validate (the upstream JSON schemas of Kubernetes 1.25-1.37, bundled: e2e/validate-deploy.sh
# checks deploy/ offline) and prometheus-client (the Prometheus project's OpenMetrics parser reads the
# daemon's /metrics in the tests).
VENV="${HOME}/.cache/podvisor/venv"
PY_PKGS=(container-runtime-interface-api==2.0.1 kubernetes==37.0.2 websocket-client kubernetes-validate==1.37.0
         prometheus-client==0.26.0)
if ! "$VENV/bin/python" -c "import cri_api.v1.api_pb2_grpc, kubernetes.stream.ws_client, websocket, kubernetes_validate, prometheus_client.openmetrics.parser" \
  2>/dev/null; then
  echo "setup-host: installing ${PY_PKGS[*]} into $VENV" >&2
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q "${PY_PKGS[@]}" >&2
fi
