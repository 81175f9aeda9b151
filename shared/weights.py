"""Model state <-> lists of NumPy arrays, the form Flower messages carry."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["unwrap", "get_weights", "set_weights", "weight_names"]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside an Opacus ``GradSampleModule`` (or ``model`` itself)."""
    return getattr(model, "_module", model)


def weight_names(model: nn.Module) -> list[str]:
    """State-dict keys in the order :func:`get_weights` uses (parameters and buffers)."""
    return list(unwrap(model).state_dict().keys())


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Every state-dict tensor (parameters and buffers such as BatchNorm statistics).

    Returns
    -------
    list of numpy.ndarray
        One array per state-dict entry, in :func:`weight_names` order, copied to the CPU.
    """
    return [t.detach().cpu().numpy().copy() for t in unwrap(model).state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load arrays produced by :func:`get_weights` (possibly averaged) into ``model``.

    Raises
    ------
    ValueError
        If the number of arrays or any shape differs from the model's state, naming the entry.
    """
    module = unwrap(model)
    state = module.state_dict()
    if len(weights) != len(state):
        raise ValueError(
            f"received {len(weights)} arrays but the model has {len(state)} state entries: "
            "the server and the site must use the same model and config."
        )
    new_state = {}
    for (name, current), array in zip(state.items(), weights, strict=True):
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(
                f"state entry {name!r} has shape {tuple(current.shape)} but the update has "
                f"{tuple(array.shape)}: the server and the site must use the same model and config."
            )
        value = torch.as_tensor(np.asarray(array))
        if not current.is_floating_point():
            value = value.round()
        new_state[name] = value.to(dtype=current.dtype)
    module.load_state_dict(new_state, strict=True)
