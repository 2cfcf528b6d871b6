#!/usr/bin/env bash
# The image the chart runs, built and run with Debian's podman (tests/test_image.py, make image).
#
#   scripts/image.sh tools               podman, buildah, mmdebstrap, runc from Debian (once),
#                                        and the base image (once per package list); prints it
#   scripts/image.sh build [CTX [TAG]]   podman build of CTX/Dockerfile (default: this checkout,
#                                        tag localhost/bbr:VERSION) on that base image
#   scripts/image.sh flags               the podman flags this machine needs, one a line
#
# The base image stands in for python:3.11-slim-bookworm, which needs a container registry:
# Debian bookworm's python3 made with mmdebstrap from the Debian mirror, `podman import`ed.
# Its tarball is kept in $BBR_TOOLS/image, keyed by the recipe below, so a second run
# builds nothing (and re-imports it in seconds if podman's storage was wiped).
#
# Settings, detected, each overridable by the environment (README, "Development"):
#   BBR_BASE_IMAGE          use this base image instead (e.g. python:3.11.14-slim-bookworm)
#   BBR_PODMAN_RUNTIME      OCI runtime; default runc where cgroups are v1 or hybrid (crun
#                           refuses them), podman's own choice on cgroup v2; empty: podman's
#   BBR_PODMAN_ULIMITS      default "nofile=H:H nproc=N:N", H the hard open-files limit and N
#                           min(hard process limit, 32768): podman's defaults exceed the hard
#                           limits of many sandboxes and runc then fails; empty: podman's
#   BBR_IMAGE_CA_BUNDLE     CA bundle mounted over the image's during build steps, so pip
#                           trusts a TLS-intercepting proxy; default the host's
#                           /etc/ssl/certs/ca-certificates.crt; empty: none
#   HTTP(S)_PROXY, NO_PROXY (either case) passed to the build steps when set;
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, PIP_DEFAULT_TIMEOUT likewise, in a
#                           pip.conf mounted at /etc/pip.conf during build steps only
#   BBR_DEBIAN_MIRROR, BBR_DEBIAN_SECURITY_MIRROR   where mmdebstrap gets the base's packages
# Nothing of these ends up in the image: build mounts are not committed to layers.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${BBR_TOOLS:-$HOME/.cache/bbr-tools}"
IMAGE_DIR="$TOOLS/image"
PACKAGES=(podman buildah mmdebstrap runc uidmap fuse-overlayfs slirp4netns containernetworking-plugins)

# The base image's recipe; its hash names the cached tarball and the image tag.
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
MIRROR="${BBR_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${BBR_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
# Like the slim python images: no documentation, manual pages or translations.
DPKG_EXCLUDES=(
  "path-exclude=/usr/share/doc/*" "path-include=/usr/share/doc/*/copyright"
  "path-exclude=/usr/share/man/*" "path-exclude=/usr/share/info/*"
  "path-exclude=/usr/share/locale/*" "path-exclude=/usr/share/lintian/*"
)
IMPORT_CHANGES=(
  "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "ENV LANG=C.UTF-8"
  'CMD ["python3"]'
)

say() { echo "image: $*" >&2; }
die() { echo "image: $*" >&2; exit 1; }

recipe_key() {
  printf '%s\n' v1 "$SUITE" "$BASE_PACKAGES" "$MIRROR" "$SECURITY_MIRROR" \
    "${DPKG_EXCLUDES[@]}" "${IMPORT_CHANGES[@]}" | sha256sum | cut -c1-16
}

# --- tools --------------------------------------------------------------------------------

install_packages() {
  local missing=() pkg
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$pkg")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    say "podman, buildah, mmdebstrap, runc: installed"
    return
  fi
  [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null \
    || die "needs root and apt-get to install ${missing[*]} (make image-tools); install them yourself otherwise"
  say "installing ${missing[*]} from Debian"
  # Other package work on the machine may hold the lock for a while: wait for it.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
}

base_image() {
  local key ref tar
  key="$(recipe_key)"
  ref="localhost/bbr-base:$key"
  tar="$IMAGE_DIR/bbr-base-$key.tar"
  mkdir -p "$IMAGE_DIR"
  if podman image exists "$ref"; then
    say "base image $ref: cached"
  else
    if [[ ! -s "$tar" ]]; then
      say "making the base image with mmdebstrap ($SUITE: $BASE_PACKAGES; about 3 minutes)"
      local opts=() rule
      for rule in "${DPKG_EXCLUDES[@]}"; do opts+=("--dpkgopt=$rule"); done
      # stdin from /dev/null: without a terminal, mmdebstrap would read sources from it.
      rm -rf "$tar.part"
      mmdebstrap --quiet --format=tar --variant=minbase --include="$BASE_PACKAGES" "${opts[@]}" \
        "$SUITE" "$tar.part" \
        "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
        "deb $SECURITY_MIRROR $SUITE-security main" </dev/null >&2
      mv "$tar.part" "$tar"
    fi
    local changes=() change
    for change in "${IMPORT_CHANGES[@]}"; do changes+=(--change "$change"); done
    say "importing $tar as $ref"
    podman import --quiet "${changes[@]}" "$tar" "$ref" >/dev/null
  fi
  echo "$ref" >"$IMAGE_DIR/base-image"
  echo "$ref"
}

# --- podman settings ----------------------------------------------------------------------

podman_flags() {
  local runtime ulimits hard_files hard_procs
  if [[ -n "${BBR_PODMAN_RUNTIME+set}" ]]; then
    runtime="$BBR_PODMAN_RUNTIME"
  elif [[ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ]] && command -v runc >/dev/null; then
    runtime=runc
  else
    runtime=""
  fi
  [[ -n "$runtime" ]] && echo "--runtime=$runtime"
  if [[ -n "${BBR_PODMAN_ULIMITS+set}" ]]; then
    ulimits="$BBR_PODMAN_ULIMITS"
  else
    ulimits=""
    hard_files="$(ulimit -Hn)"
    [[ "$hard_files" =~ ^[0-9]+$ ]] && ulimits="nofile=$hard_files:$hard_files"
    hard_procs="$(ulimit -Hu)"
    if [[ "$hard_procs" =~ ^[0-9]+$ ]]; then
      ((hard_procs > 32768)) && hard_procs=32768
    else
      hard_procs=32768
    fi
    ulimits="$ulimits nproc=$hard_procs:$hard_procs"
  fi
  local limit
  for limit in $ulimits; do echo "--ulimit=$limit"; done
  return 0
}

build() {
  local context="${1:-$ROOT}" tag="${2:-}" base version
  command -v podman >/dev/null || die "podman not found: run make image-tools"
  if [[ -n "${BBR_BASE_IMAGE:-}" ]]; then
    base="$BBR_BASE_IMAGE"
  elif [[ -s "$IMAGE_DIR/base-image" ]] && podman image exists "$(cat "$IMAGE_DIR/base-image")"; then
    base="$(cat "$IMAGE_DIR/base-image")"
  else
    die "no base image: run make image-tools (or set BBR_BASE_IMAGE)"
  fi
  if [[ -z "$tag" ]]; then
    version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$context/bbr/__init__.py")"
    tag="localhost/bbr:${version:-dev}"
  fi
  local args=() flag
  while read -r flag; do args+=("$flag"); done < <(podman_flags)
  local ca="${BBR_IMAGE_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"
  if [[ -n "$ca" && -s "$ca" ]]; then
    args+=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
  fi
  local name
  for name in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    [[ -n "${!name:-}" ]] && args+=(--build-arg "$name=${!name}")
  done
  # pip's settings for build steps only: a pip.conf mounted at /etc/pip.conf.
  local pipconf
  pipconf="$(mktemp)"
  trap "rm -f '$pipconf'" EXIT
  {
    echo "[global]"
    [[ -n "$ca" && -s "$ca" ]] && echo "cert = /etc/ssl/certs/ca-certificates.crt"
    [[ -n "${PIP_INDEX_URL:-}" ]] && echo "index-url = $PIP_INDEX_URL"
    [[ -n "${PIP_EXTRA_INDEX_URL:-}" ]] && echo "extra-index-url = $PIP_EXTRA_INDEX_URL"
    [[ -n "${PIP_TRUSTED_HOST:-}" ]] && echo "trusted-host = $PIP_TRUSTED_HOST"
    [[ -n "${PIP_DEFAULT_TIMEOUT:-}" ]] && echo "timeout = $PIP_DEFAULT_TIMEOUT"
    true
  } >"$pipconf"
  chmod 644 "$pipconf"
  args+=(-v "$pipconf:/etc/pip.conf:ro")
  say "building $tag from $context on $base"
  podman build --network=host "${args[@]}" --build-arg "PYTHON_IMAGE=$base" \
    --tag "$tag" --file "$context/Dockerfile" "$context" >&2
  echo "$tag"
}

case "${1:-}" in
  tools) install_packages; base_image ;;
  build) shift; build "$@" ;;
  flags) podman_flags ;;
  *) die "usage: $0 tools | build [CONTEXT [TAG]] | flags" ;;
esac
