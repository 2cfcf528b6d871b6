# bbr: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit protos fuzz validate clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## make run: the demo — bbr, a real Envoy and two simulated model servers on localhost.
run: $(STAMP)
	$(PY) -m demo

## make test: lint, type-check and every test (unit, in-process gRPC, end-to-end through Envoy).
test: $(STAMP)
	$(VENV)/bin/ruff check bbr tests demo scripts
	$(VENV)/bin/ruff format --check bbr tests demo scripts
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check bbr tests demo scripts
	$(VENV)/bin/ruff format --check bbr tests demo scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q -m 'not e2e'

## make protos: regenerate protos/ext_proc.protoset (for ghz and grpcurl) from the installed bindings.
protos: $(STAMP)
	$(PY) scripts/gen_protoset.py protos/ext_proc.protoset

## make fuzz: coverage-guided fuzzing (atheris) of the body parser; FUZZ_SECONDS=300 by default.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	mkdir -p .fuzz-corpus
	$(PY) tests/fuzz/fuzz_body.py -max_total_time=$(FUZZ_SECONDS) .fuzz-corpus tests/fuzz/corpus

validate: $(STAMP)
	$(VENV)/bin/bbr validate config/model-map.yaml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .fuzz-corpus

# ---- Kubernetes test tools (tests/k8s) --------------------------------------------------
# A real kube-apiserver and etcd, built from the Go module proxy by scripts/kube-tools.sh
# into $(BBR_TOOLS)/bin, outside the repository; a second run builds nothing.
BBR_TOOLS ?= $(HOME)/.cache/bbr-tools
export BBR_TOOLS
.PHONY: kube-tools kube-test

## make kube-tools: build kube-apiserver and etcd once into $(BBR_TOOLS)/bin (needs Go).
kube-tools:
	scripts/kube-tools.sh

# `make test` runs tests/k8s, which need them.
test: kube-tools

## make kube-test: only the Kubernetes ConfigMap source tests, against a real API server.
kube-test: $(STAMP) kube-tools
	$(PY) -m pytest -q tests/k8s
