#!/usr/bin/env bash
# Build Envoy Gateway's egctl (for tests/e2e/test_gateway_envoy_gateway.py: its
# `egctl x translate` is Envoy Gateway's own Gateway API -> xDS translation) into
# ${BBR_TOOLS:-$HOME/.cache/bbr-tools}/bin, outside the repository. Skipped when the
# installed binary already reports $EGCTL_VERSION. Needs Go; about 8 minutes on 2 cores
# the first time.
set -euo pipefail

EGCTL_VERSION=${EGCTL_VERSION:-v1.9.1}
MODULE=github.com/envoyproxy/gateway
BIN="${BBR_TOOLS:-$HOME/.cache/bbr-tools}/bin"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOFLAGS=${GOFLAGS:--buildvcs=false}

if [ -x "$BIN/egctl" ] && "$BIN/egctl" version --remote=false 2>/dev/null | grep -q "$EGCTL_VERSION"; then
  echo "egctl $EGCTL_VERSION: $BIN/egctl"
  exit 0
fi

mkdir -p "$BIN"
echo "building egctl $EGCTL_VERSION from its Go module into $BIN (about 8 minutes on 2 cores the first time)"
# `go install module/cmd/egctl@version` also asks the proxy for the module's version list,
# which the proxy here refuses: download the one version and build in its own module dir.
dir=$(go mod download -json "$MODULE@$EGCTL_VERSION" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
test -n "$dir"
start=$(date +%s)
(cd "$dir" && GOWORK=off GOFLAGS="$GOFLAGS -mod=mod" go build -trimpath \
  -ldflags "-s -w -X $MODULE/internal/cmd/version.envoyGatewayVersion=$EGCTL_VERSION" \
  -o "$BIN/egctl.tmp" ./cmd/egctl)
mv "$BIN/egctl.tmp" "$BIN/egctl"
echo "egctl $EGCTL_VERSION built in $(( $(date +%s) - start )) s: $BIN/egctl"
"$BIN/egctl" version --remote=false
