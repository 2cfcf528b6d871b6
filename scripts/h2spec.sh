#!/usr/bin/env bash
# Build h2spec (HTTP/2 conformance tester) into ${BBR_TOOLS:-$HOME/.cache/bbr-tools}/bin,
# outside the repository; a second run builds nothing.
#
# The newest h2spec the Go module proxy serves is v2.2.1+incompatible (its later v2 tags
# carry a go.mod without /v2, so the proxy refuses them); it has 145 cases, the count the
# issue and Envoy's figures use. It has no go.mod, so `go install pkg@version` would pick
# the newest of each dependency; instead it is built in a throwaway module that pins the
# versions of its Gopkg.lock (the x/net HTTP/2 framer h2spec was written against).
set -euo pipefail

H2SPEC_VERSION=${H2SPEC_VERSION:-v2.2.1+incompatible}
BIN="${BBR_TOOLS:-$HOME/.cache/bbr-tools}/bin"
STAMP="$BIN/.h2spec-version"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOFLAGS="${GOFLAGS:--buildvcs=false} -mod=mod"

if [ -x "$BIN/h2spec" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$H2SPEC_VERSION" ]; then
  echo "h2spec $H2SPEC_VERSION: $BIN/h2spec"
  exit 0
fi

echo "building h2spec $H2SPEC_VERSION into $BIN"
mkdir -p "$BIN"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/go.mod" <<MOD
module bbr.invalid/h2spec-build

go 1.18

require (
	github.com/fatih/color v0.0.0-20161025120501-bf82308e8c85
	github.com/inconshreveable/mousetrap v1.0.0
	github.com/mattn/go-colorable v0.1.0
	github.com/mattn/go-isatty v0.0.4
	github.com/spf13/cobra v0.0.0-20170118185516-dc208f4211e7
	github.com/spf13/pflag v1.0.3
	github.com/summerwind/h2spec $H2SPEC_VERSION
	golang.org/x/net v0.0.0-20161104230106-55a3084c9119
)
MOD
(cd "$work" && go build -trimpath \
  -ldflags "-s -w -X main.VERSION=${H2SPEC_VERSION#v} -X main.COMMIT=module-proxy" \
  -o "$BIN/h2spec.tmp" github.com/summerwind/h2spec/cmd/h2spec)
mv "$BIN/h2spec.tmp" "$BIN/h2spec"
echo "$H2SPEC_VERSION" > "$STAMP"
"$BIN/h2spec" --version
echo "h2spec $H2SPEC_VERSION: $BIN/h2spec"
