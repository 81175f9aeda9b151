"""Model state <-> lists of NumPy arrays, the form Flower messages carry."""

from __future__ import annotations

import functools
import io

import numpy as np
import torch
from torch import nn

__all__ = ["unwrap", "get_weights", "set_weights", "weight_names", "trainable_mask", "batchnorm_entries", "npy_view"]


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


def trainable_mask(model: nn.Module) -> list[bool]:
    """Per state-dict entry (in :func:`weight_names` order): whether it is a trainable parameter
    (``False`` for buffers such as BatchNorm running statistics and counters)."""
    module = unwrap(model)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return [name in trainable for name in module.state_dict()]


def batchnorm_entries(model: nn.Module) -> tuple[list[int], list[int]]:
    """Indices (in :func:`weight_names` order) of the BatchNorm entries of ``model``.

    Returns
    -------
    tuple of list of int
        ``(statistics, affine)``: the running mean, variance and batch counter of every
        BatchNorm layer, and their weight and bias.
    """
    module = unwrap(model)
    names = list(module.state_dict())
    stats: set[str] = set()
    affine: set[str] = set()
    for prefix, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            dot = f"{prefix}." if prefix else ""
            stats.update(f"{dot}{b}" for b in ("running_mean", "running_var", "num_batches_tracked"))
            affine.update(f"{dot}{w}" for w in ("weight", "bias"))
    return [i for i, n in enumerate(names) if n in stats], [i for i, n in enumerate(names) if n in affine]


def npy_view(payload: bytes) -> np.ndarray:
    """The array a ``.npy`` payload (``flwr.common.ndarray_to_bytes``) holds, read without a copy.

    Raises
    ------
    ValueError
        If the payload is not a plain ``.npy`` array (object arrays are refused, as
        ``bytes_to_ndarray`` refuses pickles) or is shorter than its header says.

    Notes
    -----
    The array is read-only and shares the payload's memory; ``np.load`` (what
    ``bytes_to_ndarray`` does) copies it, and on this project's VMs the first touch of that
    fresh memory costs more than the copy itself. Headers are parsed once per distinct header
    (:func:`_npy_header`): NumPy parses each with ``ast.literal_eval`` (27 us; 6 us from the cache), and a model's
    arrays are read several times per message by the site's mods (ResNet-18: 122 arrays).
    """
    if len(payload) < 10 or payload[:6] != _NPY_MAGIC:
        raise ValueError("not an .npy payload (no NumPy magic string).")
    length_bytes = 2 if payload[6] == 1 else 4
    end = 8 + length_bytes + int.from_bytes(payload[8 : 8 + length_bytes], "little")
    shape, fortran, dtype = _npy_header(bytes(payload[:end]))
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(payload, dtype=dtype, count=count, offset=end)
    return flat.reshape(shape, order="F" if fortran else "C")


_NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of an ``.npy`` header (magic, version, length, dict), by NumPy's parser."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:  # pragma: no cover - numpy writes 1.0-3.0
        raise ValueError(f"unsupported .npy format version {version}.")
    if dtype.hasobject:
        raise ValueError("an .npy payload must hold a plain array, got an object array (pickles are refused).")
    return shape, fortran, dtype
