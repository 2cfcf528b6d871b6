"""End-to-end tests: real HTTP through a real Envoy to bbr and simulated model servers."""
