"""Layer 3, runtime: run a graph as it is (GraphSession, intermediate activations), draw inputs within a
model's limits (feeds), compare outputs (compare)."""
