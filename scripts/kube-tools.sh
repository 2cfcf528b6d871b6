#!/usr/bin/env bash
# Build the real kube-apiserver and etcd used by tests/k8s from the Go module proxy.
#
# Binaries go to ${BBR_TOOLS:-$HOME/.cache/bbr-tools}/bin, outside the repository; a
# second run finds them (right version) and builds nothing. Each is built from a
# throwaway module in ${BBR_TOOLS}/src:
#   kube-apiserver: k8s.io/kubernetes at KUBE_VERSION, with `replace` directives pinning
#                   every k8s.io/* staging module to the matching v0.x.y release (the
#                   kubernetes go.mod points them at ./staging, which a module consumer
#                   cannot see).
#   etcd:           go.etcd.io/etcd/server/v3 at ETCD_VERSION (the version kubernetes's
#                   go.mod pins); its go.mod has relative replaces, so `go install @v`
#                   refuses it and the sibling modules are pinned the same way.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.5}"
TOOLS="${BBR_TOOLS:-$HOME/.cache/bbr-tools}"
BIN="$TOOLS/bin"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

say() { echo "kube-tools: $*"; }

command -v go >/dev/null || { echo "kube-tools: go is required (https://go.dev/dl)" >&2; exit 1; }
mkdir -p "$BIN" "$TOOLS/src"

# The `replace` lines for the staging modules: k8s.io/foo vX.Y.Z -> v0.Y.Z.
staging_replaces() {
  local minor_patch="${KUBE_VERSION#v1.}" gomod
  # Through the go command, so GOPROXY and the checksum database apply.
  gomod="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
  [[ -f "$gomod" ]] || { echo "kube-tools: cannot download k8s.io/kubernetes@$KUBE_VERSION" >&2; exit 1; }
  sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$gomod" \
    | while read -r mod; do echo "replace $mod => $mod v0.${minor_patch}"; done
}

build_kube_apiserver() {
  local want="Kubernetes $KUBE_VERSION"
  if [[ -x "$BIN/kube-apiserver" ]] && [[ "$("$BIN/kube-apiserver" --version 2>/dev/null)" == "$want" ]]; then
    say "kube-apiserver $KUBE_VERSION already in $BIN (skipping)"
    return
  fi
  local dir="$TOOLS/src/kube-apiserver-$KUBE_VERSION"
  say "building kube-apiserver $KUBE_VERSION in $dir (takes several minutes the first time)"
  mkdir -p "$dir"
  {
    echo "module bbr.local/kube-apiserver"
    echo
    echo "go 1.25.0"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    staging_replaces
  } >"$dir/go.mod"
  local major minor
  major="${KUBE_VERSION#v}"; major="${major%%.*}"
  minor="${KUBE_VERSION#v*.}"; minor="${minor%%.*}"
  local v=k8s.io/component-base/version
  (
    cd "$dir"
    go build -trimpath -o "$BIN/kube-apiserver.tmp" \
      -ldflags "-s -w -X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=$major -X $v.gitMinor=$minor -X $v.gitTreeState=clean" \
      k8s.io/kubernetes/cmd/kube-apiserver
  )
  mv "$BIN/kube-apiserver.tmp" "$BIN/kube-apiserver"
  say "installed $("$BIN/kube-apiserver" --version) at $BIN/kube-apiserver"
}

build_etcd() {
  if [[ -x "$BIN/etcd" ]] && "$BIN/etcd" --version 2>/dev/null | grep -q "etcd Version: ${ETCD_VERSION#v}\$"; then
    say "etcd $ETCD_VERSION already in $BIN (skipping)"
    return
  fi
  local dir="$TOOLS/src/etcd-$ETCD_VERSION"
  say "building etcd $ETCD_VERSION in $dir"
  mkdir -p "$dir"
  cat >"$dir/go.mod" <<MOD
module bbr.local/etcd

go 1.25.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION

replace go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 $ETCD_VERSION
replace go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION
replace go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 $ETCD_VERSION
replace go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 $ETCD_VERSION
MOD
  (
    cd "$dir"
    go build -trimpath -o "$BIN/etcd.tmp" -ldflags "-s -w" go.etcd.io/etcd/server/v3
  )
  mv "$BIN/etcd.tmp" "$BIN/etcd"
  say "installed $("$BIN/etcd" --version | head -1) at $BIN/etcd"
}

case "${1:-all}" in
  etcd) build_etcd ;;
  kube-apiserver) build_kube_apiserver ;;
  all) build_etcd; build_kube_apiserver ;;
  *) echo "usage: $0 [all|etcd|kube-apiserver]" >&2; exit 2 ;;
esac
say "tools in $BIN"
