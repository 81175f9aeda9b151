"""Heat-map explanations of a classifier's predictions, computed and written at the site.

Methods (:data:`METHODS`, chosen by name)
    ``gradcam``
        Grad-CAM (Selvaraju et al. 2017) through MONAI :class:`~monai.visualize.GradCAM`: the
        target layer's activations weighted by the spatial mean of the class score's gradient.
    ``gradcampp``
        Grad-CAM++ (Chattopadhyay et al. 2018) through MONAI :class:`~monai.visualize.GradCAMpp`.
    ``occlusion``
        Occlusion sensitivity through MONAI :class:`~monai.visualize.OcclusionSensitivity`: the
        drop of the explained class's softmax probability when a patch around each pixel is
        blurred out (``mode="gaussian"``). Costs hundreds of forward passes per image.

Every method maps images ``(N, C, *spatial)`` to maps ``(N, 1, *spatial)`` in ``[0, 1]`` (each map
divided by its own maximum after clipping at 0: the scale is relative within one image, never
comparable across images; an all-zero map means the method found no positive evidence).

Decisions worth knowing
    * MONAI's CAM helpers score ``logits[:, class_idx]`` which, for a batch with one class per
      image, mixes the classes of all images; and their default post-processing maps the maximum
      to 0. Here the class score is taken per image (:class:`_LayerHooks`) and maps are scaled so
      that 1 is the most important pixel.
    * MONAI's occlusion helper applies a sigmoid when the *input* has one channel; here the
      softmax over the classes is always used.
    * The Grad-CAM target layer is, unless given, the last module (in forward order) whose output
      is still a spatial feature map with more than one element (:func:`find_target_layer`): for
      ``simplecnn`` the last ReLU (1/4 of the input side), for ``resnet18/34`` the last block
      (1/8), for ``densenet121`` 2D the last ReLU (1/32 of the upsampled input) and for
      ``densenet121`` 3D at 32^3 the last transition convolution (its last block sees 1 voxel).
      The map is upsampled (bi/trilinear) from that grid, so its resolution is that coarse.

Nothing here opens a network connection: maps and overlays stay where ``out_dir`` points.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity
from monai.visualize.class_activation_maps import ModelWithHooks
from torch import nn

__all__ = [
    "METHODS",
    "ExplainMethod",
    "Explanations",
    "check_method",
    "explain_batch",
    "find_target_layer",
    "map_correlation",
    "randomized_copy",
    "render_overlay",
    "write_explanations",
    "INDEX_FILE",
]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
"""The file :func:`write_explanations` writes beside the overlays (one row per image)."""


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Explanations:
    """Maps and predictions for one batch.

    Parameters
    ----------
    maps
        ``float32`` ``(N, 1, *spatial)`` in ``[0, 1]`` (1 = most important pixel of that image).
    predicted
        ``int64`` ``(N,)``: the model's predicted class.
    probability
        ``float32`` ``(N,)``: softmax probability of the predicted class.
    explained
        ``int64`` ``(N,)``: the class each map explains (the predicted one unless asked).
    method
        The method's name.
    target_layer
        The layer Grad-CAM / Grad-CAM++ used (``None`` for occlusion).
    """

    maps: np.ndarray
    predicted: np.ndarray
    probability: np.ndarray
    explained: np.ndarray
    method: str
    target_layer: str | None


# --------------------------------------------------------------------------- hooks
class _LayerHooks(ModelWithHooks):
    """MONAI's ``ModelWithHooks`` for one layer, with a per-image class score and removable hooks.

    * The class score is ``logits[i, class_idx[i]]`` for each image ``i`` (MONAI's
      ``logits[:, class_idx]`` sums every image's class over every image), shaped
      ``(N, 1, 1, ...)`` so that Grad-CAM++'s ``score.exp() * grad`` broadcasts per image.
    * The gradient is recorded by a tensor hook on the layer's *last* output in the forward pass
      (a module called twice, such as a ResNet block's ReLU, keeps activation and gradient of
      the same call).
    """

    def __init__(self, model: nn.Module, layer: str) -> None:  # noqa: D107 (no super().__init__: own hooks)
        self.model = model
        self.target_layers = (layer,)
        self.gradients: dict[str, torch.Tensor] = {}
        self.activations: dict[str, torch.Tensor] = {}
        self.score: torch.Tensor | None = None
        self.class_idx: Any = None
        self.register_forward = True
        self.register_backward = True
        module = dict(model.named_modules())[layer]
        self._handle = module.register_forward_hook(self._forward_hook)

    def _forward_hook(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        name = self.target_layers[0]
        self.activations[name] = output
        if output.requires_grad:

            def keep(grad: torch.Tensor) -> None:
                if self.activations.get(name) is output:
                    self.gradients[name] = grad

            output.register_hook(keep)

    def class_score(self, logits: torch.Tensor, class_idx: Any) -> torch.Tensor:
        """``logits[i, class_idx[i]]`` as ``(N, 1, ...)`` (ones for the spatial axes)."""
        index = torch.as_tensor(class_idx, device=logits.device).reshape(-1)
        if index.numel() == 1:
            index = index.expand(logits.shape[0])
        score = logits.gather(1, index.view(-1, 1))
        spatial = self.activations[self.target_layers[0]].ndim - 2
        return score.view(-1, 1, *([1] * spatial))

    def remove(self) -> None:
        """Remove the hook from the model."""
        self._handle.remove()


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each ``(1, *spatial)`` map clipped at 0 and divided by its maximum (all-zero stays zero)."""
    maps = maps.detach().float().clamp(min=0)
    peak = maps.flatten(1).amax(dim=1).view(-1, *([1] * (maps.ndim - 1)))
    return torch.where(peak > 0, maps / peak.clamp(min=1e-12), torch.zeros_like(maps))


# --------------------------------------------------------------------------- target layer
def find_target_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The last module (forward order) whose output is a feature map with > 1 spatial element.

    Parameters
    ----------
    model
        A classifier mapping ``(N, C, *spatial)`` to logits ``(N, K)``.
    example
        One input ``(1, C, *spatial)`` of the size that will be explained (the layer depends on it:
        a small input can shrink the last blocks to one voxel).

    Raises
    ------
    ValueError
        If no module yields such a feature map (pass ``target_layer`` explicitly).
    """
    seen: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name and not list(module.children()):

            def record(_m: nn.Module, _i: Any, output: Any, name: str = name) -> None:
                if (
                    isinstance(output, torch.Tensor)
                    and output.ndim == example.ndim
                    and int(np.prod(output.shape[2:])) > 1
                ):
                    seen.append(name)

            handles.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not seen:
        raise ValueError(
            "No layer of the model yields a spatial feature map for inputs of shape "
            f"{tuple(example.shape[1:])}: give the layer to explain (--target-layer NAME; names as in "
            "model.named_modules())."
        )
    return seen[-1]


def _check_layer(model: nn.Module, layer: str) -> None:
    names = [name for name, _ in model.named_modules() if name]
    if layer not in names:
        from medfed.shared.config import close_matches

        raise ValueError(
            f"--target-layer {layer!r} is not a layer of the model.{close_matches(layer, names)} "
            f"Its last layers: {', '.join(names[-6:])} (all: model.named_modules())."
        )


# --------------------------------------------------------------------------- methods
MapFn = Callable[..., torch.Tensor]


def _cam_maps(cam_class: type[GradCAM]) -> MapFn:
    def compute(model: nn.Module, images: torch.Tensor, explained: torch.Tensor, *, target_layer: str, **_: Any) -> torch.Tensor:
        hooks = _LayerHooks(model, target_layer)
        try:
            cam = cam_class(nn_module=hooks, target_layers=target_layer, postprocessing=_normalise)
            with torch.enable_grad():
                maps = cam(images, class_idx=explained)
        finally:
            hooks.remove()
            model.zero_grad(set_to_none=True)
        return maps

    return compute


def _occlusion_maps(
    model: nn.Module,
    images: torch.Tensor,
    explained: torch.Tensor,
    *,
    occlusion_mask: int | None = None,
    **_: Any,
) -> torch.Tensor:
    spatial = images.shape[2:]
    mask = occlusion_mask or max(3, min(spatial) // 4)
    if mask > min(spatial):
        raise ValueError(f"--occlusion-mask {mask} is larger than the image ({tuple(spatial)}): give a smaller one.")
    occlusion = OcclusionSensitivity(
        nn_module=model,
        mask_size=mask,
        n_batch=32,
        overlap=OCCLUSION_OVERLAP,
        verbose=False,
        activate=lambda out: out.softmax(1),
    )
    maps = []
    with torch.no_grad():
        for image, cls in zip(images, explained, strict=True):
            image = image[None]
            base = model(image).softmax(1)[0, cls]
            occluded, _ = occlusion(image)  # (1, K, *spatial) probabilities with the patch occluded
            maps.append(base - occluded[:, int(cls) : int(cls) + 1].as_tensor())
    return _normalise(torch.cat(maps))


OCCLUSION_OVERLAP: float = 0.5
"""Overlap of neighbouring occlusion patches (MONAI's default 0.6 costs about 2.4x more passes in 3D)."""


@dataclass(frozen=True)
class ExplainMethod:
    """One registry entry: ``compute(model, images, explained, *, target_layer, occlusion_mask)``
    returns maps ``(N, 1, *spatial)`` in ``[0, 1]``; ``uses_layer`` says whether it needs a target layer."""

    name: str
    compute: MapFn
    uses_layer: bool
    description: str


METHODS: dict[str, ExplainMethod] = {
    m.name: m
    for m in (
        ExplainMethod("gradcam", _cam_maps(GradCAM), True, "Grad-CAM (MONAI GradCAM) on the last feature map."),
        ExplainMethod("gradcampp", _cam_maps(GradCAMpp), True, "Grad-CAM++ (MONAI GradCAMpp) on the last feature map."),
        ExplainMethod(
            "occlusion", _occlusion_maps, False, "Occlusion sensitivity (MONAI OcclusionSensitivity); slow."
        ),
    )
}
"""Explanation methods by name."""


def check_method(name: str) -> ExplainMethod:
    """The method called ``name``.

    Raises
    ------
    ValueError
        Unknown name; the message lists the valid names.
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        from medfed.shared.config import close_matches

        valid = ", ".join(repr(n) for n in METHODS)
        raise ValueError(
            f"--method {name!r} is not an explanation method.{close_matches(str(name), list(METHODS))} "
            f"Valid methods: {valid}."
        ) from None


# --------------------------------------------------------------------------- batch
def explain_batch(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    *,
    method: str = "gradcam",
    target_layer: str | None = None,
    class_index: int | None = None,
    occlusion_mask: int | None = None,
) -> Explanations:
    """Explanation maps for a batch of images.

    Parameters
    ----------
    model
        A classifier mapping ``(N, C, *spatial)`` to logits ``(N, K)`` (any of ``medfed models``'
        classification models). Left in the train/eval mode it came in; runs on its device.
    images
        ``(N, C, *spatial)``, ``spatial`` of length 2 or 3, as the model was trained on.
    method
        A key of :data:`METHODS`.
    target_layer
        Grad-CAM / Grad-CAM++ layer (a name from ``model.named_modules()``); default
        :func:`find_target_layer`.
    class_index
        The class to explain for every image; default each image's predicted class.
    occlusion_mask
        Occlusion patch side in pixels; default a quarter of the smallest side (at least 3).

    Returns
    -------
    Explanations
        Maps ``(N, 1, *spatial)`` in ``[0, 1]``, predictions and probabilities.

    Raises
    ------
    ValueError
        Unknown method (listing the valid ones), unknown layer, a class index out of range, or
        images that are not ``(N, C, H, W)`` / ``(N, C, D, H, W)``.
    """
    spec = check_method(method)
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.to(device=device, dtype=torch.float32)
    if x.ndim not in (4, 5) or len(x) == 0:
        raise ValueError(f"images must have shape (N, C, H, W) or (N, C, D, H, W) with N >= 1; got {tuple(x.shape)}.")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
        if logits.ndim != 2:
            raise ValueError(
                f"explanations need a classifier (logits (N, K)); the model returns {tuple(logits.shape)} "
                "(a segmentation model's output is its own map)."
            )
        probs = logits.float().softmax(1)
        probability, predicted = probs.max(1)
        if class_index is not None and not 0 <= class_index < logits.shape[1]:
            raise ValueError(f"--class {class_index} is out of range: the model has {logits.shape[1]} classes (0-{logits.shape[1] - 1}).")
        explained = predicted if class_index is None else torch.full_like(predicted, class_index)
        layer = None
        if spec.uses_layer:
            if target_layer is None:
                layer = find_target_layer(model, x[:1])
            else:
                _check_layer(model, target_layer)
                layer = target_layer
        maps = spec.compute(model, x, explained, target_layer=layer, occlusion_mask=occlusion_mask)
    finally:
        model.train(was_training)
    return Explanations(
        maps=maps.detach().cpu().numpy().astype(np.float32),
        predicted=predicted.cpu().numpy().astype(np.int64),
        probability=probability.cpu().numpy().astype(np.float32),
        explained=explained.cpu().numpy().astype(np.int64),
        method=method,
        target_layer=layer,
    )


# --------------------------------------------------------------------------- sanity check
def randomized_copy(model: nn.Module, *, seed: int = 0, last: int | None = None) -> nn.Module:
    """A copy of ``model`` with re-initialised weights (Adebayo et al. 2018's model randomisation).

    Parameters
    ----------
    model
        The trained model (unchanged).
    seed
        Seeds the new weights.
    last
        Re-initialise only the last ``last`` modules that have their own parameters (in
        ``named_modules`` order, the head first in the cascading test); ``None``: all of them.

    Returns
    -------
    nn.Module
        The copy (same mode and device). A map that hardly changes under this randomisation does
        not depend on what the model learned.
    """
    clone = copy.deepcopy(model)
    owners = [m for m in clone.modules() if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))]
    chosen = owners if last is None else owners[len(owners) - last :]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in chosen:
            module.reset_parameters()
    return clone


def map_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps of the same shape (as Adebayo et al. report).

    Returns ``nan`` when either map is constant (an all-zero map has no ranking).
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps of different sizes: {a.size} and {b.size} elements.")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


# --------------------------------------------------------------------------- rendering
def _middle_slice(volume: np.ndarray) -> np.ndarray:
    """``(C, D, H, W)`` -> ``(C, H, W)`` at ``D // 2``; 2D ``(C, H, W)`` unchanged."""
    return volume[:, volume.shape[1] // 2] if volume.ndim == 4 else volume


def render_overlay(image: np.ndarray, heat_map: np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """Write a PNG of ``heat_map`` over ``image`` with a colour bar.

    Parameters
    ----------
    image
        ``(C, *spatial)``; 3 channels are shown as RGB, otherwise channel 0 in grey (scaled to its
        own range).
    heat_map
        ``(1, *spatial)`` in ``[0, 1]``.
    path
        The PNG to write.
    title
        Printed above the image (say, the predicted class and probability).

    Notes
    -----
    3D inputs show the middle slice of the first spatial axis (``D // 2``).
    """
    from matplotlib.figure import Figure

    picture = _middle_slice(np.asarray(image, dtype=np.float32))
    heat = _middle_slice(np.asarray(heat_map, dtype=np.float32))[0]
    if picture.shape[0] == 3:
        shown = np.moveaxis(picture, 0, -1)
        low, high = float(shown.min()), float(shown.max())
        shown = (shown - low) / (high - low) if high > low else np.zeros_like(shown)
        cmap = None
    else:
        shown, cmap = picture[0], "gray"
    fig = Figure(figsize=(4.2, 3.6), dpi=100)
    ax = fig.subplots()
    ax.imshow(shown, cmap=cmap, interpolation="nearest")
    layer = ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(layer, ax=ax, fraction=0.046, pad=0.04, label="relative importance")
    path = Path(path)
    fig.savefig(path)
    return path


def _write_nifti(heat_map: np.ndarray, path: Path) -> Path:
    """Write a 3D map ``(1, D, H, W)`` as NIfTI (identity affine: the model's input grid)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(heat_map[0], dtype=np.float32), affine=np.eye(4)), str(path))
    return path


# --------------------------------------------------------------------------- writing
def write_explanations(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    *,
    method: str,
    out_dir: str | Path,
    ids: Sequence[int | str] | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    target_layer: str | None = None,
    class_index: int | None = None,
    occlusion_mask: int | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Compute maps for ``images`` and write overlays, NIfTI maps (3D) and ``index.json``.

    Parameters
    ----------
    model
        A classifier (see :func:`explain_batch`).
    images
        ``(N, C, *spatial)`` images, as the model takes them.
    method
        A key of :data:`METHODS`.
    out_dir
        Created if needed. Receives ``<id>-<method>.png`` per image (the middle slice for 3D),
        ``<id>-<method>.nii.gz`` per 3D image and :data:`INDEX_FILE`.
    ids
        One id per image for file names and the index (the entry's index in its split, or an id
        the user chose: never a patient identifier or path); default ``0 .. N-1``. Must be
        unique; strings may hold only letters, digits, ``-``, ``_`` and ``.``.
    labels
        Optional true classes ``(N,)``, recorded in the index.
    target_layer, class_index, occlusion_mask
        As in :func:`explain_batch`.
    batch_size
        Images per batch.
    on_batch
        Called with the number of images done after each batch (drives a progress bar).
    extra
        More top-level fields for ``index.json`` (say, the split and checkpoint round).

    Returns
    -------
    Path
        ``out_dir / "index.json"``: ``{"method", "target_layer", "count", "rows": [...], **extra}``,
        one row per image: ``{"index", "predicted", "probability", "explained", "label", "png",
        "nifti"}`` (``label`` and ``nifti`` are ``null`` where not applicable; file names are
        relative to ``out_dir``).

    Raises
    ------
    ValueError
        Unknown method, bad ids (duplicates, unsafe characters, wrong count) or bad images.
    """
    check_method(method)
    data = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    n = len(data)
    ids = list(range(n)) if ids is None else list(ids)
    _check_ids(ids, n)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images: give one label per image.")
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} is invalid: it must be >= 1.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    layer: str | None = None
    for start in range(0, n, batch_size):
        batch = data[start : start + batch_size]
        result = explain_batch(
            model,
            batch,
            method=method,
            target_layer=target_layer if target_layer is not None else layer,
            class_index=class_index,
            occlusion_mask=occlusion_mask,
        )
        layer = result.target_layer
        pixels = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        for offset in range(len(batch)):
            i = start + offset
            stem = f"{_stem(ids[i])}-{method}"
            predicted = int(result.predicted[offset])
            probability = float(result.probability[offset])
            explained = int(result.explained[offset])
            png = render_overlay(
                pixels[offset],
                result.maps[offset],
                out / f"{stem}.png",
                title=f"{ids[i]}: predicted {predicted} (p={probability:.2f}), {method} of class {explained}",
            )
            nifti = None
            if result.maps.ndim == 5:
                nifti = _write_nifti(result.maps[offset], out / f"{stem}.nii.gz").name
            rows.append(
                {
                    "index": ids[i],
                    "predicted": predicted,
                    "probability": round(probability, 6),
                    "explained": explained,
                    "label": None if labels is None else int(labels[i]),
                    "method": method,
                    "png": png.name,
                    "nifti": nifti,
                }
            )
        if on_batch is not None:
            on_batch(len(batch))
    index = {"method": method, "target_layer": layer, "count": len(rows), **(extra or {}), "rows": rows}
    path = out / INDEX_FILE
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    logger.info("Wrote %d %s explanations to %s.", len(rows), method, out)
    return path


_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _stem(identifier: int | str) -> str:
    return f"{identifier:05d}" if isinstance(identifier, int) else identifier


def _check_ids(ids: list[int | str], n: int) -> None:
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} images: give one id per image.")
    stems = [_stem(i) for i in ids]
    bad = [i for i in ids if not isinstance(i, int) and (not i or not set(str(i)) <= _SAFE or str(i).startswith("."))]
    if bad:
        raise ValueError(
            f"ids {bad[:3]!r} are not usable file names: use entry indices or ids of letters, digits, '-', '_', '.'."
        )
    if len(set(stems)) != len(stems):
        raise ValueError("ids must be unique (they name the output files).")
