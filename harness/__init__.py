"""The process harness shared by the tests, the benchmarks and the demo.

`processes` starts, watches and stops children (bbr, Envoy, model servers) and picks free
ports; `envoy_config` renders Envoy bootstraps with bbr as ext_proc; `stack` runs one bbr
with one Envoy in front of simulated model servers (`model_server`); `apiserver` runs a
real etcd and kube-apiserver; `modelmaps` writes model-map files. Nothing here imports
tests/, bench/ or demo/.
"""
