"""Numeric precision of the evaluation passes: fp32, or bfloat16 autocast where the hardware has it.

Training always runs in fp32 (bf16 training collapsed pooled BreastMNIST to the majority class,
BENCHMARKS.md, issue 19). The passes that only run the model forward -- validation and test
evaluation, and the BatchNorm re-estimation pass after local training -- may run under
``torch.autocast(dtype=torch.bfloat16)``: ``python -m medfed.simulations.bench.precision``
measured their AUC against fp32 on the same weights (BENCHMARKS.md, "bf16 inference and BatchNorm
re-estimation (issue 19)"). The run-config key ``eval-precision`` picks it:

``"auto"``
    bf16 for classification models on a device with native bf16 arithmetic (a CPU with AVX512-BF16 or AMX, a CUDA GPU of
    compute capability 8.0 or later), else fp32. On a CPU without those instructions bf16 is
    emulated and slower than fp32, so ``auto`` never picks it there.
``"fp32"``
    Always fp32 (bit-for-bit the behaviour before this key existed).
``"bf16"``
    Always bf16 autocast (slow where it is emulated; for measurements).

Exported models, ``medfed predict`` and ``medfed export`` stay fp32 whatever this key says: their
probabilities are compared with the bundle's at 1e-5.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch

from medfed.shared.config import EVAL_PRECISIONS

__all__ = ["EVAL_PRECISIONS", "AUTO_TASKS", "native_bf16", "eval_dtype", "eval_autocast", "describe_eval_precision"]

logger = logging.getLogger(__name__)

@functools.cache
def _cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX tiles) oneDNN can use."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        native = any(check() for check in checks if check is not None)
        mkldnn_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (RuntimeError, AttributeError):  # an older or unusual build: do not guess
        return False
    return native and mkldnn_bf16


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (fast), rather than emulating it (slow).

    CPU: AVX512-BF16 or AMX instructions and oneDNN's bf16 kernels; CUDA: compute capability 8.0
    (Ampere) or later. Other device types: ``False``.
    """
    if device.type == "cpu":
        return _cpu_native_bf16()
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index) >= (8, 0)
    return False


AUTO_TASKS: tuple[str, ...] = ("classification",)
"""Tasks ``auto`` picks bf16 for: those whose AUC was measured within 0.01 of fp32 (BENCHMARKS.md).
Segmentation (Dice, sliding-window sums) and detection (box scores) were not measured: fp32."""


def eval_dtype(precision: str, *, device: torch.device, task: str = "classification") -> torch.dtype | None:
    """The autocast dtype of the evaluation passes for ``eval-precision = precision`` on ``device``
    for a ``task`` model (``auto``: bf16 only for :data:`AUTO_TASKS` on a native-bf16 device).

    Returns
    -------
    torch.dtype or None
        ``torch.bfloat16``, or ``None`` for plain fp32.

    Raises
    ------
    ValueError
        ``precision`` is not one of :data:`EVAL_PRECISIONS` (naming the key and the valid values).
    """
    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"eval-precision = {precision!r} is invalid. Valid choices: {', '.join(EVAL_PRECISIONS)}.")
    if precision == "bf16" or (precision == "auto" and task in AUTO_TASKS and native_bf16(device)):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def eval_autocast(dtype: torch.dtype | None, *, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op for ``None`` (fp32)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def describe_eval_precision(precision: str, *, device: torch.device, task: str = "classification") -> str:
    """One line for ``--dry-run``: which precision the evaluation passes use on ``device`` and why."""
    dtype = eval_dtype(precision, device=device, task=task)
    used = "bf16 autocast" if dtype is not None else "fp32"
    if precision == "auto":
        if task not in AUTO_TASKS:
            why = f"bf16 was not measured for {task}"
        elif dtype is not None:
            why = f"{device.type} has native bf16"
        else:
            why = f"{device.type} has no native bf16 (it would be emulated, slower than fp32)"
        reason = f"auto: {why}"
    else:
        reason = "set explicitly"
    return (f"eval-precision: {precision} -> {used} for validation/test evaluation and the BatchNorm "
            f"re-estimation pass on {device.type} ({reason}); training, predict and export stay fp32")
