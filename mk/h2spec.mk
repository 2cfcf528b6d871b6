# --- h2spec: HTTP/2 conformance of the ext_proc port (tests/test_h2spec.py) ---------------
# Built from its Go module by scripts/h2spec.sh into $(BBR_TOOLS)/bin, outside the repo;
# a second run builds nothing.
.PHONY: h2spec h2spec-test

## make h2spec: build h2spec once into $(BBR_TOOLS)/bin (needs go).
h2spec:
	scripts/h2spec.sh

TEST_TOOLS += h2spec

## make h2spec-test: h2spec against `bbr serve`, plaintext and TLS.
h2spec-test: $(STAMP) h2spec
	$(PY) -m pytest -q tests/test_h2spec.py
