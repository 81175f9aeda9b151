"""Peer implementations of the benchmark's common task, written without medfed's machinery.

``flower_quickstart``: a minimal Flower app as Flower's quickstart writes one (NumPyClient + FedAvg on
the simulation engine). ``nvflare_job``: the same task as an NVIDIA FLARE job, run by FLARE's
simulator in a separate virtual environment. Both use medfed's model registry
(``medfed.shared.models.build_model``) so that the model is the same; nothing else of medfed.
"""
