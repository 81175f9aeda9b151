"""Model, data and the train/test loops of the quickstart peer (plain PyTorch, as in Flower's quickstart).

The model comes from medfed's registry (``medfed.shared.models.build_model``) so that medfed and this
peer train the same network; everything else is written here the way the quickstart does.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.shared.models import build_model

__all__ = ["Settings", "load_model", "load_partition", "load_test", "train", "test", "get_weights", "set_weights"]


@dataclass(frozen=True)
class Settings:
    """The common task: data file, federation and schedule.

    Parameters
    ----------
    data
        A MedMNIST-style ``.npz`` file (2D images ``(N, H, W)``, labels ``(N,)`` or ``(N, 1)``).
    num_sites, rounds, local_epochs, batch_size, learning_rate
        FedAvg over ``num_sites`` IID partitions of the training split; SGD with momentum 0.9.
    model
        medfed registry name (``"simplecnn"``).
    seed
        Seeds the model, the partition and shuffling.
    """

    data: str
    num_sites: int = 2
    rounds: int = 2
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    model: str = "simplecnn"
    seed: int = 0


def _arrays(path: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, H, W)`` float32 in [0, 1] and labels ``(N,)`` int64 of one split."""
    with np.load(path) as data:
        images = np.asarray(data[f"{split}_images"], dtype=np.float32) / 255.0
        labels = np.asarray(data[f"{split}_labels"]).reshape(-1).astype(np.int64)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


def load_model(settings: Settings) -> nn.Module:
    """The network, built from the seed (the same initial weights everywhere)."""
    x, y = _arrays(settings.data, "test")
    torch.manual_seed(settings.seed)
    return build_model(settings.model, spatial_dims=2, in_channels=1, out_channels=int(y.max()) + 1,
                       norm="batch", image_size=tuple(x.shape[2:]))


def load_partition(settings: Settings, partition_id: int) -> tuple[DataLoader, DataLoader]:
    """Site ``partition_id``'s IID share of the train and validation splits."""
    loaders = []
    for split, shuffle in (("train", True), ("val", False)):
        x, y = _arrays(settings.data, split)
        rng = np.random.default_rng(settings.seed + (split == "val"))
        part = np.sort(np.array_split(rng.permutation(len(y)), settings.num_sites)[partition_id])
        generator = torch.Generator().manual_seed(settings.seed + partition_id)
        loaders.append(DataLoader(TensorDataset(x[part], y[part]), batch_size=settings.batch_size,
                                  shuffle=shuffle, generator=generator))
    return loaders[0], loaders[1]


def load_test(settings: Settings) -> DataLoader:
    """The test split (the server evaluates the global model on it)."""
    return DataLoader(TensorDataset(*_arrays(settings.data, "test")), batch_size=64)


def train(net: nn.Module, loader: DataLoader, *, epochs: int, learning_rate: float) -> float:
    """SGD over ``loader`` for ``epochs``; returns the mean training loss."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=learning_rate, momentum=0.9)
    net.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            total += float(loss) * len(labels)
            count += len(labels)
    return total / max(count, 1)


@torch.no_grad()
def test(net: nn.Module, loader: DataLoader) -> tuple[float, dict[str, float]]:
    """Loss, accuracy and ROC AUC (MONAI, class 1 vs the rest for two classes)."""
    criterion = nn.CrossEntropyLoss()
    net.eval()
    logits, labels = [], []
    for images, y in loader:
        logits.append(net(images))
        labels.append(y)
    out, y = torch.cat(logits), torch.cat(labels)
    loss = float(criterion(out, y))
    accuracy = float((out.argmax(1) == y).float().mean())
    probs = torch.softmax(out, dim=1)
    auc = float(compute_roc_auc(probs[:, 1], y)) if probs.shape[1] == 2 and len(torch.unique(y)) == 2 else float("nan")
    return loss, {"accuracy": accuracy, "auc": auc}


def get_weights(net: nn.Module) -> list[np.ndarray]:
    """The state dict as NumPy arrays."""
    return [v.cpu().numpy() for v in net.state_dict().values()]


def set_weights(net: nn.Module, weights: list[np.ndarray]) -> None:
    """Load arrays from :func:`get_weights` (possibly averaged)."""
    state = OrderedDict(
        (k, torch.as_tensor(v).to(dtype=t.dtype)) for (k, t), v in zip(net.state_dict().items(), weights, strict=True)
    )
    net.load_state_dict(state, strict=True)
