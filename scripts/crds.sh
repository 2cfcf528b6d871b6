#!/usr/bin/env bash
# Fetch the CustomResourceDefinitions the chart's objects need, for the server-side dry
# run in tests/k8s/test_chart_dry_run.py, from the Go module proxy (GOPROXY and the
# checksum database apply: `go mod download -json MODULE@VERSION` prints the module's
# directory in the module cache).
#
# Output: ${BBR_TOOLS:-$HOME/.cache/bbr-tools}/crds/<set>/*.yaml, outside the repository,
# never committed. Each set records the module@version and paths it came from in
# `<set>/.source`; a second run with the same versions copies nothing.
#
#   gateway-api-standard      sigs.k8s.io/gateway-api                    config/crd/standard
#   gateway-api-experimental  sigs.k8s.io/gateway-api                    config/crd/experimental
#   inference-extension       sigs.k8s.io/gateway-api-inference-extension config/crd/bases
#   istio                     istio.io/api       kubernetes/customresourcedefinitions.gen.yaml
#   envoy-gateway             github.com/envoyproxy/gateway
#                             charts/gateway-helm/charts/crds/crds/generated (its own CRDs only)
#   prometheus-operator       github.com/prometheus-operator/prometheus-operator
#                             example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml
#
# Not obtainable this way (the dry run skips those objects and says why): kgateway's CRDs
# (the proxy answers 403 for github.com/kgateway-dev/kgateway/v2) and GKE's
# networking.gke.io CRDs (no public module).
set -euo pipefail

GATEWAY_API_VERSION="${GATEWAY_API_VERSION:-v1.6.3}"
INFERENCE_EXTENSION_VERSION="${INFERENCE_EXTENSION_VERSION:-v1.5.0}"
ISTIO_API_VERSION="${ISTIO_API_VERSION:-v1.31.4}"
ENVOY_GATEWAY_VERSION="${ENVOY_GATEWAY_VERSION:-v1.9.1}"
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"

TOOLS="${BBR_TOOLS:-$HOME/.cache/bbr-tools}"
CRDS="$TOOLS/crds"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOFLAGS="-mod=mod -buildvcs=false"

say() { echo "crds: $*"; }
die() { echo "crds: $*" >&2; exit 1; }

command -v go >/dev/null || die "go is required (https://go.dev/dl)"
mkdir -p "$CRDS"
# go mod download wants a module context: an empty throwaway one.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
printf 'module bbr.local/crds\n\ngo 1.22\n' >"$WORK/go.mod"

declare -A DIRS=()
module_dir() {  # MODULE@VERSION -> its directory in the module cache
  local spec="$1"
  if [[ -z "${DIRS[$spec]:-}" ]]; then
    local json dir
    json="$(cd "$WORK" && go mod download -json "$spec")" || die "cannot download $spec: $json"
    dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$json")"
    [[ -d "$dir" ]] || die "cannot download $spec: $json"
    DIRS[$spec]="$dir"
  fi
  echo "${DIRS[$spec]}"
}

# fetch SET MODULE@VERSION PATH... : copy the CustomResourceDefinition YAML files found at
# each PATH (a file, or a directory's *.yaml) into $CRDS/SET.
fetch() {
  local set="$1" spec="$2"
  shift 2
  local source="$spec $*" target="$CRDS/$set"
  if [[ -f "$target/.source" ]] && [[ "$(cat "$target/.source")" == "$source" ]]; then
    say "$set: $spec already in $target (skipping)"
    return
  fi
  local dir
  dir="$(module_dir "$spec")"
  rm -rf "$target.tmp"
  mkdir -p "$target.tmp"
  local path file count=0
  for path in "$@"; do
    [[ -e "$dir/$path" ]] || die "$spec has no $path"
    if [[ -d "$dir/$path" ]]; then
      for file in "$dir/$path"/*.yaml; do
        grep -q '^kind: CustomResourceDefinition' "$file" || continue
        install -m 0644 "$file" "$target.tmp/"
        count=$((count + 1))
      done
    else
      install -m 0644 "$dir/$path" "$target.tmp/"
      count=$((count + 1))
    fi
  done
  ((count > 0)) || die "$spec: no CustomResourceDefinition under $*"
  echo "$source" >"$target.tmp/.source"
  rm -rf "$target"
  mv "$target.tmp" "$target"
  say "$set: $count file(s) from $spec into $target"
}

fetch gateway-api-standard "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" config/crd/standard
fetch gateway-api-experimental "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" \
  config/crd/experimental
fetch inference-extension \
  "sigs.k8s.io/gateway-api-inference-extension@$INFERENCE_EXTENSION_VERSION" config/crd/bases
fetch istio "istio.io/api@$ISTIO_API_VERSION" kubernetes/customresourcedefinitions.gen.yaml
fetch envoy-gateway "github.com/envoyproxy/gateway@$ENVOY_GATEWAY_VERSION" \
  charts/gateway-helm/charts/crds/crds/generated
fetch prometheus-operator \
  "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
  example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml
say "done: $CRDS"
