"""Resuming a run whose server process died: the state saved after every completed round.

After each round the server writes ``<run dir>/checkpoints/resume.pt`` (atomically, after the
round's line in ``metrics.jsonl``) with everything the next round depends on at the server:

* the round number and the global weights (the exact arrays, dtypes kept);
* the state of every strategy in the wrapper chain, outermost first: FedAdam / FedOpt's
  ``current_weights`` and moments ``m_t`` / ``v_t``, the adaptive clipping norm and the
  client-level privacy accountant of the client-DP wrappers, SecAgg+'s stop flag, and the
  recording strategy's best round and score (see :func:`chain_state`);
* the server process's random state (Python, NumPy, torch: client sampling, server-side DP
  noise);
* the run-store run id, so the resumed process records into the same run.

The sites need nothing from it: a site's round ``r`` depends only on the run's seed, the site,
``r`` (``medfed.shared.task.site_seed``; the learning rate also follows ``r``) and the weights it is
sent, and each site keeps its own privacy ledger on disk (``medfed.shared.privacy.site_ledger_path``),
which the resumed run, having the same config, uses again.

``resume = "<run dir>"`` (``medfed simulate --resume DIR``) checks the directory with
:func:`resume_point` and the server continues from the saved round (``medfed.server.server_app``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import NDArrays
from flwr.server.strategy import DifferentialPrivacyClientSideAdaptiveClipping, FedOpt, Strategy

from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.config_sources import Layer, ResolvedConfig, mapping_layer, resolve_config
from medfed.shared.files import write_atomically

__all__ = [
    "RESUME_FILE",
    "RESUMABLE_STATUSES",
    "ResumeError",
    "ResumePoint",
    "ResumeState",
    "capture_rng",
    "chain_state",
    "config_of_run",
    "resolve_run_config",
    "read_resume_state",
    "state_arrays",
    "state_tensors",
    "restore_chain_state",
    "restore_rng",
    "resume_point",
    "run_status",
    "write_resume_state",
    "strategy_chain",
]

logger = logging.getLogger(__name__)

RESUME_FILE = Path("checkpoints") / "resume.pt"
"""Where the resume state lives inside a run directory."""
RESUME_FORMAT = "medfed-resume"
RESUME_VERSION = 1
UNCHECKED_KEYS = ("resume", "app-signature")
"""Run-config keys a resumed run may change (every other key must equal the run's own)."""


class ResumeError(ConfigError):
    """A run cannot be resumed (the message names the directory or file and what to do)."""


@dataclass
class ResumeState:
    """What the server saved after round :attr:`round`.

    Parameters
    ----------
    round
        The last completed round (0: only the initial model was evaluated).
    weights
        The global model after that round, one array per state entry (shapes of the model's
        ``state_dict``).
    strategies
        :func:`chain_state` of the strategy chain, outermost first.
    rng
        :func:`capture_rng` of the server process.
    run_id
        The run-store run id (``None`` with ``store = "off"``).
    saved
        Unix time of the save.
    """

    round: int
    weights: NDArrays
    strategies: list[dict[str, Any]]
    rng: dict[str, Any]
    run_id: str | None = None
    saved: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ResumePoint:
    """A checked run directory to resume: its path and saved state."""

    path: Path
    state: ResumeState


# --------------------------------------------------------------------------- random state
def capture_rng() -> dict[str, Any]:
    """The process's Python, NumPy (legacy global) and torch CPU random states."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {**np_state["state"], "key": [int(k) for k in np_state["state"]["key"]]}},
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned."""
    random.setstate(_as_tuple(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------- strategy state
def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """``strategy`` and every strategy it wraps (attribute ``strategy``), outermost first."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)  # type: ignore[attr-defined]
    return chain


def _state_of(strategy: Strategy) -> dict[str, Any]:
    own = getattr(strategy, "resume_state", None)
    if callable(own):  # medfed's wrappers (recording, SecAgg+, accounted client DP) say themselves
        return own()
    out: dict[str, Any] = {}
    if isinstance(strategy, FedOpt):
        out["current_weights"] = state_tensors(strategy.current_weights)
        out["m_t"] = state_tensors(strategy.m_t) if strategy.m_t else None
        out["v_t"] = state_tensors(strategy.v_t) if strategy.v_t else None
    if isinstance(strategy, DifferentialPrivacyClientSideAdaptiveClipping):
        out["clipping_norm"] = float(strategy.clipping_norm)
    return out


def chain_state(strategy: Strategy) -> list[dict[str, Any]]:
    """``[{"class": name, "state": {...}}, ...]`` for :func:`strategy_chain`, outermost first.

    Flower's stateless strategies (FedAvg, FedProx, fixed clipping) have an empty state; a
    strategy with a ``resume_state()`` method (medfed's wrappers) gives its own.
    """
    return [{"class": type(s).__name__, "state": _state_of(s)} for s in strategy_chain(strategy)]


def restore_chain_state(strategy: Strategy, states: list[dict[str, Any]], *, source: str) -> None:
    """Load :func:`chain_state` output back into a freshly built chain of the same classes.

    Raises
    ------
    ResumeError
        If the chain's classes differ from the saved ones (naming both).
    """
    chain = strategy_chain(strategy)
    saved = [entry["class"] for entry in states]
    built = [type(s).__name__ for s in chain]
    if saved != built:
        raise ResumeError(
            f"{source} was saved by the strategy chain {' > '.join(saved)} but this run builds "
            f"{' > '.join(built)}: resume with the run's own config."
        )
    for s, entry in zip(chain, states, strict=True):
        state = entry["state"]
        own = getattr(s, "load_resume_state", None)
        if callable(own):
            own(state)
            continue
        if isinstance(s, FedOpt):
            s.current_weights = state_arrays(state["current_weights"])
            s.m_t = state_arrays(state["m_t"]) if state["m_t"] is not None else None
            s.v_t = state_arrays(state["v_t"]) if state["v_t"] is not None else None
        if isinstance(s, DifferentialPrivacyClientSideAdaptiveClipping):
            s.clipping_norm = float(state["clipping_norm"])


def state_tensors(arrays: NDArrays) -> list[torch.Tensor]:
    """Arrays as CPU tensors (exact, dtype kept) so the file loads with ``weights_only=True``.

    A writable, C-contiguous array is shared, not copied (the tensors only live until the file is
    written); any other array (read-only, strided) is copied.
    """
    return [
        torch.from_numpy(a) if a.flags.writeable and a.flags.c_contiguous else torch.from_numpy(np.array(a, copy=True))
        for a in map(np.asarray, arrays)
    ]


def state_arrays(tensors: list[torch.Tensor]) -> NDArrays:
    """The inverse of :func:`state_tensors`."""
    return [t.numpy().copy() for t in tensors]


# --------------------------------------------------------------------------- the file
def write_resume_state(run_dir: str | Path, state: ResumeState) -> Path:
    """Write ``<run_dir>/checkpoints/resume.pt`` atomically (temporary file, fsync, replace)."""
    target = Path(run_dir) / RESUME_FILE
    payload = {
        "format": RESUME_FORMAT,
        "version": RESUME_VERSION,
        "round": int(state.round),
        "weights": state_tensors(state.weights),
        "strategies": state.strategies,
        "rng": state.rng,
        "run_id": state.run_id,
        "saved": float(state.saved),
    }
    return write_atomically(target, lambda fh: torch.save(payload, fh))


def read_resume_state(run_dir: str | Path) -> ResumeState:
    """Read the state :func:`write_resume_state` wrote (``torch.load(weights_only=True)``).

    Raises
    ------
    ResumeError
        The file is missing, unreadable or of another format (the message names it).
    """
    path = Path(run_dir) / RESUME_FILE
    if not path.exists():
        raise ResumeError(
            f"{path} does not exist: this run saved no resume state (it died before its initial "
            "model was evaluated, or was started by a medfed without resume support). Start a new run."
        )
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ResumeError(f"{path} cannot be read ({err.__class__.__name__}); start a new run.") from None
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT or payload.get("version") != RESUME_VERSION:
        raise ResumeError(f"{path} is not a medfed resume state of version {RESUME_VERSION}; start a new run.")
    return ResumeState(
        round=int(payload["round"]),
        weights=state_arrays(payload["weights"]),
        strategies=list(payload["strategies"]),
        rng=dict(payload["rng"]),
        run_id=payload["run_id"],
        saved=float(payload["saved"]),
    )


# --------------------------------------------------------------------------- checks
def config_of_run(run_dir: str | Path) -> RunConfig:
    """The run config stored in ``<run_dir>/config.json``, with ``resume`` set to ``run_dir``.

    Raises
    ------
    ResumeError
        No such directory, or no readable ``config.json`` in it.
    """
    return resolve_run_config(run_dir).config


def resolve_run_config(run_dir: str | Path) -> ResolvedConfig:
    """:func:`config_of_run` with each key's source (``file <run_dir>/config.json``, ``flag --resume``).

    Raises
    ------
    ResumeError
        No such directory, or no readable ``config.json`` in it.
    """
    run_dir = Path(run_dir)
    stored = _stored_config(run_dir)
    return resolve_config(
        mapping_layer(stored, source=f"file {run_dir / 'config.json'}"),
        Layer(values={"resume": str(run_dir)}, source="flag --resume"),
    )


def _stored_config(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise ResumeError(
            f"resume = {str(run_dir)!r}: no such run directory. Give the folder a run printed as "
            "its 'run directory' (e.g. runs/<time>-fedavg-s0)."
        )
    path = run_dir / "config.json"
    try:
        meta = json.loads(path.read_text())
        stored = dict(meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResumeError(
            f"{path} cannot be read ({err.__class__.__name__}): {run_dir} is not a medfed run directory."
        ) from None
    if meta.get("mode") != "federated":
        raise ResumeError(f"{run_dir} holds a {meta.get('mode')!r} run; only federated runs can be resumed.")
    return stored


RESUMABLE_STATUSES: tuple[str | None, ...] = (None, "interrupted", "failed")
"""Run statuses a run can be resumed from (``None``: no ``summary.json``, the process died)."""


def run_status(run_dir: str | Path) -> str | None:
    """The ``"status"`` of ``run_dir``'s ``summary.json``: ``None`` without one (running, or the
    process died), ``"finished"`` for a summary written before statuses existed."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unreadable"
    return str(data.get("status", "finished")) if isinstance(data, dict) else "unreadable"


def resume_point(cfg: RunConfig) -> ResumePoint:
    """Check that ``cfg.resume`` can be continued with ``cfg`` and load its state.

    Raises
    ------
    ResumeError
        No such run directory; the run already finished (a ``summary.json`` whose status is
        not ``"interrupted"`` or ``"failed"``); ``cfg``
        differs from the run's own config in a key other than ``resume`` / ``app-signature``
        (naming the keys and both values); no or an unreadable resume state; a saved round
        beyond ``num-server-rounds``.
    """
    run_dir = Path(cfg.resume)
    stored = _stored_config(run_dir)
    source = str(run_dir / "config.json")
    own = resolve_config(
        mapping_layer({k: v for k, v in stored.items() if k not in UNCHECKED_KEYS}, source=f"file {source}"),
        check_model=False,
    ).config
    differing = [
        f"{f.name.replace('_', '-')} = {getattr(cfg, f.name)!r} (the run has {getattr(own, f.name)!r})"
        for f in fields(RunConfig)
        if f.name.replace("_", "-") not in UNCHECKED_KEYS and getattr(cfg, f.name) != getattr(own, f.name)
    ]
    if differing:
        raise ResumeError(
            f"cannot resume {run_dir} with a different config: {'; '.join(differing)}. A resumed run "
            f"must use the run's own config ({source}); `medfed simulate --resume DIR` reads it."
        )
    status = run_status(run_dir)
    if status not in RESUMABLE_STATUSES:
        raise ResumeError(f"{run_dir} already finished (its summary.json says {status!r}): there is nothing to resume.")
    state = read_resume_state(run_dir)
    if state.round > cfg.num_server_rounds:
        raise ResumeError(
            f"{run_dir / RESUME_FILE} is at round {state.round}, beyond num-server-rounds = {cfg.num_server_rounds}."
        )
    logger.info("resuming %s after round %d of %d", run_dir.name, state.round, cfg.num_server_rounds)
    return ResumePoint(path=run_dir, state=state)
