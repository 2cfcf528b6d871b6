# --- Istio's xDS generation (tests/e2e/test_gateway_istio.py) -------------------------------
# tools/istiogen runs pilot's own config generation (istio.io/istio from the Go module proxy)
# over the chart's objects and prints the gateway's Envoy listeners, clusters and routes.
# Built once into $(BBR_TOOLS)/bin by scripts/istiogen.sh (about 3 minutes on 2 cores);
# rebuilt only when tools/istiogen changes.
.PHONY: istiogen istio-test

## make istiogen: build Istio's config generator into $(BBR_TOOLS)/bin/istiogen (needs go).
istiogen:
	scripts/istiogen.sh

TEST_TOOLS += istiogen

## make istio-test: the chart's istio provider through pilot's generation and a real Envoy.
istio-test: $(STAMP) helm istiogen
	$(PY) -m pytest -q tests/e2e/test_gateway_istio.py
