#!/bin/bash
# Offline checks of the node deployment files (no cluster, no network):
#   e2e/validate-deploy.sh [DEPLOY_DIR]        (default: deploy/ of this checkout)
# 1. every Kubernetes manifest under DEPLOY_DIR (kubelet/ excepted: those are not API objects) against the
#    upstream JSON schemas of Kubernetes $K8S_VERSIONS, strictly (unknown fields fail), with
#    kubernetes-validate from the venv of e2e/setup-host.sh; a kind/apiVersion without a schema fails too;
# 2. e2e/check_deploy.py: the KubeletConfiguration, the kubelet drop-in and crictl.yaml (endpoint = the
#    daemon's default socket), the CNI conflist, config.toml, and the files' consistency with each other;
# 3. systemd-analyze verify of podvisor.service and of the kubelet drop-in (skipped if systemd-analyze is
#    missing);
# 4. shellcheck of the scripts (skipped if shellcheck is missing);
# 5. install.sh install / install again / uninstall / uninstall --purge in a scratch root, with nsenter,
#    systemctl and podvisor replaced by stubs: files, modes, no restart when nothing changed, what stays.
# Prints "FAIL <what>: <why>" for each problem and exits 1 if there is any.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEPLOY=$(cd "${1:-$ROOT/deploy}" && pwd)
VENV="${HOME}/.cache/podvisor/venv"
K8S_VERSIONS=(1.30.0 1.37.0)
failed=0
fail() {
  echo "FAIL $1: $2"
  failed=1
}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# 1. Kubernetes schemas
mapfile -t MANIFESTS < <(find "$DEPLOY" -path "$DEPLOY/kubelet" -prune -o \( -name '*.yaml' -o -name '*.yml' \) \
  -type f -print | sort)
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  fail kubernetes-validate "not in $VENV (run e2e/setup-host.sh)"
elif [ ${#MANIFESTS[@]} -eq 0 ]; then
  fail kubernetes-validate "no manifests under $DEPLOY"
else
  echo "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version), strict, Kubernetes ${K8S_VERSIONS[*]}:"
  args=(--strict)
  for v in "${K8S_VERSIONS[@]}"; do args+=(-k "$v"); done
  set +e
  "$VENV/bin/kubernetes-validate" "${args[@]}" "${MANIFESTS[@]}" >"$TMP/kv.out" 2>&1
  kv=$?
  set -e
  sed "s|$DEPLOY/|deploy/|g" "$TMP/kv.out"
  # A kind or apiVersion without a schema is only a WARN (exit 0) for kubernetes-validate.
  if [ $kv -ne 0 ] || grep -qv '^INFO ' "$TMP/kv.out"; then
    fail kubernetes-validate "manifests do not validate (lines above)"
  fi
fi

# 2. what no schema covers
"$VENV/bin/python" "$ROOT/e2e/check_deploy.py" "$DEPLOY" "$ROOT" || failed=1

# 3. systemd units
if command -v systemd-analyze >/dev/null; then
  # verify needs the executables to exist: point them at a stub. kubelet.service is a stub unit with the
  # drop-in, in a unit path of its own.
  printf '#!/bin/sh\n' >"$TMP/stub" && chmod +x "$TMP/stub"
  mkdir -p "$TMP/units" "$TMP/kubelet/kubelet.service.d"
  sed "s|/usr/local/bin/podvisor|$TMP/stub|" "$DEPLOY/systemd/podvisor.service" >"$TMP/units/podvisor.service"
  printf '[Service]\nExecStart=%s\n' "$TMP/stub" >"$TMP/kubelet/kubelet.service"
  sed "s|/usr/bin/kubelet|$TMP/stub|" "$DEPLOY/kubelet/10-podvisor.conf" >"$TMP/kubelet/kubelet.service.d/10-podvisor.conf"
  units_ok=1
  for unit in units/podvisor.service kubelet/kubelet.service; do
    # Unknown keys are only warnings for systemd: any output fails.
    if ! out=$(SYSTEMD_UNIT_PATH="$TMP/${unit%/*}:" systemd-analyze verify "$TMP/$unit" 2>&1) || [ -n "$out" ]; then
      out=${out//$TMP\/units\//deploy\/systemd\/}
      echo "${out//$TMP\/kubelet\/kubelet.service.d\//deploy\/kubelet\/}"
      fail systemd-analyze "${unit#*/}"
      units_ok=0
    fi
  done
  [ $units_ok = 0 ] || echo "ok systemd-analyze verify: podvisor.service, kubelet.service + 10-podvisor.conf"
else
  echo "SKIPPED systemd-analyze verify: systemd-analyze is not installed"
fi

# 4. scripts
mapfile -t SCRIPTS < <(find "$DEPLOY" -name '*.sh' -type f | sort)
if command -v shellcheck >/dev/null; then
  if shellcheck "${SCRIPTS[@]}" "$ROOT/e2e/validate-deploy.sh"; then
    echo "ok shellcheck: ${SCRIPTS[*]#"$DEPLOY/"} e2e/validate-deploy.sh"
  else
    fail shellcheck "(lines above)"
  fi
else
  echo "SKIPPED shellcheck: shellcheck is not installed"
fi

# 5. install.sh in a scratch root
smoke() {
  local host=$TMP/host bundle=$TMP/bundle stubs=$TMP/stubs log=$TMP/systemctl.log out
  mkdir -p "$host" "$stubs" "$bundle/bin" "$bundle/guest"
  cp -r "$DEPLOY/install.sh" "$DEPLOY/systemd" "$DEPLOY/cni" "$DEPLOY/config.toml" "$bundle/"
  printf '#!/bin/sh\necho "podvisor 9.9.9"\n' >"$bundle/bin/podvisor"
  echo kernel >"$bundle/guest/vmlinux"
  echo initramfs >"$bundle/guest/initramfs.cpio"
  echo agent >"$bundle/guest/podvisor-agent"
  # nsenter runs the command with absolute paths mapped into the scratch root; systemctl keeps a state file.
  cat >"$stubs/nsenter" <<'EOF'
#!/bin/bash
while [ "$1" != -- ]; do shift; done
shift
cmd=$1
shift
case $cmd in /*) cmd=$HOST_ROOT$cmd ;; esac
exec "$cmd" "$@"
EOF
  cat >"$stubs/systemctl" <<EOF
#!/bin/bash
echo "\$*" >>"$log"
case \$1 in
  restart) touch "$TMP/active" ;;
  disable) rm -f "$TMP/active" ;;
  is-active) [ -e "$TMP/active" ] ;;
esac
EOF
  chmod +x "$stubs/nsenter" "$stubs/systemctl"
  run() { PATH="$stubs:$PATH" HOST_ROOT=$host PODVISOR_SERVE_TIMEOUT=0 NODE_NAME='' "$bundle/install.sh" "$@"; }

  run install 2>"$TMP/install.log" || { cat "$TMP/install.log"; return 1; }
  local f
  for f in usr/local/bin/podvisor:755 usr/share/podvisor/vmlinux:644 usr/share/podvisor/initramfs.cpio:644 \
    usr/share/podvisor/podvisor-agent:755 \
    etc/systemd/system/podvisor.service:644 etc/podvisor/config.toml:644 etc/cni/net.d/10-podvisor.conflist:644; do
    [ "$(stat -c %a "$host/${f%:*}" 2>/dev/null)" = "${f#*:}" ] || { echo "/${f%:*} missing or not mode ${f#*:}"; return 1; }
  done
  grep -qx 'restart podvisor.service' "$log" || { echo "first install did not start podvisor.service"; return 1; }
  : >"$log"
  run install 2>/dev/null || { echo "second install failed"; return 1; }
  if grep -q restart "$log"; then echo "an install that changed nothing restarted the daemon"; return 1; fi
  mkdir -p "$host/var/lib/podvisor/state"
  run uninstall 2>/dev/null || { echo "uninstall failed"; return 1; }
  for f in usr/local/bin/podvisor usr/share/podvisor etc/systemd/system/podvisor.service etc/podvisor/config.toml \
    etc/cni/net.d/10-podvisor.conflist; do
    [ ! -e "$host/$f" ] || { echo "uninstall left /$f"; return 1; }
  done
  [ -d "$host/var/lib/podvisor/state" ] || { echo "uninstall removed /var/lib/podvisor without --purge"; return 1; }
  run uninstall --purge 2>/dev/null || { echo "uninstall --purge failed"; return 1; }
  [ ! -e "$host/var/lib/podvisor" ] || { echo "uninstall --purge left /var/lib/podvisor"; return 1; }
  # A node that already has a CNI network keeps it as the only one.
  mkdir -p "$host/etc/cni/net.d" && echo '{}' >"$host/etc/cni/net.d/05-cluster.conflist"
  run install 2>/dev/null || { echo "install with an existing CNI network failed"; return 1; }
  [ ! -e "$host/etc/cni/net.d/10-podvisor.conflist" ] || { echo "installed 10-podvisor.conflist beside a cluster network"; return 1; }
  out=$(run status) && { echo "status succeeded without a serving socket: $out"; return 1; }
  return 0
}
if msg=$(smoke); then
  echo "ok install.sh: install, idempotent re-install, uninstall, --purge, existing CNI network, status"
else
  fail install.sh "$msg"
fi

if [ $failed = 0 ]; then
  echo "validate-deploy: all checks of $DEPLOY passed"
else
  echo "validate-deploy: FAILED ($DEPLOY)"
fi
exit $failed
