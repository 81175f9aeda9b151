"""``medfed export``: a checkpoint as a TorchScript model or as a MONAI bundle.

TorchScript (``model.ts``)
    The network traced (``torch.jit.trace``) on an input of the training shape ``(1, C,
    *spatial)``, checked against the eager network on two random batches, with ``medfed.json``
    (the :class:`~medfed.shared.inference.ModelShape`, preprocessing and threshold) among its extra
    files. Inputs must have the training shape: ``medfed predict``'s preprocessing (and its
    sliding windows) give exactly that.

MONAI bundle (a folder)::

    configs/metadata.json    versions, network_data_format (inputs/outputs), medfed's model shape and threshold
    configs/inference.json   network_def, preprocessing, inferer, postprocessing, dataset, run
    models/model.pt          the state dict

``network_def`` builds the network with :func:`medfed.shared.models.build_model` and
``preprocessing`` uses :class:`medfed.shared.inference.ModelInputd` (training's preprocessing), so the
bundle needs medfed installed. ``run`` predicts the images of ``input_path`` (datalist, folder, file)
into ``output_dir`` the way ``medfed predict`` does, with the bundle's own network, weights,
preprocessing and inferer::

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
        --meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE --input_path DATA --output_dir OUT
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from torch import nn

from medfed.shared.data.datalist import ModelImage
from medfed.shared.inference import SLIDING_WINDOW, LoadedModel, ModelShape
from medfed.shared.predictions import PredictionRun, find_inputs, predict_inputs

__all__ = ["EXPORT_FORMATS", "ExportError", "export_bundle", "export_torchscript", "run_bundle"]

logger = logging.getLogger(__name__)

EXPORT_FORMATS: tuple[str, ...] = ("torchscript", "bundle")

TORCHSCRIPT_FILE = "model.ts"
METADATA_NAME = "medfed.json"
"""The TorchScript extra file holding the model shape, preprocessing and threshold."""
TRACE_TOLERANCE = 1e-5


class ExportError(RuntimeError):
    """The model could not be exported faithfully."""


def export_torchscript(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """Write ``out_dir/model.ts``: the network traced at the training input shape.

    Raises
    ------
    ExportError
        Tracing fails, or the traced network's logits differ from the eager network's by more
        than :data:`TRACE_TOLERANCE` on two random batches.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    shape = loaded.shape
    example = torch.rand((1, shape.in_channels, *shape.spatial_shape), generator=torch.Generator().manual_seed(0))
    example = example.to(loaded.device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript (still supported; issue 18 asks for it); the tracer's
            # warnings are about shape checks, constant at the one input shape the model takes.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as err:  # tracing raises many types; say which model
        raise ExportError(f"TorchScript tracing of {loaded.config.model!r} failed ({type(err).__name__}: {err}).") from None
    _check_same(model, traced, shape, loaded.device, what="traced TorchScript")
    target = out / TORCHSCRIPT_FILE
    extra = {METADATA_NAME: json.dumps(_medfed_info(loaded), sort_keys=True)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        torch.jit.save(traced, str(target), _extra_files=extra)
    logger.info("Exported TorchScript model (%s, input %s).", loaded.config.model, list(example.shape))
    return target


def export_bundle(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """Write a MONAI bundle folder (``configs/metadata.json``, ``configs/inference.json``,
    ``models/model.pt``) and return it."""
    out = Path(out_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    torch.save(state, out / "models" / "model.pt")
    (out / "configs" / "metadata.json").write_text(json.dumps(_metadata(loaded), indent=2) + "\n", encoding="utf-8")
    (out / "configs" / "inference.json").write_text(json.dumps(_inference(loaded), indent=2) + "\n", encoding="utf-8")
    logger.info("Exported MONAI bundle (%s).", loaded.config.model)
    return out


def run_bundle(
    *,
    network: nn.Module,
    preprocessing: Any,
    inferer: Any,
    input_path: str,
    output_dir: str,
    model_shape: Mapping[str, Any],
    threshold: float | None,
    device: torch.device | str = "cpu",
) -> PredictionRun:
    """The bundle's ``run``: predict ``input_path``'s images into ``output_dir`` with the bundle's
    network, preprocessing (a transform over ``{"image": path}``) and inferer; the same files as
    ``medfed predict`` (:func:`medfed.shared.predictions.predict_inputs`)."""
    if not input_path:
        raise ValueError("the bundle needs --input_path (a datalist .json, an image file or a folder of images).")
    shape = ModelShape.from_json(model_shape, source="the bundle's model_shape")

    def read(path: Path) -> ModelImage:
        data = preprocessing({"image": str(path)})
        image = torch.as_tensor(data["image"]).numpy().astype(np.float32, copy=False)
        source_shape = data.get("image_source_shape")
        return ModelImage(
            image=image, read_shape=tuple(data["image_read_shape"]), affine=data.get("image_affine"),
            source_affine=data.get("image_source_affine"),
            source_shape=tuple(source_shape) if source_shape is not None else None,
        )

    network.eval()
    info = {"bundle": True, "model_shape": dict(model_shape), "threshold": threshold}
    return predict_inputs(
        network, find_inputs(input_path), output_dir, read=read, shape=shape, threshold=threshold,
        device=device, model_info=info, inferer=inferer,
    )


# ---------------------------------------------------------------------------- internals
def _check_same(model: nn.Module, exported: Any, shape: ModelShape, device: torch.device, *, what: str) -> None:
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 2):
        x = torch.rand((batch, shape.in_channels, *shape.spatial_shape), generator=gen).to(device)
        with torch.no_grad():
            diff = float((model(x) - exported(x)).abs().max())
        if not diff <= TRACE_TOLERANCE:
            raise ExportError(
                f"the {what} model's logits differ from the trained model's by {diff:.2e} (batch {batch}); "
                "it would not predict the same. Export as a bundle instead (--format bundle)."
            )


def _medfed_version() -> str:
    try:
        return metadata.version("medfed")
    except metadata.PackageNotFoundError:
        return "unknown"


def _medfed_info(loaded: LoadedModel) -> dict[str, Any]:
    return {
        "model": loaded.config.model,
        "norm": loaded.config.norm,
        "model_shape": loaded.shape.to_json(),
        "preprocessing": loaded.preprocessing.to_json(),
        "threshold": loaded.threshold,
        "threshold_source": loaded.threshold_source,
        "round": loaded.round,
        "medfed_version": _medfed_version(),
    }


def _metadata(loaded: LoadedModel) -> dict[str, Any]:
    shape = loaded.shape
    classes = {str(k): f"class {k}" for k in range(shape.num_classes)}
    if shape.task == "segmentation":
        classes["0"] = "background"
        output = {
            "type": "image", "format": "segmentation", "num_channels": shape.num_classes,
            "spatial_shape": list(shape.spatial_shape), "dtype": "float32", "value_range": [0, 1],
            "is_patch_data": True, "channel_def": classes,
        }
    else:
        output = {
            "type": "probabilities", "format": "classes", "num_channels": shape.num_classes,
            "spatial_shape": [shape.num_classes], "dtype": "float32", "value_range": [0, 1],
            "is_patch_data": False, "channel_def": classes,
        }
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medfed {_medfed_version()} from round {loaded.round}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medfed": _medfed_version()},
        "name": f"medfed {loaded.config.model} {shape.task}",
        "task": f"{shape.spatial_dims}D {shape.task}",
        "description": (
            f"A medfed federated {shape.task} model ({loaded.config.model}), exported with medfed export. "
            "Needs medfed installed (network_def and preprocessing are medfed's)."
        ),
        "authors": "medfed export",
        "copyright": "",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "magnitude", "modality": "unknown",
                    "num_channels": shape.in_channels, "spatial_shape": list(shape.spatial_shape),
                    "dtype": "float32", "value_range": [0, 1], "is_patch_data": shape.task == "segmentation",
                    "channel_def": {str(c): f"channel {c}" for c in range(shape.in_channels)},
                }
            },
            "outputs": {"pred": output},
        },
        "medfed": _medfed_info(loaded),
    }


def _inference(loaded: LoadedModel) -> dict[str, Any]:
    shape = loaded.shape
    if shape.task == "segmentation":
        inferer: dict[str, Any] = {
            "_target_": "SlidingWindowInferer", "roi_size": list(shape.spatial_shape), **SLIDING_WINDOW,
        }
    else:
        inferer = {"_target_": "SimpleInferer"}
    return {
        "imports": [
            "$import torch",
            "$from medfed.shared import export as medfed_export",
            "$from medfed.shared import predictions as medfed_predictions",
        ],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "input_path": "",
        "output_dir": "$@bundle_root + '/eval'",
        "sliding_window": False,
        "model_shape": shape.to_json(),
        "threshold": loaded.threshold,
        "network_def": {
            "_target_": "medfed.shared.models.build_model",
            "name": loaded.config.model,
            "spatial_dims": shape.spatial_dims,
            "in_channels": shape.in_channels,
            "out_channels": shape.num_classes,
            "norm": loaded.config.norm,
            "image_size": list(shape.spatial_shape),
        },
        "network": "$@network_def.to(@device).eval()",
        "load_weights": "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, weights_only=True))",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "medfed.shared.inference.ModelInputd",
                    "keys": "image",
                    **loaded.preprocessing.to_json(),
                    "keep_size": "@sliding_window",
                }
            ],
        },
        "inferer": inferer,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': str(i.path)} for i in medfed_predictions.find_inputs(@input_path)]",
            "transform": "@preprocessing",
        },
        "run": [
            "$@load_weights",
            "$medfed_export.run_bundle(network=@network, preprocessing=@preprocessing, inferer=@inferer, "
            "input_path=@input_path, output_dir=@output_dir, model_shape=@model_shape, threshold=@threshold, "
            "device=@device)",
        ],
    }
