"""The quickstart peer's ClientApp: a NumPyClient that trains and evaluates on its partition."""

from __future__ import annotations

from flwr.app import Context
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import NDArrays, Scalar

from medfed.simulations.peers.flower_quickstart.task import (
    Settings,
    get_weights,
    load_model,
    load_partition,
    set_weights,
    test,
    train,
)

__all__ = ["FlowerClient", "make_client_app"]


class FlowerClient(NumPyClient):
    """Trains the received model on the site's data for ``local_epochs``; evaluates on its validation share."""

    def __init__(self, *, settings: Settings, partition_id: int) -> None:
        self.settings = settings
        self.net = load_model(settings)
        self.trainloader, self.valloader = load_partition(settings, partition_id)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        set_weights(self.net, parameters)
        loss = train(self.net, self.trainloader, epochs=self.settings.local_epochs,
                     learning_rate=self.settings.learning_rate)
        return get_weights(self.net), len(self.trainloader.dataset), {"train_loss": loss}  # type: ignore[arg-type]

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        set_weights(self.net, parameters)
        loss, metrics = test(self.net, self.valloader)
        return loss, len(self.valloader.dataset), {"accuracy": metrics["accuracy"]}  # type: ignore[arg-type]


def make_client_app(settings: Settings) -> ClientApp:
    """``ClientApp(client_fn=...)``: partition ``partition-id`` of the node config."""

    def client_fn(context: Context) -> Client:
        return FlowerClient(settings=settings, partition_id=int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn)
