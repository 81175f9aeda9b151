"""The one seeding function."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

__all__ = ["deterministic_kernels", "seed_everything"]


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) from one integer.

    Parameters
    ----------
    seed
        The run's seed; sites derive theirs as ``seed + 1000 * (site index + 1)``.
    deterministic
        Ask PyTorch for deterministic kernels where they exist (warns rather than fails
        where an operation has none).
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    if torch.accelerator.is_available():
        torch.manual_seed(seed)  # the CPU generator and every accelerator's
    else:
        # What torch.manual_seed does on a machine without an accelerator, without its CUDA part:
        # torch queues a seeding of CUDA for when CUDA starts (never, here) and records a stack
        # trace with it (``traceback.format_stack``) on every call: 1-3 ms in a simulated site's
        # deep stack, about 3.6 s of a 1,000-site simulation (BENCHMARKS.md, issue 19).
        torch.random.default_generator.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if deterministic:
        deterministic_kernels()
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True


def deterministic_kernels() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)``, without importing TorchInductor.

    torch 2.13's function does two things: it sets ``torch._inductor.config.deterministic``, which
    imports TorchInductor's config (about 190 modules, 1.2 s of CPU here), and it sets the
    deterministic flag of torch's kernels. Every process that seeds (a simulation's server and
    each site's worker) paid the import, and medfed never compiles a model, so only the kernels'
    flag is set, unless TorchInductor is already loaded (then torch's own function runs).
    ``tests/shared/test_seeding.py`` checks that torch's function still does just these two things.
    """
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(True, warn_only=True)
