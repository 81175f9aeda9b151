"""Sample-level differential privacy at a site: DP-SGD with Opacus and a persistent privacy ledger.

Pure PyTorch / Opacus (never imports Flower). A site uses three pieces:

* :func:`make_private_training` turns a model, optimizer and loader into Opacus's DP-SGD
  counterparts (per-sample clipping, Gaussian noise, Poisson sampling) with a noise generator
  chosen by the caller (:func:`secure_generator` outside simulations).
* :class:`PrivacyLedger` keeps the site's cumulative privacy loss across rounds and across
  restarts of the site process: an Opacus accountant plus one entry per round, saved atomically
  to a JSON file. Before a round, :meth:`PrivacyLedger.would_exceed` tells whether one more
  round would take the site past its :class:`PrivacyBudget`.
* :func:`noise_for_target` derives the noise multiplier that spends a target epsilon over the
  planned rounds (Opacus's ``get_noise_multiplier``).

See ``docs/privacy-dp.md`` for what the secure noise does and does not guarantee.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import secrets
import struct
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medfed.shared.config import ACCOUNTANTS, DP_GRAD_SAMPLE_MODES, RunConfig
from medfed.shared.files import write_atomically
from medfed.shared.models import validate_for_dp

# Opacus is imported inside the functions that run DP-SGD or accounting: it pulls torch.distributed and
# scipy.stats (about 1 s of CPU more per simulated site's start), which a process without DP does not pay.
if TYPE_CHECKING:
    from opacus.accountants import IAccountant
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

__all__ = [
    "GRAD_SAMPLE_MODES",
    "LEDGER_FORMAT",
    "EpsilonError",
    "LedgerEntry",
    "LedgerError",
    "PoissonSchedule",
    "PrivacyBudget",
    "PrivacyLedger",
    "PrivateTraining",
    "deployment_ledger_path",
    "make_private_training",
    "noise_for_target",
    "planned_noise_multiplier",
    "poisson_schedule",
    "poisson_schedule_for",
    "secure_generator",
    "site_ledger_path",
]

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "medfed-privacy-ledger"
"""The ``format`` field of a ledger file."""
LEDGER_VERSION = 1
GRAD_SAMPLE_MODES: tuple[str, ...] = DP_GRAD_SAMPLE_MODES
"""Per-sample gradient modes :func:`make_private_training` accepts: Opacus's ``hooks``,
``ghost`` (classification only, the loss must be computed through
:attr:`PrivateTraining.criterion`) and ``functorch``, and medfed's ``bookkeeping``
(:mod:`medfed.shared.dp_bookkeeping`: the same clipped sums without per-sample gradient tensors)."""


class LedgerError(ValueError):
    """A ledger file is unreadable, of another format, or internally inconsistent."""


class EpsilonError(ValueError):
    """The accountant gave an epsilon that is no privacy guarantee: negative, NaN or infinite.

    Opacus's RDP conversion returns a negative epsilon when ``delta`` is large (for example
    ``dp-delta = 0.5``); such a number must never be reported or compared with a budget.
    """


# --------------------------------------------------------------------------- secure noise
_MT_STATE_WORDS = 624
_MT_STATE_OFFSET = 24  # after uint64 seed, int left, int seeded, uint64 next (CPUGeneratorImplState)


def secure_generator(*, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` whose whole state comes from the operating system's CSPRNG.

    Opacus's own ``secure_mode`` needs ``torchcsprng``, which no longer builds against current
    PyTorch. This is the replacement medfed uses for DP-SGD noise and Poisson sampling.

    * CPU: the generator is a Mersenne Twister (MT19937). ``manual_seed`` keeps only the low
      32 bits of a seed (seeds ``s`` and ``s + 2**32`` give the same stream), so instead all
      624 words of the MT19937 state are filled from ``secrets`` (``os.urandom``): 19,968 bits
      of OS entropy, no seed that could be guessed or brute-forced.
    * CUDA: the generator is Philox; it is seeded with 64 bits from ``secrets``.

    What this does *not* give: the stream is not a CSPRNG stream (MT19937's state can be
    reconstructed from 624 consecutive raw outputs; Philox is not a vetted cipher), and the
    Gaussian sampler's floating-point weaknesses (Mironov 2012; Jin et al. 2021) are only
    mitigated by pairing it with ``secure_noise=True`` in :func:`make_private_training`.

    Parameters
    ----------
    device
        ``"cpu"`` or a CUDA device; the generator must live where the gradients do.

    Returns
    -------
    torch.Generator
        A fresh generator, different in every call.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type != "cpu":
        generator.manual_seed(secrets.randbits(64))
        return generator
    generator.manual_seed(0)  # a valid state to start from (left=1, seeded=1, no cached normals)
    state = bytearray(generator.get_state().numpy().tobytes())
    end = _MT_STATE_OFFSET + 8 * _MT_STATE_WORDS
    seed, left, seeded, _next = struct.unpack_from("<QiiQ", state, 0)
    first_word = struct.unpack_from("<Q", state, _MT_STATE_OFFSET)[0]
    if len(state) < end or (seed, left, seeded, first_word) != (0, 1, 1, 0):
        # The generator state layout changed in this PyTorch: fall back to a 64-bit seed.
        logger.warning(
            "secure_generator: unexpected torch.Generator state layout (torch %s); seeding with "
            "64 bits of OS entropy instead (the CPU generator keeps only 32 of them).",
            torch.__version__,
        )
        generator.manual_seed(secrets.randbits(64))
        return generator
    words = secrets.token_bytes(4 * _MT_STATE_WORDS)
    for i in range(_MT_STATE_WORDS):
        struct.pack_into("<Q", state, _MT_STATE_OFFSET + 8 * i, int.from_bytes(words[4 * i : 4 * i + 4], "little"))
    # left = 1: the first draw regenerates (twists) the whole state before any output.
    struct.pack_into("<QiiQ", state, 0, 0, 1, 1, 0)
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    return generator


# --------------------------------------------------------------------------- Poisson sampling
@dataclass(frozen=True)
class PoissonSchedule:
    """How Opacus's Poisson loader samples one epoch.

    Parameters
    ----------
    sample_rate
        Probability ``q`` that each example is in a given batch (``1 / len(loader)``).
    steps_per_epoch
        Number of batches (noisy optimizer steps) per epoch; Opacus uses ``int(1 / q)``, which
        can be one less than ``len(loader)`` through rounding.
    """

    sample_rate: float
    steps_per_epoch: int


def poisson_schedule(loader: DataLoader) -> PoissonSchedule:
    """The sample rate and steps per epoch Opacus's ``DPDataLoader`` derives from ``loader``.

    Uses Opacus's own ``UniformWithReplacementSampler`` so the count matches what training does.
    """
    return _schedule(num_samples=len(loader.dataset), num_batches=len(loader))  # type: ignore[arg-type]


def poisson_schedule_for(*, num_samples: int, batch_size: int) -> PoissonSchedule:
    """:func:`poisson_schedule` of the training loader a site builds for ``num_samples`` examples
    at ``batch_size`` (``medfed.shared.training.make_train_loader``: ``drop_last = False``), without
    loading the data (``medfed site check``)."""
    if num_samples <= 0 or batch_size <= 0:
        return _schedule(num_samples=0, num_batches=0)
    return _schedule(num_samples=num_samples, num_batches=math.ceil(num_samples / min(batch_size, num_samples)))


def _schedule(*, num_samples: int, num_batches: int) -> PoissonSchedule:
    if num_samples == 0 or num_batches == 0:
        raise ValueError("DP-SGD needs a non-empty training set: this site has no training examples.")
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sample_rate = 1.0 / num_batches
    sampler = UniformWithReplacementSampler(num_samples=num_samples, sample_rate=sample_rate)
    return PoissonSchedule(sample_rate=sample_rate, steps_per_epoch=len(sampler))


# --------------------------------------------------------------------------- DP-SGD
@dataclass
class PrivateTraining:
    """Opacus's DP-SGD objects for one round of local training.

    Attributes
    ----------
    model
        ``GradSampleModule`` (or, in ``bookkeeping`` mode, a
        :class:`~medfed.shared.dp_bookkeeping.BookkeepingModule`) around the caller's model (same
        parameters; train through it).
    optimizer
        ``DPOptimizer``: clips each example's gradient to ``max_grad_norm`` and adds Gaussian
        noise of standard deviation ``noise_multiplier * max_grad_norm`` to their sum.
    loader
        ``DPDataLoader`` with Poisson sampling (batches of variable size, possibly empty).
    criterion
        Ghost clipping only: the loss to call as ``criterion(logits, targets)`` (it runs the two
        backward passes); ``None`` otherwise.
    sample_rate, steps_per_epoch
        The Poisson schedule (see :class:`PoissonSchedule`).
    noise_multiplier, max_grad_norm
        As passed in.
    """

    model: nn.Module
    optimizer: DPOptimizer
    loader: DPDataLoader
    criterion: Callable[..., Any] | None
    sample_rate: float
    steps_per_epoch: int
    noise_multiplier: float
    max_grad_norm: float
    _steps: list[int] = field(default_factory=lambda: [0], repr=False)

    @property
    def steps_taken(self) -> int:
        """Noisy optimizer steps taken so far (each one is charged to the ledger)."""
        return self._steps[0]

    def close(self) -> nn.Module:
        """Remove Opacus's hooks and per-sample attributes; return the plain model (trained)."""
        return self.model.to_standard_module()  # type: ignore[operator]


def make_private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator,
    grad_sample_mode: str = "bookkeeping",
    secure_noise: bool = False,
    criterion: nn.Module | None = None,
    sampling_generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Wrap ``model``, ``optimizer`` and ``loader`` for DP-SGD with Poisson sampling.

    Uses ``opacus.PrivacyEngine.make_private`` with two changes Opacus's API does not offer in one
    call: the Poisson sampler draws from ``generator`` too (Opacus would use its ``secure_mode``
    generator, i.e. ``torchcsprng``, or the global torch RNG), and with ``secure_noise`` the
    optimizer samples each Gaussian as Opacus's ``secure_mode`` does (a sum of four normals,
    robust to the floating-point attacks of arXiv 2107.10138 / 2112.05307) without needing
    ``torchcsprng``. Privacy is accounted by the caller's :class:`PrivacyLedger`, not by the
    engine (see :attr:`PrivateTraining.steps_taken`).

    Parameters
    ----------
    model
        A model in training mode whose layers Opacus supports (``norm="group"`` or
        ``"instance"``: checked with :func:`medfed.shared.models.validate_for_dp`).
    optimizer
        An optimizer over ``model.parameters()``.
    loader
        The site's ordinary training loader; its ``len`` sets the sample rate ``1 / len``
        (expected batch size about the loader's batch size).
    noise_multiplier
        Noise standard deviation over ``max_grad_norm`` (``> 0``).
    max_grad_norm
        Per-example L2 clipping bound (``> 0``).
    generator
        Draws the noise (and, on the CPU, the Poisson batches): :func:`secure_generator` for
        real sites, a seeded ``torch.Generator`` for reproducible experiments. It must live on
        the device of the model's parameters.
    grad_sample_mode
        One of :data:`GRAD_SAMPLE_MODES`. ``"ghost"`` (ghost / fast gradient clipping, two
        backward passes) needs ``criterion`` and a per-example loss (classification).
        ``"bookkeeping"``: the same clipped sums as ``"hooks"`` in one backward pass without
        per-sample gradient tensors; a model with trainable layers it does not support trains
        in ``"hooks"`` mode instead (logged, naming the layers).
    secure_noise
        Sample the noise with Opacus's floating-point-attack-resistant method: five normal
        draws per parameter per step instead of one (measured: about 0.2 s per step for the
        11M-parameter ResNet-18 on 2 CPU cores, some 20% of a DP epoch at batch 16).
    criterion
        The training loss module (``reduction="mean"``); only used (and then required) for ghost
        clipping.
    sampling_generator
        A CPU generator for the Poisson batches (the data loader runs on the CPU); default
        ``generator``, which must then be a CPU generator.

    Returns
    -------
    PrivateTraining
        The wrapped model, optimizer, Poisson loader and (ghost) criterion.

    Raises
    ------
    ValueError
        A model Opacus cannot train (BatchNorm: the message says to use ``norm="group"``), an
        unknown ``grad_sample_mode``, or non-positive ``noise_multiplier`` / ``max_grad_norm``.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode={grad_sample_mode!r} is invalid. Valid choices: {', '.join(GRAD_SAMPLE_MODES)}."
        )
    if not noise_multiplier > 0:
        raise ValueError(
            f"noise_multiplier={noise_multiplier!r} gives no privacy (epsilon is infinite): "
            "set dp-noise-multiplier > 0 or dp-target-epsilon > 0."
        )
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} is invalid: set dp-max-grad-norm > 0.")
    if grad_sample_mode == "ghost" and criterion is None:
        raise ValueError("grad_sample_mode='ghost' needs the training loss: pass criterion=<loss module>.")
    sampler_rng = sampling_generator if sampling_generator is not None else generator
    if sampler_rng.device.type != "cpu":
        raise ValueError(
            f"the noise generator is on {sampler_rng.device}: pass a CPU sampling_generator for "
            "the Poisson batches (for example secure_generator(device='cpu'))."
        )
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    from medfed.shared.dp_bookkeeping import unsupported_layers

    model.train()
    validate_for_dp(model)
    dp_loader = DPDataLoader.from_data_loader(loader, generator=sampler_rng)
    schedule = poisson_schedule(loader)
    if grad_sample_mode == "bookkeeping":
        unsupported = unsupported_layers(model)
        if not unsupported:
            return _bookkeeping_training(
                model, optimizer, dp_loader, schedule=schedule, noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm, generator=generator, secure_noise=secure_noise,
            )
        logger.warning(
            "dp-grad-sample-mode = 'bookkeeping' does not support the trainable layers %s; using Opacus's "
            "'hooks' mode (same privacy, slower).",
            ", ".join(unsupported),
        )
        grad_sample_mode = "hooks"
    with warnings.catch_warnings():
        # "Secure RNG turned off": medfed passes its own generator and logs its own warning.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    kwargs: dict[str, Any] = {}
    if grad_sample_mode == "ghost":
        kwargs["criterion"] = criterion
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=dp_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,  # dp_loader already samples (with our generator)
        noise_generator=generator,
        grad_sample_mode=grad_sample_mode,
        **kwargs,
    )
    if grad_sample_mode == "ghost":
        dp_model, dp_optimizer, dp_criterion, _ = wrapped
    else:
        dp_model, dp_optimizer, _ = wrapped
        dp_criterion = None
    dp_model.forbid_grad_accumulation()  # as make_private does with poisson_sampling=True
    # make_private used 1 / len(dp_loader) for the expected batch; use the true sample rate.
    dp_optimizer.expected_batch_size = max(1, int(len(dp_loader.dataset) * schedule.sample_rate))
    dp_optimizer.secure_mode = bool(secure_noise)
    return _counted(dp_model, dp_optimizer, dp_loader, criterion=dp_criterion, schedule=schedule)


def _counted(
    dp_model: nn.Module,
    dp_optimizer: DPOptimizer,
    dp_loader: DPDataLoader,
    *,
    criterion: Callable[..., Any] | None,
    schedule: PoissonSchedule,
) -> PrivateTraining:
    """The :class:`PrivateTraining` of these objects, its optimizer counting every noisy step."""
    private = PrivateTraining(
        model=dp_model,
        optimizer=dp_optimizer,
        loader=dp_loader,
        criterion=criterion,
        sample_rate=schedule.sample_rate,
        steps_per_epoch=len(dp_loader),
        noise_multiplier=float(dp_optimizer.noise_multiplier),
        max_grad_norm=float(dp_optimizer.max_grad_norm),
    )
    if private.steps_per_epoch != schedule.steps_per_epoch or dp_loader.sample_rate != schedule.sample_rate:
        raise RuntimeError(
            "Opacus's Poisson loader disagrees with poisson_schedule(): "
            f"{private.steps_per_epoch} vs {schedule.steps_per_epoch} steps per epoch."
        )

    def count_step(_: DPOptimizer) -> None:
        private._steps[0] += 1

    # Replaces the engine's accountant hook: the ledger does the accounting.
    dp_optimizer.attach_step_hook(count_step)
    return private


def _bookkeeping_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dp_loader: DPDataLoader,
    *,
    schedule: PoissonSchedule,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator,
    secure_noise: bool,
) -> PrivateTraining:
    """:func:`make_private_training` with ``grad_sample_mode = "bookkeeping"``
    (:mod:`medfed.shared.dp_bookkeeping`): the same Poisson loader, expected batch size, noise
    and step counting as the Opacus modes, only the clipped sums are computed differently."""
    from medfed.shared.dp_bookkeeping import BookkeepingDPOptimizer, BookkeepingModule

    wrapped = BookkeepingModule(model, loss_reduction="mean")
    dp_optimizer = BookkeepingDPOptimizer(
        optimizer,
        module=wrapped,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=max(1, int(len(dp_loader.dataset) * schedule.sample_rate)),  # type: ignore[arg-type]
        loss_reduction="mean",
        generator=generator,
        secure_mode=bool(secure_noise),
    )
    return _counted(wrapped, dp_optimizer, dp_loader, criterion=None, schedule=schedule)


@functools.lru_cache(maxsize=64)
def noise_for_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier that spends at most ``target_epsilon`` in ``steps`` steps.

    Wraps ``opacus.accountants.utils.get_noise_multiplier`` (binary search, tolerance 0.01), so
    the epsilon after ``steps`` steps is at most ``target_epsilon``. Results are cached per
    process: a simulated site is rebuilt every round, and the search can take seconds.

    Raises
    ------
    ValueError
        Non-positive inputs, or a target too small for any noise multiplier below 1e6.
    """
    if not target_epsilon > 0:
        raise ValueError(f"dp-target-epsilon = {target_epsilon!r} must be > 0 to derive the noise.")
    if steps < 1 or not 0 < sample_rate <= 1:
        raise ValueError(f"need steps >= 1 and sample_rate in (0, 1]; got {steps}, {sample_rate}.")
    _check_accountant(accountant)
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="GDP accounting is experimental")
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
    except ValueError as err:
        raise ValueError(
            f"dp-target-epsilon = {target_epsilon} cannot be reached in {steps} DP-SGD steps at "
            f"sample rate {sample_rate:.4g} ({err}); raise dp-target-epsilon or train fewer "
            "rounds / epochs."
        ) from None


def planned_noise_multiplier(cfg: RunConfig, *, sample_rate: float, steps_per_round: int) -> float:
    """The noise multiplier a site trains ``cfg`` with: ``dp-noise-multiplier``, or with
    ``dp-target-epsilon > 0`` the one that spends that epsilon over all ``num-server-rounds``
    planned rounds of ``steps_per_round`` steps at ``sample_rate`` (:func:`noise_for_target`)."""
    if cfg.dp_target_epsilon > 0:
        return noise_for_target(
            target_epsilon=cfg.dp_target_epsilon,
            delta=cfg.dp_delta,
            sample_rate=sample_rate,
            steps=steps_per_round * cfg.num_server_rounds,
            accountant=cfg.dp_accountant,
        )
    return float(cfg.dp_noise_multiplier)


# --------------------------------------------------------------------------- ledger
@dataclass(frozen=True)
class PrivacyBudget:
    """The most a site lets its training data spend, over all rounds: ``(epsilon, delta)``-DP."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"dp-budget-epsilon = {self.epsilon!r} is invalid: it must be > 0.")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp-delta = {self.delta!r} is invalid: it must lie in (0, 1).")


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD charged to a site's ledger.

    Parameters
    ----------
    round
        Server round (as sent by the server).
    steps
        Noisy optimizer steps taken in the round.
    sample_rate, noise_multiplier
        Poisson sample rate and noise multiplier of those steps.
    epsilon, delta
        Cumulative epsilon after this round, at ``delta``.
    recorded
        Unix time at which the entry was written.
    """

    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float
    delta: float
    recorded: float


class PrivacyLedger:
    """A site's cumulative sample-level privacy loss, persistent across rounds and restarts.

    An Opacus accountant (``"rdp"``, ``"prv"`` or ``"gdp"``) composes every noisy step the
    site has taken; :attr:`entries` keeps one :class:`LedgerEntry` per round for auditing. The
    ledger is saved as JSON (atomic replace) and reloaded by a restarted site, so the epsilon it
    reports is cumulative over everything the site's data has been used for under this ledger.

    Parameters
    ----------
    accountant
        Opacus accounting mechanism.
    path
        The JSON file :meth:`save` writes by default (``None``: give one to :meth:`save`).
    """

    def __init__(self, *, accountant: str = "rdp", path: str | Path | None = None) -> None:
        _check_accountant(accountant)
        self._accountant = _new_accountant(accountant)
        self._entries: list[LedgerEntry] = []
        self.path = Path(path) if path is not None else None

    # ---------------------------------------------------------------- queries
    @property
    def mechanism(self) -> str:
        """The accounting mechanism (``"rdp"``, ``"prv"`` or ``"gdp"``)."""
        return self._accountant.mechanism()

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """One entry per charged round, oldest first."""
        return tuple(self._entries)

    @property
    def total_steps(self) -> int:
        """All noisy steps charged so far."""
        return sum(int(steps) for _, _, steps in self._accountant.history)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` (0 before any step).

        Raises
        ------
        EpsilonError
            ``delta`` outside (0, 1), or the accountant's epsilon is negative, NaN or infinite.
        """
        return _epsilon(self._accountant, delta)

    def projected_epsilon(
        self, *, delta: float, steps: int, sample_rate: float, noise_multiplier: float
    ) -> float:
        """The epsilon after ``steps`` more steps, computed on a deep copy (the ledger is unchanged)."""
        trial = copy.deepcopy(self._accountant)
        _compose(trial, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return _epsilon(trial, delta)

    def would_exceed(
        self, *, budget: PrivacyBudget, steps: int, sample_rate: float, noise_multiplier: float
    ) -> bool:
        """Whether one more round of ``steps`` steps would take the ledger past ``budget``."""
        projected = self.projected_epsilon(
            delta=budget.delta, steps=steps, sample_rate=sample_rate, noise_multiplier=noise_multiplier
        )
        return projected > budget.epsilon

    # ---------------------------------------------------------------- updates
    def record_round(
        self,
        *,
        server_round: int,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        delta: float,
    ) -> LedgerEntry:
        """Charge one round of DP-SGD and return its entry (call :meth:`save` to persist)."""
        if steps < 0:
            raise ValueError(f"steps = {steps} is invalid: it must be >= 0.")
        if steps:
            _compose(self._accountant, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        entry = LedgerEntry(
            round=int(server_round),
            steps=int(steps),
            sample_rate=float(sample_rate),
            noise_multiplier=float(noise_multiplier),
            epsilon=self.epsilon(delta),
            delta=float(delta),
            recorded=time.time(),
        )
        self._entries.append(entry)
        return entry

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the Opacus accountant's ``state_dict()`` and the entries."""
        accountant = self._accountant.state_dict()
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "accountant": {
                "mechanism": accountant["mechanism"],
                "history": [[float(s), float(q), int(n)] for s, q, n in accountant["history"]],
            },
            "entries": [asdict(e) for e in self._entries],
        }

    def load_state_dict(self, state: Mapping[str, Any], *, source: str = "ledger state") -> None:
        """Replace this ledger's state with ``state`` (from :meth:`state_dict`).

        A state recorded with another accounting mechanism is re-composed from its entries with
        this ledger's mechanism (logged).

        Raises
        ------
        LedgerError
            Another format or version, missing fields, or an accountant history whose step count
            disagrees with the entries.
        """
        try:
            if state.get("format") != LEDGER_FORMAT or state.get("version") != LEDGER_VERSION:
                raise LedgerError(
                    f"{source} is not a medfed privacy ledger (format {state.get('format')!r}, "
                    f"version {state.get('version')!r}; expected {LEDGER_FORMAT!r} {LEDGER_VERSION})."
                )
            entries = [LedgerEntry(**entry) for entry in state["entries"]]
            mechanism = state["accountant"]["mechanism"]
            history = [(float(s), float(q), int(n)) for s, q, n in state["accountant"]["history"]]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, LedgerError):
                raise
            raise LedgerError(f"{source} is malformed ({err!r}); restore it from a backup.") from None
        if sum(n for _, _, n in history) != sum(e.steps for e in entries):
            raise LedgerError(
                f"{source} is inconsistent: its accountant holds {sum(n for _, _, n in history)} steps "
                f"but its entries {sum(e.steps for e in entries)}; restore it from a backup."
            )
        accountant = _new_accountant(self.mechanism)
        if mechanism == self.mechanism:
            accountant.load_state_dict({"mechanism": mechanism, "history": history})
        else:
            logger.warning(
                "%s was kept with the %r accountant; re-composing its %d round(s) with %r.",
                source,
                mechanism,
                len(entries),
                self.mechanism,
            )
            for e in entries:
                if e.steps:
                    _compose(accountant, noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
        self._accountant = accountant
        self._entries = entries

    def save(self, path: str | Path | None = None) -> Path:
        """Write the ledger to ``path`` (default :attr:`path`) atomically; return the path.

        The JSON goes to a temporary file in the same folder, is flushed to disk, and replaces
        the old file in one ``os.replace``: a crash leaves either the old or the new ledger.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("PrivacyLedger.save() needs a path (none was given at construction).")
        payload = json.dumps(self.state_dict(), indent=2, sort_keys=True).encode("utf-8")
        write_atomically(target, lambda fh: fh.write(payload))
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | Path, *, accountant: str = "rdp") -> PrivacyLedger:
        """Read a ledger file written by :meth:`save`.

        Raises
        ------
        LedgerError
            The file is missing, not JSON, or not a valid ledger (the message names the file).
        """
        path = Path(path)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LedgerError(f"privacy ledger {path} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LedgerError(
                f"privacy ledger {path} is not valid JSON ({err.__class__.__name__}); restore it "
                "from a backup: never delete a ledger to reset a budget."
            ) from None
        ledger = cls(accountant=accountant, path=path)
        ledger.load_state_dict(state, source=f"privacy ledger {path}")
        return ledger

    @classmethod
    def open(cls, path: str | Path, *, accountant: str = "rdp") -> PrivacyLedger:
        """:meth:`load` the ledger at ``path``, or start an empty one there if the file is absent."""
        path = Path(path)
        if path.exists():
            return cls.load(path, accountant=accountant)
        return cls(accountant=accountant, path=path)


def site_ledger_path(cfg: RunConfig, *, site_index: int) -> Path:
    """Where simulated site ``site_index`` keeps its ledger (a deployed site: :func:`deployment_ledger_path`).

    ``ledger-dir`` set: ``<ledger-dir>/site-<k>.json`` (a real site points this at a folder it
    keeps for good). ``ledger-dir`` empty: ``<run-dir>/ledgers/data-<key>/site-<k>.json``, where
    ``<key>`` hashes the settings that decide which records site ``k`` trains on (dataset,
    image size, synthetic settings, seed, number of sites, partition). A restarted site, and any
    later run on the same records, therefore continue the same ledger; a different split starts
    a new one. No path ever travels in a Flower message: each site derives its own.
    """
    if cfg.ledger_dir:
        return Path(cfg.ledger_dir) / f"site-{site_index}.json"
    return Path(cfg.run_dir) / "ledgers" / f"data-{data_key(cfg)}" / f"site-{site_index}.json"


def deployment_ledger_path(ledger_dir: str | Path, *, datalist: str | Path) -> Path:
    """Where a deployed site keeps the one ledger of its datalist: ``<ledger-dir>/datalist-<key>.json``.

    ``ledger_dir`` is the site's own folder (``ledger-dir`` in its ``site.toml``) and ``<key>``
    is 16 hex digits of the SHA-256 of the datalist's resolved path. Nothing in the run config
    (seed, image size, ``ledger-dir``, ``run-dir``) enters the path: every run and run config
    that trains on this datalist charges the same ledger, so the budget is per patient data,
    not per run. Moving the datalist file starts a new ledger (the site's decision alone).
    """
    identity = str(Path(datalist).expanduser().resolve())
    key = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    return Path(ledger_dir) / f"datalist-{key}.json"


def data_key(cfg: RunConfig) -> str:
    """12 hex digits identifying the records each simulated site trains on (see :func:`site_ledger_path`)."""
    fields = {
        "dataset": cfg.dataset,
        "image-size": cfg.image_size,
        "seed": cfg.seed,
        "synthetic": [cfg.synthetic_task, cfg.synthetic_dims, cfg.synthetic_samples] if cfg.is_synthetic else None,
        "num-sites": cfg.num_sites,
        "partition": cfg.partition,
        "dirichlet-alpha": cfg.dirichlet_alpha if cfg.partition == "dirichlet" else None,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- helpers
def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ValueError(f"dp-accountant = {name!r} is invalid. Valid choices: {', '.join(ACCOUNTANTS)}.")


def _new_accountant(name: str) -> IAccountant:
    from opacus.accountants import create_accountant

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        return create_accountant(mechanism=name)


def _compose(accountant: IAccountant, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
    """Add ``steps`` steps to ``accountant``, exactly as ``steps`` calls of ``accountant.step``."""
    if not noise_multiplier > 0 or not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(
            f"cannot charge steps={steps}, sample_rate={sample_rate}, noise_multiplier={noise_multiplier}: "
            "need steps >= 1, sample_rate in (0, 1] and noise_multiplier > 0."
        )
    entry = (float(noise_multiplier), float(sample_rate))
    history = accountant.history
    if history and tuple(history[-1][:2]) == entry:
        history[-1] = (*entry, int(history[-1][2]) + int(steps))
    elif accountant.mechanism() == "gdp" and history:
        raise ValueError(
            "the 'gdp' accountant cannot compose steps with different noise multipliers or sample "
            f"rates (ledger has {tuple(history[-1][:2])}, this round {entry}); use dp-accountant = 'rdp' or 'prv'."
        )
    else:
        history.append((*entry, int(steps)))


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Opacus's RDP of one sampled-Gaussian step at its default orders (cached: slow for large q)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    rdp.setflags(write=False)
    return rdp


def _epsilon(accountant: IAccountant, delta: float) -> float:
    """``accountant.get_epsilon(delta)``; for RDP the same arithmetic with cached per-step RDP.

    Raises
    ------
    EpsilonError
        ``delta`` outside (0, 1), or an epsilon that is negative, NaN or infinite.
    """
    if not 0 < delta < 1:
        raise EpsilonError(f"dp-delta = {delta!r} is invalid: it must lie in (0, 1).")
    if not accountant.history:
        return 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")  # RDP order at the edge
        if accountant.mechanism() == "rdp":
            # RDPAccountant.get_privacy_spent: sum(compute_rdp(q, sigma, steps, orders)), where
            # compute_rdp(..., steps) is compute_rdp(..., 1) * steps.
            from opacus.accountants import RDPAccountant
            from opacus.accountants.analysis import rdp as rdp_analysis

            rdp = sum(_rdp_per_step(float(q), float(sigma)) * int(steps) for sigma, q, steps in accountant.history)
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
            eps = float(eps)
        else:
            eps = float(accountant.get_epsilon(delta=delta))
    if not math.isfinite(eps) or eps < 0:
        raise EpsilonError(
            f"the {accountant.mechanism()} accountant gives epsilon = {eps!r} at dp-delta = {delta:g}, which is "
            "no privacy guarantee (a negative epsilon comes from a delta far too large for the data). "
            "Set dp-delta well below 1 / (training examples per site), e.g. 1e-5."
        )
    return eps
