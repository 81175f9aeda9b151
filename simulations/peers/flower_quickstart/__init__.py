"""A minimal Flower app for the benchmark's common task, in the style of Flower's quickstart.

What a user writes without medfed: ``task.py`` (model, data, train and test loops),
``client_app.py`` (a ``NumPyClient`` and its ``client_fn``), ``server_app.py`` (``FedAvg`` with a
centralized ``evaluate_fn``), ``run.py`` (``flwr.simulation.run_simulation``). Run it with
``python -m medfed.simulations.peers.flower_quickstart.run --data ../shared/data/medmnist/breastmnist.npz``.
"""
