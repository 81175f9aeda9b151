"""The benchmark's common task as an NVIDIA FLARE job (FedAvgRecipe in FLARE's SimEnv simulator).

Runs in the separate virtual environment that :func:`medfed.simulations.bench.peers.nvflare_python`
makes (``nvflare`` installed there; torch, MONAI and this repository appended to its path).
``job.py`` builds and runs the job, ``client.py`` is FLARE's per-site training script (Client
API), ``net.py`` wraps medfed's model so that FLARE can build it by class path.
"""
