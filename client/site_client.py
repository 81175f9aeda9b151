"""The Flower NumPyClient of one hospital site: local training and validation.

Only model-shaped arrays and scalar metrics leave the site: never an image, a label, a file
name or a path.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.client import NumPyClient

from client.site_data import SiteData
from shared.config import RunConfig
from shared.seeding import seed_everything
from shared.task import model_for, round_settings
from shared.training import evaluate, make_optimizer, make_train_loader, select_device, train_epochs
from shared.weights import get_weights, set_weights

__all__ = ["SiteClient"]

logger = logging.getLogger(__name__)


class SiteClient(NumPyClient):
    """Trains and evaluates the global model on one site's data.

    Parameters
    ----------
    cfg
        The run configuration (the same at every site and at the server).
    data
        This site's training and validation sets.
    site_index
        Position of this site in the federation (``partition-id`` in simulation); reported
        back so the server can order results deterministically.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda[:N]"``.
    """

    def __init__(
        self, *, cfg: RunConfig, data: SiteData, site_index: int, device: str = "auto"
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.site_index = site_index
        self.device = select_device(device)
        seed_everything(cfg.seed)  # identical initial weights at every site and the server
        self.model = model_for(cfg, data.train)

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """The current local model state."""
        return get_weights(self.model)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, float | int]]:
        """Train the global model ``parameters`` locally; return the new state."""
        set_weights(self.model, parameters)
        server_round = int(config.get("server-round", 1))
        settings = round_settings(self.cfg, server_round=server_round, site_index=self.site_index)
        seed_everything(settings.seed)
        loader = make_train_loader(self.data.train, settings)
        optimizer = make_optimizer(
            self.model.parameters(),
            name=settings.optimizer,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
        )
        global_params = [p.detach().clone() for p in self.model.parameters()]
        result = train_epochs(
            self.model,
            loader,
            optimizer,
            task=self.data.train.task,
            epochs=settings.epochs,
            device=self.device,
            proximal_mu=settings.proximal_mu,
            global_params=global_params,
        )
        logger.info(
            "site %d round %d: trained %d steps, loss %.4f", self.site_index, server_round, result.steps, result.loss
        )
        metrics: dict[str, float | int] = {
            "site-index": self.site_index,
            "train-loss": result.loss,
            "train-seconds": result.seconds,
            "learning-rate": settings.learning_rate,
        }
        return get_weights(self.model), result.num_examples, metrics

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, float | int]]:
        """Evaluate the global model ``parameters`` on this site's validation split."""
        set_weights(self.model, parameters)
        metrics = evaluate(self.model, self.data.val, device=self.device)
        loss = float(metrics.pop("loss"))
        num_examples = int(metrics.pop("num_examples"))
        return loss, num_examples, {"site-index": self.site_index, **metrics}
