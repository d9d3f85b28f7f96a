"""Ensemble service: Triton ``platform: "ensemble"`` models; each step is a gateway call."""
