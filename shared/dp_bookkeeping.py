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
from dataclasses import dataclass, field
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
    book-keeping cannot handle (neither a fast path nor an Opacus grad sampler, or a parameter
    shared with another module); empty: supported."""
    out = []
    owners: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        label = f"{name or '<model>'} ({type(module).__name__})"
        params = _own_trainable(module)
        if params and _fast_kind(module) is None and not _has_sampler(module):
            out.append(label)
        for p in params:
            if id(p) in owners and owners[id(p)] != label:
                out.append(f"{label}, which shares a parameter with {owners[id(p)]}")
            owners.setdefault(id(p), label)
    return out


@dataclass
class _Call:
    """One call of a layer: its tensor inputs and, after the backward pass, its output gradient."""

    inputs: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    grad: torch.Tensor | None = None


@dataclass
class _Layer:
    """A module with trainable parameters and what one forward/backward pass left for it."""

    name: str
    module: nn.Module
    kind: str  # "conv", "linear", "norm" or "sampler"
    params: list[nn.Parameter]
    calls: list[_Call] = field(default_factory=list)
    """One entry per call in the last forward pass (several: shared weights)."""


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
        if self._has_grads():
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

    def _has_grads(self) -> bool:
        return any(call.grad is not None for layer in self._layers for call in layer.calls)

    def _forward_hook(self, layer: _Layer, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not self._recording:
            return None
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(
                f"book-keeping DP-SGD: layer {layer.name} ({type(module).__name__}) returned "
                f"{type(output).__name__}, not a tensor; use dp-grad-sample-mode = 'hooks'."
            )
        tensors = tuple(x for x in inputs if isinstance(x, torch.Tensor))
        call = _Call(tuple(x.detach() for x in tensors), tuple(x._version for x in tensors))
        layer.calls.append(call)
        batch = int(call.inputs[0].shape[0])
        if self._batch_size is None:
            self._batch_size = batch
        elif batch != self._batch_size:
            raise RuntimeError(
                f"book-keeping DP-SGD: layer {layer.name} saw a batch of {batch}, earlier layers {self._batch_size} "
                "(inputs must be batch first); use dp-grad-sample-mode = 'hooks'."
            )
        if not output.requires_grad:  # nothing below this layer trains: let autograd reach its output
            output = output + self._anchor.to(output.device)
        output.register_hook(partial(self._capture, layer, call))
        return output

    @staticmethod
    def _capture(layer: _Layer, call: _Call, grad: torch.Tensor) -> None:
        if call.grad is not None:
            raise RuntimeError(
                f"book-keeping DP-SGD: a second backward pass reached layer {layer.name}; call optimizer.step() "
                "after each backward."
            )
        call.grad = grad.detach()

    def discard(self) -> None:
        """Forget the recorded inputs and output gradients."""
        for layer in self._layers:
            layer.calls = []
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
        batch = int(self._batch_size or 0)
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        # Per layer, the calls whose output reached the loss (a call without gradient adds nothing).
        work = [(layer, [(c.inputs, c.grad * scale if scale != 1.0 else c.grad) for c in layer.calls
                         if c.grad is not None]) for layer in self._layers]
        work = [(layer, calls) for layer, calls in work if calls]
        for layer in self._layers:
            for call in layer.calls:
                if tuple(x._version for x in call.inputs) != call.versions:
                    raise RuntimeError(
                        f"book-keeping DP-SGD: the input of layer {layer.name} ({type(layer.module).__name__}) "
                        "was modified in place after the layer used it; use dp-grad-sample-mode = 'hooks' or "
                        "an out-of-place operation."
                    )
        if not work:
            self.discard()
            return None
        first = work[0][1][0][1]
        sq = torch.zeros(batch, dtype=torch.float64 if first.dtype == torch.float64 else torch.float32,
                         device=first.device)
        finishers: list[Callable[[torch.Tensor], dict[nn.Parameter, torch.Tensor]]] = []
        self.ghost_layers = set()
        for layer, calls in work:
            layer_sq, finish = _LAYER_RULES[layer.kind](self, layer, calls)
            sq += layer_sq.to(sq.dtype)
            finishers.append(finish)
        factor = (max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for finish in finishers:
            sums.update(finish(factor))
        self.discard()
        return sums


# --------------------------------------------------------------------------- per-layer rules
# Each rule gets a layer's calls as (inputs, output gradient scaled to per-sample losses) and
# returns the per-sample squared norm over the layer's trainable parameters, shape (B,), and a
# function of the clip factors (B,) giving the layer's clipped sums. A layer called several
# times (shared weights) has per-sample gradients summed over its calls: its positions are
# concatenated (convolution, linear) or its per-sample gradients added (norms, grad samplers).
_Calls = list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]
_Finish = Callable[[torch.Tensor], dict[nn.Parameter, torch.Tensor]]
_Rule = Callable[[BookkeepingModule, _Layer, _Calls], tuple[torch.Tensor, _Finish]]


def _weighted(factor: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``sum_b factor_b per_sample_b`` for ``per_sample`` ``(B, ...)``."""
    return (factor.to(per_sample.dtype) @ per_sample.reshape(per_sample.shape[0], -1)).reshape(per_sample.shape[1:])


def _sq_norms(per_sample: torch.Tensor) -> torch.Tensor:
    """``||x_b||^2`` of every sample of ``per_sample`` ``(B, ...)``, in one pass (no squared copy)."""
    return torch.linalg.vector_norm(per_sample.reshape(per_sample.shape[0], -1), dim=1).square()


def _scaled(g: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``g`` ``(B, ...)`` with sample ``b`` multiplied by ``factor_b``."""
    return g * factor.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))


def _ghost_is_cheaper(positions: int, d_in: int, d_out: int) -> bool:
    """Whether the ghost norm (``T^2 (D + O)`` multiply-adds per sample) beats materialising the
    per-sample gradient (``T D O``) for ``positions`` ``T``, input width ``D``, output width ``O``."""
    return positions * (d_in + d_out) < d_in * d_out


def _ghost_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||g_b^T a_b||_F^2 = <a_b a_b^T, g_b g_b^T>`` for ``a`` ``(B, T, D)``, ``g`` ``(B, T, O)``."""
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))


def _norms_of_products(a: torch.Tensor, g: torch.Tensor, *, name: str, owner: BookkeepingModule) -> tuple[
        torch.Tensor, torch.Tensor | None]:
    """Per-sample ``||g_b^T a_b||_F^2`` for ``a`` ``(B, T, D)`` and ``g`` ``(B, T, O)``.

    Returns the squared norms ``(B,)`` and the per-sample products ``(B, O, D)`` when they were
    materialised (``None`` after the ghost norm), whichever costs fewer multiply-adds.
    """
    if _ghost_is_cheaper(a.shape[1], a.shape[2], g.shape[2]):
        owner.ghost_layers.add(name)
        return _ghost_norms(a, g), None
    per_sample = torch.bmm(g.transpose(1, 2), a)
    return _sq_norms(per_sample), per_sample


_CHUNK_BYTES = 16 << 20
"""Materialised per-sample convolution gradients are computed and kept in chunks of samples of at
most this size: blocks above glibc's largest heap-reuse size (32 MB) are fresh ``mmap`` pages on
every step (measured on ResNet-18 2D, batch 64: 100k page faults and about 0.3 s per step)."""


def _conv_per_sample_chunks(conv: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """:func:`_conv_per_sample` over consecutive chunks of samples of at most :data:`_CHUNK_BYTES`."""
    per_sample_bytes = g.shape[1] * conv.weight[0].numel() * g.element_size()
    size = max(1, _CHUNK_BYTES // max(per_sample_bytes, 1))
    return [_conv_per_sample(conv, xc, gc) for xc, gc in zip(x.split(size), g.split(size), strict=True)]


def _conv_per_sample(conv: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(B, O, C_in * prod(kernel))`` of a convolution (groups 1),
    by PyTorch's weight-gradient kernel with the batch as groups (no unfolded input)."""
    n, c_in, out_ch = x.shape[0], x.shape[1], g.shape[1]
    dims = x.dim() - 2
    stacked = torch.empty((n * out_ch, c_in, *conv.kernel_size), dtype=g.dtype, device=g.device)
    grad = torch.ops.aten.convolution_backward(
        g.reshape(1, n * out_ch, *g.shape[2:]), x.reshape(1, n * c_in, *x.shape[2:]), stacked, None,
        list(conv.stride), list(conv.padding), list(conv.dilation), False, [0] * dims, n, [False, True, False],
    )[1]
    return grad.reshape(n, out_ch, -1)


def _conv_rule(owner: BookkeepingModule, layer: _Layer, calls: _Calls) -> tuple[torch.Tensor, _Finish]:
    conv = layer.module
    weight, bias = conv.weight, conv.bias
    grads = [g for _, g in calls]
    xs = [inputs[0].to(g.dtype) for (inputs, _), g in zip(calls, grads, strict=True)]
    n, out_ch = grads[0].shape[0], grads[0].shape[1]
    sq = torch.zeros(n, dtype=grads[0].dtype, device=grads[0].device)
    g_flat = _cat([g.reshape(n, out_ch, -1) for g in grads], dim=2)  # (B, O, T)
    per_sample_w = patches = None
    if weight.requires_grad:
        d_in = weight[0].numel()
        if _ghost_is_cheaper(g_flat.shape[2], d_in, out_ch):
            owner.ghost_layers.add(layer.name)
            patches = _cat([_unfold(conv, x) for x in xs], dim=2)  # (B, D, T)
            sq += _ghost_norms(patches.transpose(1, 2), g_flat.transpose(1, 2))
        else:
            per_sample_w = _conv_per_sample_chunks(conv, xs[0], grads[0])  # chunks of (b, O, D)
            for x, g in zip(xs[1:], grads[1:], strict=True):
                for chunk, more in zip(per_sample_w, _conv_per_sample_chunks(conv, x, g), strict=True):
                    chunk += more
            sq += torch.cat([_sq_norms(chunk) for chunk in per_sample_w])
    per_sample_b = None
    if bias is not None and bias.requires_grad:
        per_sample_b = g_flat.sum(dim=2)
        sq += _sq_norms(per_sample_b)

    def finish(factor: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = {}
        if weight.requires_grad:
            if per_sample_w is not None:
                sizes = [len(chunk) for chunk in per_sample_w]
                out[weight] = sum(
                    _weighted(f, chunk) for f, chunk in zip(factor.split(sizes), per_sample_w, strict=True)
                ).reshape(weight.shape)
            elif g_flat.shape[2] >= _KERNEL_POSITIONS:  # PyTorch's weight-gradient kernel, clipped g
                out[weight] = _conv_weight_grad(conv, xs[0], _scaled(grads[0], factor))
                for x, g in zip(xs[1:], grads[1:], strict=True):
                    out[weight] += _conv_weight_grad(conv, x, _scaled(g, factor))
            else:  # few positions: one (O, B T) x (B T, D) product with the unfolded input
                out[weight] = torch.tensordot(_scaled(g_flat, factor), patches, dims=([0, 2], [0, 2])).reshape(
                    weight.shape)
        if per_sample_b is not None:
            out[bias] = _weighted(factor, per_sample_b)
        return out

    return sq, finish


_KERNEL_POSITIONS = 32
"""From this many output positions on, a ghost-norm convolution's clipped sum uses PyTorch's
weight-gradient kernel; below it (where that kernel is slow, e.g. 3D maps of 2^3) the product
with the unfolded input (measured on one CPU thread: 7x7 maps 30 vs 44 ms, 2^3 maps 259 vs 59 ms)."""


def _conv_weight_grad(conv: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``dL/dW`` of a convolution for input ``x`` and output gradient ``g`` (summed over the batch)."""
    return torch.ops.aten.convolution_backward(
        g, x, conv.weight, None, list(conv.stride), list(conv.padding), list(conv.dilation), False,
        [0] * (x.dim() - 2), conv.groups, [False, True, False],
    )[1]


def _cat(tensors: list[torch.Tensor], *, dim: int) -> torch.Tensor:
    """``torch.cat`` without a copy for a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _unfold(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches a convolution multiplies: ``(B, C_in * prod(kernel), positions)``."""
    if isinstance(conv, nn.Conv2d):
        return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    if isinstance(conv, nn.Conv1d):
        return F.unfold(x.unsqueeze(2), (1, conv.kernel_size[0]), dilation=(1, conv.dilation[0]),
                        padding=(0, conv.padding[0]), stride=(1, conv.stride[0]))
    return unfold3d(standard_strides(x), kernel_size=conv.kernel_size, padding=conv.padding, stride=conv.stride,
                    dilation=conv.dilation)


def _linear_rule(owner: BookkeepingModule, layer: _Layer, calls: _Calls) -> tuple[torch.Tensor, _Finish]:
    lin = layer.module
    n = calls[0][1].shape[0]
    a3 = _cat([inputs[0].to(g.dtype).reshape(n, -1, inputs[0].shape[-1]) for inputs, g in calls], dim=1)
    g3 = _cat([g.reshape(n, -1, g.shape[-1]) for _, g in calls], dim=1)  # (B, T, O); a3 (B, T, D)
    weight, bias = lin.weight, lin.bias
    sq = torch.zeros(n, dtype=g3.dtype, device=g3.device)
    per_sample_w = None
    if weight.requires_grad:
        if a3.shape[1] == 1:
            sq += _sq_norms(g3[:, 0]) * _sq_norms(a3[:, 0])
        else:
            w_sq, per_sample_w = _norms_of_products(a3, g3, name=layer.name, owner=owner)
            sq += w_sq
    per_sample_b = None
    if bias is not None and bias.requires_grad:
        per_sample_b = g3.sum(dim=1)
        sq += _sq_norms(per_sample_b)

    def finish(factor: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = {}
        if weight.requires_grad:
            if per_sample_w is not None:
                out[weight] = _weighted(factor, per_sample_w)
            else:
                out[weight] = _scaled(g3, factor).reshape(-1, g3.shape[-1]).t() @ a3.reshape(-1, a3.shape[-1])
        if per_sample_b is not None:
            out[bias] = _weighted(factor, per_sample_b)
        return out

    return sq, finish


def _norm_per_sample(norm: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a GroupNorm / LayerNorm / InstanceNorm's affine parameters."""
    if isinstance(norm, nn.GroupNorm):
        normalised = F.group_norm(x, norm.num_groups, eps=norm.eps)
        reduce: tuple[int, ...] = tuple(range(2, g.dim()))
    elif isinstance(norm, nn.LayerNorm):
        normalised = F.layer_norm(x, norm.normalized_shape, eps=norm.eps)
        reduce = tuple(range(1, g.dim() - len(norm.normalized_shape)))
    else:
        normalised = F.instance_norm(x, eps=norm.eps)
        reduce = tuple(range(2, g.dim()))
    out: dict[nn.Parameter, torch.Tensor] = {}
    if norm.weight is not None and norm.weight.requires_grad:
        if reduce == tuple(range(2, g.dim())) and reduce:  # channels at dim 1: one batched product
            n, c = g.shape[:2]
            out[norm.weight] = torch.einsum("bcs,bcs->bc", g.reshape(n, c, -1), normalised.reshape(n, c, -1))
        else:
            gw = g * normalised
            out[norm.weight] = gw.sum(dim=reduce) if reduce else gw
    if norm.bias is not None and norm.bias.requires_grad:
        out[norm.bias] = g.sum(dim=reduce) if reduce else g
    return out


def _sum_per_sample(layer: _Layer, calls: _Calls, per_call: Callable[..., dict[nn.Parameter, torch.Tensor]]) -> tuple[
        torch.Tensor, _Finish]:
    """Norms and clipped sums from per-sample gradients ``per_call(inputs, g)`` added over calls."""
    per_sample: dict[nn.Parameter, torch.Tensor] = {}
    for inputs, g in calls:
        for p, ps in per_call(inputs, g).items():
            if p.requires_grad:
                per_sample[p] = per_sample[p] + ps if p in per_sample else ps
    n = calls[0][1].shape[0]
    sq = torch.zeros(n, dtype=calls[0][1].dtype, device=calls[0][1].device)
    for ps in per_sample.values():
        sq += _sq_norms(ps).to(sq.dtype)

    def finish(factor: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return {p: _weighted(factor, ps).reshape(p.shape) for p, ps in per_sample.items()}

    return sq, finish


def _norm_rule(owner: BookkeepingModule, layer: _Layer, calls: _Calls) -> tuple[torch.Tensor, _Finish]:
    return _sum_per_sample(layer, calls, lambda inputs, g: _norm_per_sample(layer.module, inputs[0].to(g.dtype), g))


def _sampler_rule(owner: BookkeepingModule, layer: _Layer, calls: _Calls) -> tuple[torch.Tensor, _Finish]:
    """Any layer with an Opacus grad sampler: materialise its per-sample gradients."""
    sampler = GradSampleModule.GRAD_SAMPLERS[type(layer.module)]
    return _sum_per_sample(layer, calls, lambda inputs, g: sampler(layer.module, list(inputs), g))


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

    def add_noise(self) -> None:
        """``p.grad = p.summed_grad + noise``: the very numbers of Opacus's ``add_noise`` (the same
        draws from ``generator`` in the same order, summed in the same order; with ``secure_mode``
        a discarded first draw, then ``(n1 + n2 + n3 + n4) / 2``), drawn into two reused buffers
        per parameter instead of seven fresh tensors."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            summed = p.summed_grad
            if std == 0:
                p.grad = summed.clone().view_as(p)
                continue
            if not self.secure_mode:
                noise = torch.empty(summed.shape, dtype=summed.dtype, device=summed.device)
                p.grad = noise.normal_(0, std, generator=self.generator).add_(summed).view_as(p)
                continue
            torch.normal(mean=0, std=std, size=(1, 1), device=summed.device, generator=self.generator)
            total = torch.zeros_like(summed)
            draw = self._draw_buffer(summed)
            for _ in range(4):
                total += draw.normal_(0, std, generator=self.generator)
            p.grad = total.div_(2).add_(summed).view_as(p)

    def _draw_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A reused buffer of ``like``'s shape in the default dtype (Opacus draws the hardened noise
        in it), one per shape and device: no fresh allocation per parameter and step."""
        key = (tuple(like.shape), like.device)
        buffers: dict[Any, torch.Tensor] = self.__dict__.setdefault("_draw_buffers", {})
        if key not in buffers:
            buffers[key] = torch.empty(like.shape, device=like.device)
        return buffers[key]

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

