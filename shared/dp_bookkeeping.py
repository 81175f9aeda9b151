"""Exact per-sample clipping without per-sample gradient tensors: book-keeping DP-SGD.

``dp-grad-sample-mode = "bookkeeping"`` (Bu et al., "Differentially private optimization on large
model at small cost", ICML 2023; the ``fastDP`` library's "BK"). One forward pass and one
backward pass, the backward with respect to activations only (the trainable parameters are
detached while the forward pass builds the graph, so autograd computes no parameter gradient).
Every layer with trainable parameters keeps its input ``a`` and its output gradient ``g``
(a tensor hook). After the backward pass, for every sample ``b``:

* each layer's per-sample gradient norm ``||dL_b/dW||^2`` is computed from ``(a_b, g_b)``: for a
  convolution either by materialising the per-sample weight gradient ``g_b a_b^T`` from the
  unfolded input (cheap when the output has many positions) or by the ghost norm
  ``<a_b a_b^T, g_b g_b^T>`` over output positions (cheap when it has few), whichever costs fewer
  multiply-adds for the layer's shapes; for a linear layer ``||g_b||^2 ||a_b||^2``; for GroupNorm /
  LayerNorm / InstanceNorm directly from the normalised input;
* the clip factor ``c_b = min(1, C / (||dL_b/dW|| + 1e-6))`` over all layers (Opacus's formula);
* each layer's clipped sum ``sum_b c_b dL_b/dW`` in one weight-gradient computation with the
  output gradient scaled by ``c`` (for a convolution, PyTorch's own convolution weight-gradient
  kernel), or from the materialised per-sample gradients.

The result is the same clipped sum as Opacus's hooks mode (up to float rounding) without its
``(B, *param.shape)`` per-sample tensors, their zero-fill and copies, or a second backward pass.
Noise, scaling by the expected batch size and the step are Opacus's ``DPOptimizer``'s,
unchanged (same generator, same secure sampling). Layers without a fast path but with an Opacus
grad sampler (``ConvTranspose``, ``Embedding``, grouped convolutions, ...) materialise their
per-sample gradients with that sampler; a model with trainable parameters elsewhere is refused
(:func:`unsupported_layers`; :func:`medfed.shared.privacy.make_private_training` then uses
Opacus's hooks mode and logs why).

Pure PyTorch / Opacus (no Flower).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample.grad_sample_module import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.tensor_utils import unfold3d
from torch import nn

from medfed.shared.opacus_fixes import standard_strides

__all__ = ["BookkeepingDPOptimizer", "BookkeepingModule", "unsupported_layers"]

logger = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def _fast_kind(module: nn.Module) -> str | None:
    """The fast path of ``module`` (``"conv"``, ``"linear"``, ``"norm"``), or ``None``."""
    own = {name for name, _ in module.named_parameters(recurse=False)}
    if not own <= {"weight", "bias"}:
        return None
    if isinstance(module, _CONVS):
        plain = module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
        return "conv" if plain else None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _NORMS):
        return "norm"
    return None


def _has_sampler(module: nn.Module) -> bool:
    return type(module) in GradSampleModule.GRAD_SAMPLERS


def _own_trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def unsupported_layers(model: nn.Module) -> list[str]:
    """``"name (Type)"`` of every module of ``model`` with trainable parameters of its own that
    book-keeping cannot handle (neither a fast path nor an Opacus grad sampler); empty: supported."""
    out = []
    for name, module in model.named_modules():
        if _own_trainable(module) and _fast_kind(module) is None and not _has_sampler(module):
            out.append(f"{name or '<model>'} ({type(module).__name__})")
    return out


@dataclass
class _Layer:
    """A module with trainable parameters and what one forward/backward pass left for it."""

    name: str
    module: nn.Module
    kind: str  # "conv", "linear", "norm" or "sampler"
    params: list[nn.Parameter]
    inputs: tuple[torch.Tensor, ...] | None = None
    grad: torch.Tensor | None = None


class BookkeepingModule(nn.Module):
    """Wraps a model for book-keeping DP-SGD (see the module docstring).

    Train through it as through Opacus's ``GradSampleModule``: ``loss = criterion(wrapped(x), y)``,
    ``loss.backward()``, then :class:`BookkeepingDPOptimizer` ``.step()``. Forward passes without
    gradients (``torch.no_grad``) run the plain model.

    Parameters
    ----------
    module
        The model; every module with trainable parameters of its own must be supported
        (:func:`unsupported_layers` empty). Batch first: inputs ``(B, ...)``.
    loss_reduction
        ``"mean"`` (the loss averages over the batch: output gradients are multiplied by ``B``,
        as Opacus does) or ``"sum"``.

    Raises
    ------
    ValueError
        Unsupported layers (named with their types), or no trainable parameter.
    """

    def __init__(self, module: nn.Module, *, loss_reduction: str = "mean") -> None:
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction = {loss_reduction!r} is invalid. Valid choices: 'mean', 'sum'.")
        bad = unsupported_layers(module)
        if bad:
            raise ValueError(
                "dp-grad-sample-mode = 'bookkeeping' does not support these trainable layers: "
                f"{', '.join(bad)}; use dp-grad-sample-mode = 'hooks'."
            )
        self._module = module
        self.loss_reduction = loss_reduction
        self._layers: list[_Layer] = []
        for name, sub in module.named_modules():
            params = _own_trainable(sub)
            if params:
                self._layers.append(_Layer(name or "<model>", sub, _fast_kind(sub) or "sampler", params))
        if not self._layers:
            raise ValueError("the model has no trainable parameter: nothing to train with DP-SGD.")
        self._handles = [
            layer.module.register_forward_hook(partial(self._forward_hook, layer)) for layer in self._layers
        ]
        self._anchor = torch.zeros((), requires_grad=True)
        self._recording = False
        self._batch_size: int | None = None
        self.ghost_layers: set[str] = set()
        """Names of the convolution / linear layers whose last norms took the ghost-norm path."""

    # ---------------------------------------------------------------- model API
    @property
    def trainable(self) -> list[nn.Parameter]:
        """The trainable parameters, layer by layer."""
        return [p for layer in self._layers for p in layer.params]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model; with gradients enabled, record each layer's input and output gradient."""
        if not torch.is_grad_enabled():
            return self._module(*args, **kwargs)
        if any(layer.grad is not None for layer in self._layers):
            raise RuntimeError(
                "book-keeping DP-SGD: a second forward/backward pass before optimizer.step(); gradient "
                "accumulation over Poisson batches is not allowed (call optimizer.step() after each backward)."
            )
        self.discard()
        params = self.trainable
        for p in params:
            p.requires_grad_(False)  # the graph then gives activation gradients only
        self._recording = True
        try:
            return self._module(*args, **kwargs)
        finally:
            self._recording = False
            for p in params:
                p.requires_grad_(True)

    def _forward_hook(self, layer: _Layer, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not self._recording:
            return None
        if layer.inputs is not None:
            raise RuntimeError(
                f"book-keeping DP-SGD: layer {layer.name} ({type(module).__name__}) ran twice in one forward "
                "pass (shared weights); use dp-grad-sample-mode = 'hooks'."
            )
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(
                f"book-keeping DP-SGD: layer {layer.name} ({type(module).__name__}) returned "
                f"{type(output).__name__}, not a tensor; use dp-grad-sample-mode = 'hooks'."
            )
        layer.inputs = tuple(x.detach() for x in inputs if isinstance(x, torch.Tensor))
        batch = int(layer.inputs[0].shape[0])
        if self._batch_size is None:
            self._batch_size = batch
        elif batch != self._batch_size:
            raise RuntimeError(
                f"book-keeping DP-SGD: layer {layer.name} saw a batch of {batch}, earlier layers {self._batch_size} "
                "(inputs must be batch first); use dp-grad-sample-mode = 'hooks'."
            )
        if not output.requires_grad:  # nothing below this layer trains: let autograd reach its output
            output = output + self._anchor.to(output.device)
        output.register_hook(partial(self._capture, layer))
        return output

    def _capture(self, layer: _Layer, grad: torch.Tensor) -> None:
        if layer.grad is not None:
            raise RuntimeError(
                f"book-keeping DP-SGD: a second backward pass reached layer {layer.name}; call optimizer.step() "
                "after each backward."
            )
        layer.grad = grad.detach()

    def discard(self) -> None:
        """Forget the recorded inputs and output gradients."""
        for layer in self._layers:
            layer.inputs = layer.grad = None
        self._batch_size = None
        self._anchor.grad = None

    def to_standard_module(self) -> nn.Module:
        """Remove the hooks; return the wrapped model (trained in place)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.discard()
        return self._module

    # ---------------------------------------------------------------- clipping
    @torch.no_grad()
    def clipped_sums(self, max_grad_norm: float) -> dict[nn.Parameter, torch.Tensor] | None:
        """``sum_b min(1, C / (||grad_b|| + 1e-6)) grad_b`` for every trainable parameter, from the
        last forward/backward pass (then forgotten); ``None`` if no backward pass was recorded.

        Parameters
        ----------
        max_grad_norm
            The clipping bound ``C``.

        Returns
        -------
        dict or None
            Parameter -> clipped sum, shaped like the parameter.
        """
        layers = [layer for layer in self._layers if layer.grad is not None and layer.inputs is not None]
        if not layers:
            self.discard()
            return None
        batch = int(self._batch_size or 0)
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        sq = torch.zeros(batch, dtype=torch.float64 if layers[0].grad.dtype == torch.float64 else torch.float32,
                         device=layers[0].grad.device)
        finishers: list[Callable[[torch.Tensor], dict[nn.Parameter, torch.Tensor]]] = []
        self.ghost_layers = set()
        for layer in layers:
            g = layer.grad * scale if scale != 1.0 else layer.grad
            layer_sq, finish = _LAYER_RULES[layer.kind](self, layer, layer.inputs, g)
            sq += layer_sq.to(sq.dtype)
            finishers.append(finish)
        factor = (max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for finish in finishers:
            sums.update(finish(factor))
        self.discard()
        return sums


# --------------------------------------------------------------------------- per-layer rules
# Each rule returns (per-sample squared norm over the layer's trainable parameters, shape (B,),
# and a function of the clip factors (B,) giving the layer's clipped sums).
_Rule = Callable[[BookkeepingModule, _Layer, tuple[torch.Tensor, ...], torch.Tensor],
                 tuple[torch.Tensor, Callable[[torch.Tensor], dict[nn.Parameter, torch.Tensor]]]]


def _weighted(factor: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``sum_b factor_b per_sample_b`` for ``per_sample`` ``(B, ...)``."""
    return (factor.to(per_sample.dtype) @ per_sample.reshape(per_sample.shape[0], -1)).reshape(per_sample.shape[1:])


def _norms_of_products(a: torch.Tensor, g: torch.Tensor, *, name: str, owner: BookkeepingModule) -> tuple[
        torch.Tensor, torch.Tensor | None]:
    """Per-sample ``||g_b^T a_b||_F^2`` for ``a`` ``(B, T, D)`` and ``g`` ``(B, T, O)``.

    Returns the squared norms ``(B,)`` and the per-sample products ``(B, O, D)`` when they were
    materialised (``None`` after the ghost norm ``<a_b a_b^T, g_b g_b^T>``), whichever costs
    fewer multiply-adds: ``T^2 (D + O)`` against ``T D O`` per sample.
    """
    t, d, o = a.shape[1], a.shape[2], g.shape[2]
    if t * (d + o) < d * o:
        owner.ghost_layers.add(name)
        aa = torch.bmm(a, a.transpose(1, 2))
        gg = torch.bmm(g, g.transpose(1, 2))
        return (aa * gg).sum(dim=(1, 2)), None
    per_sample = torch.bmm(g.transpose(1, 2), a)
    return per_sample.pow(2).sum(dim=(1, 2)), per_sample


def _conv_rule(owner: BookkeepingModule, layer: _Layer, inputs: tuple[torch.Tensor, ...], g: torch.Tensor):  # type: ignore[no-untyped-def]
    conv = layer.module
    x = inputs[0].to(g.dtype)
    n, out_ch = g.shape[0], g.shape[1]
    weight, bias = conv.weight, conv.bias
    sq = torch.zeros(n, dtype=g.dtype, device=g.device)
    per_sample_w = None
    g_flat = g.reshape(n, out_ch, -1)  # (B, O, T)
    if weight.requires_grad:
        patches = _unfold(conv, x)  # (B, D, T)
        w_sq, per_sample_w = _norms_of_products(
            patches.transpose(1, 2), g_flat.transpose(1, 2), name=layer.name, owner=owner
        )
        sq += w_sq
    per_sample_b = None
    if bias is not None and bias.requires_grad:
        per_sample_b = g_flat.sum(dim=2)
        sq += per_sample_b.pow(2).sum(dim=1)

    def finish(factor: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = {}
        if weight.requires_grad:
            if per_sample_w is not None:
                out[weight] = _weighted(factor, per_sample_w).reshape(weight.shape)
            else:
                scaled = g * factor.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
                out[weight] = torch.ops.aten.convolution_backward(
                    scaled, x, weight, None, list(conv.stride), list(conv.padding), list(conv.dilation),
                    False, [0] * (x.dim() - 2), conv.groups, [False, True, False],
                )[1]
        if per_sample_b is not None:
            out[bias] = _weighted(factor, per_sample_b)
        return out

    return sq, finish


def _unfold(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches a convolution multiplies: ``(B, C_in * prod(kernel), positions)``."""
    if isinstance(conv, nn.Conv2d):
        return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    if isinstance(conv, nn.Conv1d):
        return F.unfold(x.unsqueeze(2), (1, conv.kernel_size[0]), dilation=(1, conv.dilation[0]),
                        padding=(0, conv.padding[0]), stride=(1, conv.stride[0]))
    return unfold3d(standard_strides(x), kernel_size=conv.kernel_size, padding=conv.padding, stride=conv.stride,
                    dilation=conv.dilation)


def _linear_rule(owner: BookkeepingModule, layer: _Layer, inputs: tuple[torch.Tensor, ...], g: torch.Tensor):  # type: ignore[no-untyped-def]
    lin = layer.module
    x = inputs[0].to(g.dtype)
    n = g.shape[0]
    a3 = x.reshape(n, -1, x.shape[-1])  # (B, T, D)
    g3 = g.reshape(n, -1, g.shape[-1])  # (B, T, O)
    weight, bias = lin.weight, lin.bias
    sq = torch.zeros(n, dtype=g.dtype, device=g.device)
    per_sample_w = None
    if weight.requires_grad:
        if a3.shape[1] == 1:
            sq += g3[:, 0].pow(2).sum(1) * a3[:, 0].pow(2).sum(1)
        else:
            w_sq, per_sample_w = _norms_of_products(a3, g3, name=layer.name, owner=owner)
            sq += w_sq
    per_sample_b = None
    if bias is not None and bias.requires_grad:
        per_sample_b = g3.sum(dim=1)
        sq += per_sample_b.pow(2).sum(dim=1)

    def finish(factor: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = {}
        if weight.requires_grad:
            if per_sample_w is not None:
                out[weight] = _weighted(factor, per_sample_w)
            else:
                scaled = g3 * factor.to(g.dtype).reshape(-1, 1, 1)
                out[weight] = scaled.reshape(-1, g3.shape[-1]).t() @ a3.reshape(-1, a3.shape[-1])
        if per_sample_b is not None:
            out[bias] = _weighted(factor, per_sample_b)
        return out

    return sq, finish


def _norm_rule(owner: BookkeepingModule, layer: _Layer, inputs: tuple[torch.Tensor, ...], g: torch.Tensor):  # type: ignore[no-untyped-def]
    norm = layer.module
    x = inputs[0].to(g.dtype)
    n = g.shape[0]
    if isinstance(norm, nn.GroupNorm):
        normalised = F.group_norm(x, norm.num_groups, eps=norm.eps)
        reduce: tuple[int, ...] = tuple(range(2, g.dim()))
    elif isinstance(norm, nn.LayerNorm):
        normalised = F.layer_norm(x, norm.normalized_shape, eps=norm.eps)
        reduce = tuple(range(1, g.dim() - len(norm.normalized_shape)))
    else:
        normalised = F.instance_norm(x, eps=norm.eps)
        reduce = tuple(range(2, g.dim()))
    per_sample: dict[nn.Parameter, torch.Tensor] = {}
    if norm.weight is not None and norm.weight.requires_grad:
        gw = g * normalised
        per_sample[norm.weight] = gw.sum(dim=reduce) if reduce else gw
    if norm.bias is not None and norm.bias.requires_grad:
        per_sample[norm.bias] = g.sum(dim=reduce) if reduce else g
    sq = torch.zeros(n, dtype=g.dtype, device=g.device)
    for p, ps in per_sample.items():
        sq += ps.reshape(n, -1).pow(2).sum(1)

    def finish(factor: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return {p: _weighted(factor, ps).reshape(p.shape) for p, ps in per_sample.items()}

    return sq, finish


def _sampler_rule(owner: BookkeepingModule, layer: _Layer, inputs: tuple[torch.Tensor, ...], g: torch.Tensor):  # type: ignore[no-untyped-def]
    """Any layer with an Opacus grad sampler: materialise its per-sample gradients."""
    sampler = GradSampleModule.GRAD_SAMPLERS[type(layer.module)]
    per_sample = {p: ps for p, ps in sampler(layer.module, list(inputs), g).items() if p.requires_grad}
    n = g.shape[0]
    sq = torch.zeros(n, dtype=g.dtype, device=g.device)
    for ps in per_sample.values():
        sq += ps.reshape(n, -1).pow(2).sum(1).to(g.dtype)

    def finish(factor: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return {p: _weighted(factor, ps).reshape(p.shape) for p, ps in per_sample.items()}

    return sq, finish


_LAYER_RULES: dict[str, _Rule] = {
    "conv": _conv_rule,
    "linear": _linear_rule,
    "norm": _norm_rule,
    "sampler": _sampler_rule,
}


# --------------------------------------------------------------------------- optimizer
class BookkeepingDPOptimizer(DPOptimizer):
    """Opacus's ``DPOptimizer`` taking its clipped sums from a :class:`BookkeepingModule`.

    Noise (``noise_multiplier * max_grad_norm`` from ``generator``, Opacus's secure sampling with
    ``secure_mode``), the division by ``expected_batch_size``, the skip signal of Opacus's
    ``BatchMemoryManager`` and the step hooks are ``DPOptimizer``'s. A step without a recorded
    backward pass (an empty Poisson batch) noises a zero sum.

    Parameters
    ----------
    optimizer
        The optimizer over the module's trainable parameters.
    module
        The :class:`BookkeepingModule` whose backward passes feed this optimizer.
    **kwargs
        ``DPOptimizer``'s (``noise_multiplier``, ``max_grad_norm``, ``expected_batch_size``,
        ``loss_reduction``, ``generator``, ``secure_mode``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, module: BookkeepingModule, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.bookkeeping = module
        missing = {id(p) for p in self.params} - {id(p) for p in module.trainable}
        if missing:
            raise ValueError(
                f"{len(missing)} optimizer parameter(s) belong to no trainable layer of the wrapped model; "
                "give the optimizer the model's trainable parameters."
            )

    @property
    def accumulated_iterations(self) -> int:
        """Always 1: book-keeping forbids gradient accumulation over Poisson batches."""
        return 1

    def clip_and_accumulate(self) -> None:
        """Add the last backward pass's clipped sums to ``p.summed_grad`` (zeros if there was none)."""
        sums = self.bookkeeping.clipped_sums(self.max_grad_norm) or {}
        for p in self.params:
            grad = sums.get(p)
            if grad is None:
                grad = torch.zeros_like(p)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:  # type: ignore[override]
        """Clip (book-keeping), then ``DPOptimizer``'s noise, scaling and step hooks."""
        if not self.params:
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        """``DPOptimizer.zero_grad``; also forgets an unused recorded pass."""
        super().zero_grad(set_to_none)
        if not self._is_last_step_skipped:
            self.bookkeeping.discard()

