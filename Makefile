# bbr: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Test and benchmark tools (kube-apiserver, helm, ghz, ...) are built into $(BBR_TOOLS),
# outside the repository and never committed; the scripts in scripts/ read it.
BBR_TOOLS ?= $(HOME)/.cache/bbr-tools
export BBR_TOOLS
# The tools `make test` needs: each tool's section below and each mk/*.mk fragment appends
# its target here. `test:` reads it after every fragment is in (second expansion).
TEST_TOOLS :=
# xds-protos ships an older copy of opentelemetry/proto that, depending on install order,
# overwrites opentelemetry-proto's and breaks the OTLP exporter (--tracing): put the
# installed opentelemetry-proto's own files back last.
OTEL_PROTO_FIX = $(PY) -m pip install --quiet --force-reinstall --no-deps \
	"opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"

.PHONY: run test lint typecheck unit protos fuzz validate clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(OTEL_PROTO_FIX)
	touch $(STAMP)

## make run: the demo — bbr, a real Envoy and two simulated model servers on localhost.
## DEMO_ARGS passes flags to it, e.g. make run DEMO_ARGS="--port 0 --streaming" (python -m demo --help).
DEMO_ARGS ?=
run: $(STAMP)
	$(PY) -m demo $(DEMO_ARGS)

## make test: lint, type-check and every test (unit, in-process gRPC, end-to-end through Envoy).
.SECONDEXPANSION:
test: $(STAMP) $$(TEST_TOOLS)
	$(VENV)/bin/ruff check bbr tests demo scripts bench harness
	$(VENV)/bin/ruff format --check bbr tests demo scripts bench harness
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check bbr tests demo scripts bench harness
	$(VENV)/bin/ruff format --check bbr tests demo scripts bench harness

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
.PHONY: kube-tools kube-test

## make kube-tools: build kube-apiserver and etcd once into $(BBR_TOOLS)/bin (needs Go).
kube-tools:
	scripts/kube-tools.sh

# `make test` runs tests/k8s, which need them.
TEST_TOOLS += kube-tools helm

## make kube-test: only the Kubernetes ConfigMap source tests, against a real API server.
kube-test: $(STAMP) kube-tools
	$(PY) -m pytest -q tests/k8s

# --- performance: load tests, micro-benchmarks, report (bench/, docs/performance.md) ---
# Tools (ghz, the Go BBR) live outside the repo in $(BBR_TOOLS)/bin, never committed.
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: perf-tools loadtest loadtest-e2e bench bench-instructions bench-report bench-lint

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(OTEL_PROTO_FIX)
	touch $(BENCH_STAMP)

## make perf-tools: ghz and the Go BBR into $(BBR_TOOLS)/bin, h2load from Debian.
perf-tools:
	bash scripts/perf-tools.sh

## make loadtest: ghz against bbr and the Go BBR, 1 KB / 100 KB / 1 MB (LOADTEST_ARGS=--help).
loadtest: $(STAMP) perf-tools
	$(PY) -m bench.loadtest $(LOADTEST_ARGS)

## make bench-instructions: instructions per request under ghz, counted by valgrind's
## callgrind (deterministic on a shared machine; INSTRUCTIONS_ARGS=--help).
bench-instructions: $(STAMP) ghz
	$(PY) -m bench.instructions $(INSTRUCTIONS_ARGS)

## make loadtest-e2e: h2load through a real Envoy: no ext_proc, + bbr, + Go BBR.
loadtest-e2e: $(STAMP) perf-tools
	$(PY) -m bench.e2e $(E2E_ARGS)

## make bench: the hot path in-process (decision, Stream.handle) per body size, in µs.
bench: $(STAMP)
	$(PY) -m bench.micro $(BENCH_ARGS)

## make bench-report: table and PNG plot from bench/results/*-latest.json.
bench-report: $(BENCH_STAMP)
	$(PY) -m bench.report

# bench/ is linted and type-checked with the rest (make lint, make typecheck, make test).
bench-lint: lint

# --- helm -------------------------------------------------------------------------------
# The real helm CLI for tests/test_chart.py, built from its Go module with the local Go
# toolchain and kept outside the repo (never committed). Idempotent: rebuilt only when the
# installed binary is missing or reports another version.
HELM_VERSION ?= v3.22.0
HELM         := $(BBR_TOOLS)/bin/helm

.PHONY: helm chart-test

## make helm: install helm $(HELM_VERSION) into $(BBR_TOOLS)/bin (needs go).
helm:
	@if $(HELM) version --template '{{.Version}}' 2>/dev/null | grep -qx '$(HELM_VERSION)'; then \
		echo "helm $(HELM_VERSION): $(HELM)"; \
	else \
		set -e; \
		echo "building helm $(HELM_VERSION) from its Go module (a few minutes the first time)"; \
		gomod=$$(GOTOOLCHAIN=local go mod download -json helm.sh/helm/v3@$(HELM_VERSION) \
			| sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$$/\1/p'); \
		k8s_minor=$$(sed -n 's/^[[:space:]]*k8s\.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$$gomod"); \
		test -n "$$k8s_minor"; \
		mkdir -p $(BBR_TOOLS)/bin; \
		GOTOOLCHAIN=local GOBIN=$(BBR_TOOLS)/bin go install -trimpath -ldflags "-w -s \
			-X helm.sh/helm/v3/internal/version.version=$(HELM_VERSION) \
			-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
			-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$$k8s_minor \
			-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
			-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$$k8s_minor" \
			helm.sh/helm/v3/cmd/helm@$(HELM_VERSION); \
		$(HELM) version --template '{{.Version}}' | grep -qx '$(HELM_VERSION)'; \
		echo "helm $(HELM_VERSION): $(HELM)"; \
	fi

## make chart-test: helm lint/template of charts/body-based-routing, and the real image built and run with podman.
chart-test: $(STAMP) helm
	$(PY) -m pytest -q tests/test_chart.py tests/test_image.py

# --- soak ---------------------------------------------------------------------------------
## make soak: ghz against bbr for SOAK_SECONDS (600) while the model map is rewritten every
## 5 s; prints RSS and open fds over time; fails on > 10 % growth after the warm-up, any
## misrouted request or ghz error. Needs ghz (make perf-tools). Not part of `make test`.
SOAK_SECONDS ?= 600
.PHONY: soak
soak: $(STAMP)
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS)

# --- CRDs for the chart's server-side dry run (tests/k8s/test_chart_dry_run.py) ------------
# Gateway API, Inference Extension, Istio, Envoy Gateway and prometheus-operator CRDs,
# fetched from their Go modules by scripts/crds.sh into $(BBR_TOOLS)/crds (never committed);
# a second run fetches nothing.
.PHONY: crds chart-dry-run

## make crds: fetch the providers' CRDs into $(BBR_TOOLS)/crds (needs go).
crds:
	scripts/crds.sh

# `make test` and `make kube-test` run the dry run (tests/k8s), which needs them and helm.
TEST_TOOLS += crds
kube-test: crds helm

## make chart-dry-run: the rendered chart, server-side dry run against a real API server.
chart-dry-run: $(STAMP) kube-tools helm crds
	$(PY) -m pytest -q tests/k8s/test_chart_dry_run.py

# --- per-tool fragments ---------------------------------------------------------------------
# Each test tool (h2spec, egctl, Istio's config generator, the image build) has its own
# fragment in mk/: it builds the tool into $(BBR_TOOLS) and adds itself to TEST_TOOLS.
include $(sort $(wildcard mk/*.mk))
