# --- ghz: the gRPC load generator operators load-test bbr with ---------------------------
# tests/test_protoset.py drives bbr with it through protos/ext_proc.protoset, and
# tests/test_bench.py runs `make bench-instructions` with it. Built from its Go module by
# scripts/perf-tools.sh into $(BBR_TOOLS)/bin, outside the repo; a second run builds nothing.
.PHONY: ghz

## make ghz: build ghz once into $(BBR_TOOLS)/bin (needs go).
ghz:
	bash scripts/perf-tools.sh ghz

TEST_TOOLS += ghz
