"""End-to-end tests: the whole mesh through Envoy (they arrive with the gateway)."""
