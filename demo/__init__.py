"""The local demo: bbr, a real Envoy and two simulated model servers (`python -m demo`)."""
