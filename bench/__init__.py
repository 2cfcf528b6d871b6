"""Load tests, micro-benchmarks and the performance report (not part of the bbr package)."""
