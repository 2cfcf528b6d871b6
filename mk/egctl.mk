# --- egctl: Envoy Gateway's own Gateway API -> xDS translator ---------------------------------
# For tests/e2e/test_gateway_envoy_gateway.py: the chart's envoy-gateway objects go through
# `egctl x translate`, the result runs in a real Envoy with a real bbr. Built from its Go
# module by scripts/egctl.sh into $(BBR_TOOLS)/bin (about 8 minutes on 2 cores the first
# time); a second run builds nothing.
EGCTL_VERSION ?= v1.9.1
export EGCTL_VERSION
.PHONY: egctl gateway-test

## make egctl: build Envoy Gateway's egctl $(EGCTL_VERSION) into $(BBR_TOOLS)/bin (needs go).
egctl:
	scripts/egctl.sh

TEST_TOOLS += egctl

## make gateway-test: the chart's gateway providers: Envoy Gateway end to end, kgateway and GKE field by field.
gateway-test: $(STAMP) helm egctl
	$(PY) -m pytest -q tests/e2e/test_gateway_envoy_gateway.py tests/test_chart.py
