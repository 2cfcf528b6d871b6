#!/usr/bin/env bash
# Build tools/istiogen (Istio's own xDS generation, istio.io/istio from the Go module proxy,
# driven by our small program) into ${BBR_TOOLS:-$HOME/.cache/bbr-tools}/bin/istiogen.
#
# Idempotent: the binary is rebuilt only when tools/istiogen's sources (main.go, go.mod,
# go.sum) change; their digest is kept next to it. The first build downloads istio.io/istio
# and its dependencies and compiles them: about 3 minutes on 2 cores.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/tools/istiogen"
TOOLS="${BBR_TOOLS:-$HOME/.cache/bbr-tools}"
BIN="$TOOLS/bin"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export CGO_ENABLED=0

command -v go >/dev/null || { echo "istiogen: go is required (https://go.dev/dl)" >&2; exit 1; }
mkdir -p "$BIN"

digest="$(cd "$SRC" && cat go.mod go.sum ./*.go | sha256sum | cut -d' ' -f1)"
if [[ -x "$BIN/istiogen" ]] && [[ "$(cat "$BIN/istiogen.sha256" 2>/dev/null)" == "$digest" ]]; then
  echo "istiogen: up to date in $BIN (skipping)"
  exit 0
fi
echo "istiogen: building $SRC (istio.io/istio $(sed -n 's/^\s*istio\.io\/istio \(v[^ ]*\)$/\1/p' "$SRC/go.mod"); a few minutes the first time)"
start=$SECONDS
(cd "$SRC" && GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath -ldflags "-s -w" -o "$BIN/istiogen.tmp" .)
mv "$BIN/istiogen.tmp" "$BIN/istiogen"
echo "$digest" >"$BIN/istiogen.sha256"
echo "istiogen: installed $BIN/istiogen in $((SECONDS - start)) s"
