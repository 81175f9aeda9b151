"""Initial weights from a local file (``init-weights``): transfer learning without a network.

A run can start its global model from weights trained elsewhere (``medfed pretrain`` on public
data, an earlier medfed run, a MONAI bundle) instead of a random initialisation.
:func:`load_init_weights` reads the file, matches its tensors to a freshly built model by name
and shape, loads those that match and reports the rest:

``loaded``
    Model entries whose name and shape the file has: copied from the file.
``skipped``
    Entries the file has under the same name with another shape (a classification head for
    another number of classes): the model keeps its fresh initialisation.
``new``
    Every model entry not loaded (``skipped`` ones included): newly initialised.
``unused``
    File entries the model has no use for (BatchNorm statistics under ``norm = "group"``, a
    head of another architecture).

Accepted files (never fetched: a local path only)
    * a plain state dict saved with ``torch.save(model.state_dict(), path)``;
    * a medfed checkpoint (``checkpoints/best.pt`` / ``final.pt`` of a run, or ``medfed
      pretrain``'s output: a dict with ``"state_dict"``, ``"config"``, ``"round"``,
      ``"metrics"``), or a run directory holding one (``best.pt`` first);
    * a MONAI bundle folder (``models/model.pt``, as ``medfed export --format bundle`` writes
      it) or that ``model.pt`` itself; a payload ``{"model": state_dict}`` (MONAI's
      ``CheckpointSaver`` with one object) is accepted too.

Keys prefixed by a wrapper (``module.`` from ``DataParallel``, ``_module.`` from Opacus's
``GradSampleModule``, ``model.`` from Lightning-style wrappers) are stripped when that makes more
of them match the model.

Safety
    Files are read with ``torch.load(weights_only=True)``: tensors and plain Python values
    (dicts, lists, strings, numbers, booleans) only, never arbitrary pickled objects, so a
    crafted file cannot run code. medfed checkpoints hold only such values (their ``config`` is
    the kebab-case run config of strings, numbers and booleans) and load this way. A file that
    needs more (a pickled ``nn.Module``) is refused with the fix: save its ``state_dict()``.

Pure PyTorch (no Flower, no MONAI import needed).
"""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfed.shared.config import ConfigError
from medfed.shared.files import file_sha256

__all__ = [
    "InitWeightsError",
    "InitWeightsReport",
    "WRAPPER_PREFIXES",
    "load_init_weights",
    "read_weights_file",
    "resolve_weights_path",
]

logger = logging.getLogger(__name__)

KEY = "init-weights"
"""The run-config key this module serves (quoted in its errors)."""

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_module.", "model.")
"""Key prefixes of wrappers (``DataParallel``, Opacus ``GradSampleModule``, Lightning) that are
stripped when the model's own keys do not have them."""

BUNDLE_WEIGHTS = Path("models") / "model.pt"
"""A MONAI bundle's weights file, relative to the bundle folder."""

_LISTED = 6
"""Names quoted per list in messages before they are abbreviated."""


class InitWeightsError(ConfigError):
    """The ``init-weights`` file cannot initialise the model: the message names the file and the fix."""


@dataclass(frozen=True)
class InitWeightsReport:
    """What :func:`load_init_weights` did.

    Parameters
    ----------
    path
        The weights file read (resolved; a bundle folder or run directory gives its file).
    kind
        ``"state dict"``, ``"medfed checkpoint"`` or ``"MONAI bundle"``.
    sha256
        Hex SHA-256 of the file's bytes (identifies the initialisation in run records).
    stripped_prefix
        The wrapper prefix removed from the file's keys (``""``: none).
    loaded
        Model state entries copied from the file.
    skipped
        ``(name, file shape, model shape)`` of entries the file has with another shape.
    new
        Model state entries left as freshly initialised (``skipped`` ones included).
    unused
        File entries the model has no use for.
    loaded_parameters, model_parameters
        Scalar parameters loaded, and in the whole model (buffers not counted).
    """

    path: str
    kind: str
    sha256: str
    stripped_prefix: str
    loaded: tuple[str, ...]
    skipped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    new: tuple[str, ...]
    unused: tuple[str, ...]
    loaded_parameters: int
    model_parameters: int

    def lines(self) -> list[str]:
        """The report as short lines (counts, then the names of skipped, new and unused entries)."""
        out = [
            f"init-weights: {self.path} ({self.kind}, sha256 {self.sha256[:16]}...)",
            f"  loaded {len(self.loaded)} entries ({self.loaded_parameters:,} of "
            f"{self.model_parameters:,} parameters)"
            + (f"; key prefix {self.stripped_prefix!r} stripped" if self.stripped_prefix else ""),
        ]
        if self.skipped:
            shown = ", ".join(f"{n} {list(f)} -> {list(m)}" for n, f, m in self.skipped[:_LISTED])
            out.append(f"  skipped (shape differs, newly initialised) {len(self.skipped)}: {shown}{_more(self.skipped)}")
        fresh = [n for n in self.new if n not in {s[0] for s in self.skipped}]
        if fresh:
            out.append(f"  newly initialised (not in the file) {len(fresh)}: {', '.join(fresh[:_LISTED])}{_more(fresh)}")
        if self.unused:
            out.append(f"  unused (not in the model) {len(self.unused)}: {', '.join(self.unused[:_LISTED])}{_more(self.unused)}")
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (counts and names; no data)."""
        return {
            "path": self.path,
            "kind": self.kind,
            "sha256": self.sha256,
            "stripped_prefix": self.stripped_prefix,
            "loaded": len(self.loaded),
            "loaded_parameters": self.loaded_parameters,
            "model_parameters": self.model_parameters,
            "skipped": [s[0] for s in self.skipped],
            "new": list(self.new),
            "unused": list(self.unused),
        }


def _more(items: tuple | list) -> str:
    return f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""


def resolve_weights_path(value: str | Path) -> Path:
    """``init-weights`` as a path: ``~`` expanded, relative paths from the working directory (as
    ``dataset``). A folder gives its MONAI bundle weights (``models/model.pt``) or a run's
    ``checkpoints/best.pt`` (else ``final.pt``).

    Raises
    ------
    InitWeightsError
        Nothing there, or a folder with none of those files.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        candidates = [path / BUNDLE_WEIGHTS] + [
            folder / name for name in ("best.pt", "final.pt") for folder in (path / "checkpoints", path)
        ]
        for candidate in candidates:
            if candidate.is_file():
                return candidate.resolve()
        raise InitWeightsError(
            f"{KEY} = {str(value)!r} is a folder without {BUNDLE_WEIGHTS} (a MONAI bundle) or "
            "checkpoints/best.pt (a medfed run). Give the weights file itself, e.g. "
            f"--set {KEY}=PATH/model.pt, or {KEY}='' to start from a random initialisation."
        )
    if not path.is_file():
        raise InitWeightsError(
            f"{KEY} = {str(value)!r}: no such file. Give a local state dict, medfed checkpoint or MONAI "
            f"bundle (--set {KEY}=runs/RUN/checkpoints/best.pt), or {KEY}='' for a random initialisation."
        )
    return path.resolve()


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str, str]:
    """The state dict in a weights file, the file's kind and its SHA-256.

    Parameters
    ----------
    path
        A file or folder as :func:`resolve_weights_path` takes it.

    Returns
    -------
    tuple
        ``(state, kind, sha256)``: tensors by name, ``"state dict"`` / ``"medfed checkpoint"`` /
        ``"MONAI bundle"``, the file's hex digest.

    Raises
    ------
    InitWeightsError
        Unreadable with ``weights_only=True`` (naming the file and the fix), or no tensors in it.
    """
    file = resolve_weights_path(path)
    stat = file.stat()
    return _read_cached(str(file), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read_cached(file: str, mtime_ns: int, size: int) -> tuple[dict[str, torch.Tensor], str, str]:
    del mtime_ns, size  # cache keys only: a rewritten file is read again
    path = Path(file)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise InitWeightsError(
            f"{KEY} = {file!r} cannot be read as tensors and plain values (torch.load weights_only=True: "
            f"{first}). medfed never unpickles arbitrary objects; if the file holds a pickled model, save its "
            "weights instead: torch.save(model.state_dict(), 'weights.pt')."
        ) from None
    in_bundle = path.parent.name == BUNDLE_WEIGHTS.parent.name and path.name == BUNDLE_WEIGHTS.name
    state, kind = _state_of(payload, file=file)
    if kind == "state dict" and in_bundle:
        kind = "MONAI bundle"
    return state, kind, file_sha256(path)


def _state_of(payload: Any, *, file: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of ``payload``: itself, its ``"state_dict"`` (medfed checkpoint) or ``"model"``."""
    if isinstance(payload, Mapping):
        for key, kind in (("state_dict", "medfed checkpoint"), ("model", "state dict")):
            inner = payload.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                if kind == "medfed checkpoint" and "config" not in payload:
                    kind = "state dict"  # a checkpoint of another tool with a "state_dict" entry
                # `medfed pretrain --mode contrastive` keeps the model's freshly built head so the
                # file loads strictly; it names those entries: they are not weights, so they stay new.
                pretrain = payload.get("pretrain") if kind == "medfed checkpoint" else None
                untrained = set(pretrain.get("untrained_keys") or ()) if isinstance(pretrain, Mapping) else set()
                return {str(k): v for k, v in inner.items() if str(k) not in untrained}, kind
        tensors = {str(k): v for k, v in payload.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors, "state dict"
    held = ", ".join(map(str, list(payload)[:_LISTED])) if isinstance(payload, Mapping) else type(payload).__name__
    raise InitWeightsError(
        f"{KEY} = {file!r} holds no model weights (it holds: {held or 'nothing'}). Give a state dict "
        "(torch.save(model.state_dict(), path)), a medfed checkpoint (runs/RUN/checkpoints/best.pt) or a "
        f"MONAI bundle folder ({BUNDLE_WEIGHTS})."
    )


def _strip_prefix(state: Mapping[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` with the wrapper prefix removed that makes the most names match ``model_keys``."""
    best, best_prefix = dict(state), ""
    best_hits = len(model_keys.intersection(state))
    current, prefix = dict(state), ""
    while True:  # strip nested wrappers one at a time (``_module.module.``)
        shared = [p for p in WRAPPER_PREFIXES if current and all(k.startswith(p) for k in current)]
        if not shared:
            break
        prefix += shared[0]
        current = {k[len(shared[0]):]: v for k, v in current.items()}
        hits = len(model_keys.intersection(current))
        if hits > best_hits:
            best, best_prefix, best_hits = current, prefix, hits
    return best, best_prefix


def load_init_weights(model: nn.Module, *, path: str | Path) -> InitWeightsReport:
    """Load the tensors of the weights file at ``path`` into ``model`` wherever name and shape match.

    Parameters
    ----------
    model
        A freshly built model (:func:`medfed.shared.models.build_model`); changed in place.
    path
        A state dict, medfed checkpoint, run directory, MONAI bundle folder or bundle
        ``models/model.pt`` (see the module docstring); never a URL.

    Returns
    -------
    InitWeightsReport
        What was loaded, skipped (shape differs), newly initialised and unused.

    Raises
    ------
    InitWeightsError
        The file cannot be read safely, holds no weights, or matches none of the model's
        parameters by name and shape (another architecture): the message names the file, the
        key ``init-weights``, example names on both sides and the fix.
    """
    state, kind, sha256 = read_weights_file(path)
    file = str(resolve_weights_path(path))
    own = model.state_dict()
    state, prefix = _strip_prefix(state, set(own))
    params = dict(model.named_parameters())
    loaded: list[str] = []
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for name, current in own.items():
        if name not in state:
            continue
        value = state[name]
        if tuple(value.shape) != tuple(current.shape):
            skipped.append((name, tuple(value.shape), tuple(current.shape)))
        elif value.is_floating_point() != current.is_floating_point():
            skipped.append((name, tuple(value.shape), tuple(current.shape)))
        else:
            loaded.append(name)
    loaded_params = [n for n in loaded if n in params]
    if not loaded_params:
        raise InitWeightsError(
            f"{KEY} = {file!r} ({kind}) matches none of the model's parameters by name and shape: it was "
            f"saved from another architecture (the file has {', '.join(list(state)[:3]) or 'no tensors'}...; "
            f"the model expects {', '.join(list(params)[:3])}...). Use weights of the same model and norm "
            f"(--model, --norm as when they were trained), or {KEY}='' to start from a random initialisation."
        )
    with torch.no_grad():
        for name in loaded:
            own[name].copy_(state[name].to(dtype=own[name].dtype))
    report = InitWeightsReport(
        path=file,
        kind=kind,
        sha256=sha256,
        stripped_prefix=prefix,
        loaded=tuple(loaded),
        skipped=tuple(skipped),
        new=tuple(n for n in own if n not in set(loaded)),
        unused=tuple(n for n in state if n not in own),
        loaded_parameters=sum(params[n].numel() for n in loaded_params),
        model_parameters=sum(p.numel() for p in params.values()),
    )
    norm_mismatch = sorted({
        n.rsplit(".", 1)[0] for n in report.unused
        if n.endswith(".running_mean") and n.rsplit(".", 1)[0] + ".weight" in set(loaded)
    })
    if norm_mismatch:
        logger.warning(
            "init-weights: %d BatchNorm layers of %s (e.g. %s) were loaded into normalisation layers of another "
            "kind (same names; their running statistics are unused). Train the weights with the run's --norm "
            "for a faithful start.",
            len(norm_mismatch), file, norm_mismatch[0],
        )
    if report.loaded_parameters < report.model_parameters / 2:
        logger.warning(
            "init-weights: only %d of %d parameters were loaded from %s; most of the model starts from a "
            "random initialisation. Check that --model and --norm match the weights.",
            report.loaded_parameters, report.model_parameters, file,
        )
    return report
