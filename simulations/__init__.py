"""Multi-site simulations, pooled baselines and benchmarks."""
