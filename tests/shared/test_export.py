"""``medfed export``: the MONAI bundle loads with ``monai.bundle`` and the TorchScript model with
``torch.jit.load``; both give ``medfed predict``'s outputs on the same inputs (within 1e-5; issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run, verify_net_in_out
from typer.testing import CliRunner

from medfed.cli import app
from medfed.shared.inference import load_checkpoint
from medfed.shared.predictions import find_inputs, predict_inputs, predict_with
from tests.support.trained_runs import classification_run, dicom_series, segmentation_run, segmentation_volume

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning"),  # monai.bundle's trust notice
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]

CASES = [pytest.param(classification_run, id="classification-2d"), pytest.param(segmentation_run, id="segmentation-3d")]


def _export(checkpoint: Path, out: Path, fmt: str) -> None:
    result = CliRunner().invoke(app, ["export", "--model", str(checkpoint), "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output


def _assert_same_predictions(expected: Path, got: Path) -> None:
    """Same rows; probabilities within 1e-5; identical masks."""
    a = json.loads((expected / "predictions.json").read_text())["predictions"]
    b = json.loads((got / "predictions.json").read_text())["predictions"]
    assert [r["index"] for r in a] == [r["index"] for r in b] and len(a) > 0
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb)
        for key, value in ra.items():
            if key.startswith("probability-"):
                assert rb[key] == pytest.approx(value, abs=1e-5), key
            elif key == "mask":
                np.testing.assert_array_equal(
                    np.asarray(nib.load(expected / value).dataobj), np.asarray(nib.load(got / rb[key]).dataobj)
                )
                np.testing.assert_allclose(nib.load(expected / value).affine, nib.load(got / rb[key]).affine)
            elif key != "image":
                assert rb[key] == value, key


def _inputs(trained, tmp_path: Path) -> Path:
    """The run's datalist; for the 3D model a folder holding a NIfTI volume and a DICOM series."""
    if trained is classification_run:
        return trained().datalist
    folder = tmp_path / "inputs"
    volume, _ = segmentation_volume(np.random.default_rng(3), (8, 20, 18))
    dicom_series(folder / "series", volume * 10)
    (folder / "v0.nii.gz").write_bytes((trained().datalist.parent / "v0.nii.gz").read_bytes())
    return folder


@pytest.mark.parametrize("trained", CASES)
def test_bundle_runs_with_monai_bundle_and_matches_predict(trained, tmp_path: Path) -> None:
    checkpoint = trained().run_dir / "checkpoints" / "final.pt"
    source = _inputs(trained, tmp_path)
    loaded = load_checkpoint(checkpoint)
    predict_with(loaded, find_inputs(source), tmp_path / "predict")

    bundle = tmp_path / "bundle"
    _export(checkpoint, bundle, "bundle")
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} == {
        "configs/metadata.json", "configs/inference.json", "models/model.pt",
    }
    # MONAI's own check: the network of network_def takes and gives metadata.json's network_data_format.
    verify_net_in_out(
        net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"), device="cpu", bundle_root=str(bundle),
    )
    run(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        bundle_root=str(bundle),
        input_path=str(source),
        output_dir=str(tmp_path / "bundle-out"),
    )
    _assert_same_predictions(tmp_path / "predict", tmp_path / "bundle-out")

    # The bundle's components on their own, as MONAI tools use them: network + weights, preprocessing, inferer.
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    first = find_inputs(source)[0]
    data = parser.get_parsed_content("preprocessing")({"image": str(first.path)})
    fmt = parser.get_parsed_content("_meta_#network_data_format")
    assert list(data["image"].shape) == [fmt["inputs"]["image"]["num_channels"], *fmt["inputs"]["image"]["spatial_shape"]]
    with torch.no_grad():
        pred = parser.get_parsed_content("inferer")(data["image"][None], network)
        probs = parser.get_parsed_content("postprocessing")({"pred": pred[0]})["pred"]
        direct = torch.softmax(loaded.model(torch.as_tensor(data["image"])[None]), dim=1)[0]
    assert probs.shape[0] == fmt["outputs"]["pred"]["num_channels"] == loaded.num_classes
    np.testing.assert_allclose(np.asarray(probs), direct.numpy(), atol=1e-5)


@pytest.mark.parametrize("trained", CASES)
def test_torchscript_loads_and_matches_predict(trained, tmp_path: Path) -> None:
    checkpoint = trained().run_dir / "checkpoints" / "final.pt"
    source = _inputs(trained, tmp_path)
    loaded = load_checkpoint(checkpoint)
    inputs = find_inputs(source)
    predict_with(loaded, inputs, tmp_path / "predict")

    _export(checkpoint, tmp_path / "ts", "torchscript")
    extra = {"medfed.json": ""}
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.ts"), _extra_files=extra)
    info = json.loads(extra["medfed.json"])
    assert info["model_shape"] == loaded.shape.to_json() and info["threshold"] == loaded.threshold
    segmentation = loaded.task == "segmentation"
    predict_inputs(
        scripted, inputs, tmp_path / "ts-out",
        read=lambda p: loaded.preprocessing.read(p, with_affine=segmentation),
        shape=loaded.shape, threshold=loaded.threshold,
    )
    _assert_same_predictions(tmp_path / "predict", tmp_path / "ts-out")


def test_export_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", "-m", str(tmp_path / "none.pt"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())
    assert not (tmp_path / "b").exists()
