# --- the model map at scale (bench/mapscale.py; docs/performance.md "The model map at scale")
# A real kube-apiserver (make kube-tools) with 500, 5 k and 50 k names: CPU per ConfigMap
# edit, the request loop's longest wait while edits arrive, and the lag of a 1,000-edit
# burst. A benchmark, not a test: not part of `make test` (the 50 k run takes minutes).
.PHONY: bench-mapscale

## make bench-mapscale: model map at scale against a real API server (MAPSCALE_ARGS=--help).
bench-mapscale: $(STAMP) kube-tools
	$(PY) -m bench.mapscale $(MAPSCALE_ARGS)
