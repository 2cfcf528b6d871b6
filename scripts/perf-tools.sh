#!/usr/bin/env bash
# Install the load-test tools outside the repository, in ${BBR_TOOLS:-$HOME/.cache/bbr-tools}/bin:
#   ghz     gRPC load generator (from the Go module proxy)
#   go-bbr  the Gateway API Inference Extension's BBR, the peer bbr is compared with
#   h2load  HTTP/2 load generator for the end-to-end runs (Debian's nghttp2-client)
# Each is skipped when already there. Needs Go (>= 1.25) for the first two.
# `perf-tools.sh ghz` installs ghz alone (make test needs it; the others are for benchmarks).
set -euo pipefail

GHZ_VERSION=${GHZ_VERSION:-v0.120.0}
GO_BBR_VERSION=${GO_BBR_VERSION:-v1.5.0}
GO_BBR_MODULE=sigs.k8s.io/gateway-api-inference-extension
BIN="${BBR_TOOLS:-$HOME/.cache/bbr-tools}/bin"
mkdir -p "$BIN"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOFLAGS=${GOFLAGS:--buildvcs=false}

if [ ! -x "$BIN/ghz" ]; then
  echo "installing ghz $GHZ_VERSION into $BIN"
  GOBIN="$BIN" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
fi

if [ "${1:-}" = ghz ]; then  # `make ghz` (a test tool): ghz alone
  exit 0
fi

if [ ! -x "$BIN/go-bbr" ]; then
  # `go install module/cmd/bbr@version` fails here: it also asks the proxy for the module's
  # version list (deprecation check), which the proxy refuses. Download the one version
  # and build it in its own module, ignoring its go.work (it names absent modules).
  echo "building Go BBR $GO_BBR_VERSION into $BIN/go-bbr"
  dir=$(go mod download -json "$GO_BBR_MODULE@$GO_BBR_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  (cd "$dir" && GOWORK=off GOFLAGS="$GOFLAGS -mod=mod" go build -o "$BIN/go-bbr" ./cmd/bbr)
fi

if ! command -v h2load >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing h2load (nghttp2-client)"
    apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null
  else
    echo "h2load missing: install nghttp2-client (needed by bench/e2e.py only)" >&2
  fi
fi

"$BIN/ghz" --help >/dev/null 2>&1 && echo "ghz:    $BIN/ghz ($GHZ_VERSION)"
[ -x "$BIN/go-bbr" ] && echo "go-bbr: $BIN/go-bbr ($GO_BBR_MODULE $GO_BBR_VERSION)"
command -v h2load >/dev/null && echo "h2load: $(h2load --version | head -n1)"
