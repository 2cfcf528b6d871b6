"""The process harness shared by the tests, the benchmarks and the demo.

`processes` starts, watches and stops children and picks free ports; `envoy_config`
renders Envoy bootstraps with bbr as ext_proc; `stack` runs bbr with an Envoy in front
of the simulated model servers of `model_server`; `apiserver` runs a real etcd and
kube-apiserver; `modelmaps` writes model-map files; `h2client` speaks raw HTTP/2;
`signals` waits for stop signals without a lock. Nothing here imports tests/, bench/ or
demo/.
"""
