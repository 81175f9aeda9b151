"""medfed's shared core: models, data, training, evaluation, privacy accounting, config.

Pure PyTorch / MONAI / Opacus. Nothing in this package imports ``flwr``.
"""
