"""Where model maps come from: files (and, later, the Kubernetes API)."""
