"""The coordinator side of medfed: Flower ServerApp, strategies, workflows, run directory."""
