"""Fine-tuning modes (``trainable``): which parameters local training updates.

Starting from a pretrained model (``init-weights``), DP-SGD often does better when it updates
fewer parameters: the noise added per step has the dimension of the trainable parameters, and
per-sample gradients are only computed for them (Opacus's ``GradSampleModule`` hooks only the
modules with trainable parameters, and autograd does not go below the first of them). The modes:

``"all"``
    Every parameter trains (the default).
``"head"``
    Only the model's head (its classifier).
``"last-block+head"``
    The last feature block and the head.
``"norm+head"``
    The affine parameters of every normalisation layer (GroupNorm, InstanceNorm, LayerNorm,
    BatchNorm) and the head.

The head and last block of each model are named in its registry entry
(:class:`medfed.shared.models.ModelSpec` ``head`` / ``last_block``). Frozen parameters get
``requires_grad = False`` and are left out of the optimizer; they still travel with the model
(the server averages unchanged values). The privacy accounting (sample rate, steps, noise
multiplier) does not depend on the mode. Pure PyTorch (no Flower).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from medfed.shared.config import TRAINABLE_MODES, ConfigError
from medfed.shared.models import MODELS, ModelSpec

__all__ = ["TRAINABLE_MODES", "TrainableReport", "apply_trainable", "check_trainable", "trainable_parameters"]

logger = logging.getLogger(__name__)

_NORMS: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.batchnorm._BatchNorm,
)


@dataclass(frozen=True)
class TrainableReport:
    """What :func:`apply_trainable` left trainable.

    Parameters
    ----------
    mode
        The ``trainable`` mode.
    trainable, total
        Scalar parameters that train, and in the whole model.
    tensors
        Names of the parameters that train.
    """

    mode: str
    trainable: int
    total: int
    tensors: tuple[str, ...]

    def line(self) -> str:
        """One line for logs and ``--dry-run``."""
        share = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"trainable = {self.mode}: {self.trainable:,} of {self.total:,} parameters ({share:.1f}%) "
            f"in {len(self.tensors)} tensors train"
        )


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _norm_parameters(model: nn.Module) -> set[str]:
    out: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _NORMS):
            out.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False))
    return out


_SELECTORS: dict[str, Callable[[nn.Module, ModelSpec], Callable[[str], bool]]] = {
    "all": lambda model, spec: lambda name: True,
    "head": lambda model, spec: lambda name: _under(name, spec.head),
    "last-block+head": lambda model, spec: lambda name: _under(name, spec.head + spec.last_block),
    "norm+head": lambda model, spec: (lambda norms: lambda name: name in norms or _under(name, spec.head))(
        _norm_parameters(model)
    ),
}
"""Mode -> (model, its registry entry) -> whether a parameter name trains."""

if tuple(_SELECTORS) != TRAINABLE_MODES:  # pragma: no cover - a developer error
    raise RuntimeError("medfed.shared.trainable and shared.config.TRAINABLE_MODES disagree.")


def check_trainable(*, mode: str, model_name: str) -> ModelSpec:
    """The registry entry of ``model_name`` after checking it defines what ``mode`` needs.

    Raises
    ------
    ConfigError
        An unknown mode (listing the valid ones), or a model without a head (or last block)
        definition, naming the model, the key ``trainable`` and the fix.
    """
    if mode not in _SELECTORS:
        valid = ", ".join(repr(m) for m in _SELECTORS)
        raise ConfigError(f"trainable = {mode!r} is invalid. Valid choices: {valid}.")
    spec = MODELS.get(model_name)
    if spec is None:
        raise ConfigError(f"model = {model_name!r} is not registered; `medfed models` lists the models.")
    if mode == "all":
        return spec
    needs = [("head", spec.head)] + ([("last block", spec.last_block)] if mode == "last-block+head" else [])
    missing = [what for what, names in needs if not names]
    if missing:
        defined = [n for n, s in MODELS.items() if s.head and (s.last_block or mode != "last-block+head")]
        raise ConfigError(
            f"trainable = {mode!r} needs the {' and '.join(missing)} of model = {model_name!r}, which medfed "
            f"does not define. Use trainable = 'all' (--set trainable=all), or a model that defines it: "
            f"{', '.join(defined)}."
        )
    return spec


def apply_trainable(model: nn.Module, *, mode: str, model_name: str) -> TrainableReport:
    """Freeze the parameters of ``model`` that ``mode`` does not train (in place).

    Parameters
    ----------
    model
        A model built by :func:`medfed.shared.models.build_model` for ``model_name`` (not wrapped
        by Opacus yet).
    mode
        One of :data:`TRAINABLE_MODES`.
    model_name
        Its registry name (which defines its head and last block).

    Returns
    -------
    TrainableReport
        The parameters that train. Parameters the builder had frozen already (unused
        cross-attention norms of the ViT) stay frozen in every mode.

    Raises
    ------
    ConfigError
        As :func:`check_trainable`; or the mode selects no parameter of this model (its
        registry names do not match the built model).
    """
    spec = check_trainable(mode=mode, model_name=model_name)
    keep = _SELECTORS[mode](model, spec)
    names: list[str] = []
    for name, param in model.named_parameters():
        if not keep(name):
            param.requires_grad_(False)
        elif param.requires_grad:
            names.append(name)
    if not names:
        raise ConfigError(
            f"trainable = {mode!r} selects no parameter of model = {model_name!r} (its head {spec.head} and last "
            f"block {spec.last_block} name no module of the built model). Use trainable = 'all'."
        )
    report = TrainableReport(
        mode=mode,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in model.parameters()),
        tensors=tuple(names),
    )
    logger.debug("%s (%s)", report.line(), model_name)  # a simulated site is rebuilt every round
    return report


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that train (``requires_grad``), in ``model.parameters()`` order:
    what the optimizer gets and what FedProx anchors."""
    return [p for p in model.parameters() if p.requires_grad]
