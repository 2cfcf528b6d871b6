# --- the image, built and run for real (tests/test_image.py) ------------------------------
# podman, buildah, mmdebstrap and runc from Debian, and a Debian bookworm python3 base image
# made with mmdebstrap (it stands in for python:3.11-slim-bookworm, which needs a container
# registry), cached in $(BBR_TOOLS)/image; a second run installs and builds nothing.
# scripts/image.sh lists the settings it detects (runtime, ulimits, CA bundle, proxies).
.PHONY: image-tools image image-test

## make image-tools: podman & co. from Debian (needs root) and the cached base image.
image-tools:
	scripts/image.sh tools

## make image: build localhost/bbr:VERSION from the Dockerfile with podman.
image: image-tools
	scripts/image.sh build

## make image-test: build the image and run it with the chart's securityContext and args.
image-test: $(STAMP) image-tools helm
	$(PY) -m pytest -q tests/test_image.py

TEST_TOOLS += image-tools
# chart-test (Makefile) runs tests/test_image.py too.
chart-test: image-tools
