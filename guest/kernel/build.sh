#!/bin/bash
# Build the podvisor guest kernel (ELF vmlinux, PVH entry) from Debian's linux-source-6.1, reproducibly.
#
#   guest/kernel/build.sh            build if needed; print the path of the cached vmlinux on stdout
#   guest/kernel/build.sh --key      print only the cache key (hash of every input)
#
# Inputs: this script, podvisor.config (fragment over tinyconfig), patches/*.patch and the exact Debian
# package version of linux-source-6.1. Output: ${PODVISOR_CACHE:-~/.cache/podvisor}/kernel/<key>/vmlinux
# (+ .config). Another kernel (a PVM guest kernel, a distro microvm kernel) needs no change here: point the
# VMM's `kernel` setting at it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${PODVISOR_CACHE:-$HOME/.cache/podvisor}
SRC_PKG=linux-source-6.1
TARBALL=/usr/src/$SRC_PKG.tar.xz

need_pkgs() {
  local missing=()
  for p in "$SRC_PKG" flex bison libelf-dev bc; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
}

key() {
  {
    dpkg-query -W -f='${Version}\n' "$SRC_PKG"
    sha256sum "$HERE/build.sh" "$HERE/podvisor.config" "$HERE"/patches/*.patch | cut -d' ' -f1
  } | sha256sum | cut -c1-16
}

need_pkgs
KEY=$(key)
if [ "${1:-}" = "--key" ]; then echo "$KEY"; exit 0; fi
OUT=$CACHE/kernel/$KEY
if [ -s "$OUT/vmlinux" ]; then echo "$OUT/vmlinux"; exit 0; fi

W=$(mktemp -d "${TMPDIR:-/tmp}/podvisor-kbuild.XXXXXX")
trap 'rm -rf "$W"' EXIT
echo "building guest kernel $KEY in $W" >&2
tar -xf "$TARBALL" -C "$W"
cd "$W/$SRC_PKG"
for p in "$HERE"/patches/*.patch; do patch -s -p1 < "$p" >&2; done
# Reproducible build metadata.
export KBUILD_BUILD_USER=podvisor KBUILD_BUILD_HOST=podvisor KBUILD_BUILD_TIMESTAMP="@0" KBUILD_BUILD_VERSION=1
make -s tinyconfig >&2
./scripts/kconfig/merge_config.sh -m .config "$HERE/podvisor.config" >/dev/null
make -s olddefconfig >&2
# Every option of the fragment must have survived Kconfig.
bad=0
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  opt=${line%%=*}; val=${line#*=}
  if [ "$val" = n ]; then
    grep -q "^$opt=" .config && { echo "kernel config: $opt should be off" >&2; bad=1; }
  else
    grep -qx "$opt=$val" .config || { echo "kernel config: $opt=$val was dropped by Kconfig" >&2; bad=1; }
  fi
done < "$HERE/podvisor.config"
[ $bad = 0 ] || exit 1
make -s -j"$(nproc)" vmlinux >&2
mkdir -p "$OUT.tmp"
strip -o "$OUT.tmp/vmlinux" vmlinux
cp .config "$OUT.tmp/config"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
echo "$OUT/vmlinux"
