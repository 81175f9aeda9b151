"""``load_checkpoint`` (the API other tools reuse), ``ModelShape`` and ``find_inputs``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medfed.shared.config import RunConfig
from medfed.shared.data.base import DataError
from medfed.shared.inference import CheckpointError, ModelShape, load_checkpoint
from medfed.shared.predictions import find_inputs
from tests.support.trained_runs import classification_run, dicom_series


def test_load_checkpoint_gives_an_eval_model_its_shape_threshold_and_preprocessing() -> None:
    run = classification_run()
    loaded = load_checkpoint(run.run_dir / "checkpoints" / "final.pt")
    stored = torch.load(run.run_dir / "checkpoints" / "final.pt", weights_only=True)
    assert loaded.shape == ModelShape("classification", 2, 1, 2, (16, 16))
    assert stored["model_shape"] == loaded.shape.to_json()  # the run recorded it
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.threshold == pytest.approx(stored["metrics"]["threshold"]) and loaded.threshold_source == "validation"
    assert loaded.config == RunConfig.from_mapping(stored["config"]) and loaded.round == 1
    assert loaded.preprocessing.image_size == 16 and loaded.path.name == "final.pt"
    for name, value in stored["state_dict"].items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value)
    assert load_checkpoint(run.run_dir).path.name == "best.pt"  # a run directory: its best checkpoint

    one = loaded.predict_file(run.datalist.parent / "c1.nii.gz")
    image = loaded.preprocessing.read(run.datalist.parent / "c1.nii.gz").image
    with torch.no_grad():
        expected = torch.softmax(loaded.model(torch.from_numpy(image)[None]), dim=1)[0].numpy()
    np.testing.assert_allclose(one.probabilities, expected, atol=1e-6)
    assert one.label == int(expected[1] >= loaded.threshold) and one.mask is None


def test_a_checkpoint_without_model_shape_is_rebuilt_from_its_config(tmp_path: Path) -> None:
    run = classification_run()
    payload = torch.load(run.run_dir / "checkpoints" / "final.pt", weights_only=True)
    del payload["model_shape"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").shape == ModelShape("classification", 2, 1, 2, (16, 16))
    payload["config"]["dataset"] = str(tmp_path / "gone.json")
    torch.save(payload, tmp_path / "gone.pt")
    with pytest.raises(CheckpointError, match="predates recorded model shapes"):
        load_checkpoint(tmp_path / "gone.pt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.pop("state_dict"), "not a medfed checkpoint: it lacks state_dict"),
        (lambda p: p["config"].update({"modle": "unet"}), "run config is not valid"),
        (lambda p: p["model_shape"].update({"num_classes": 3}), "weights do not fit 'simplecnn'"),
        (lambda p: p.update({"model_shape": {"task": "classification"}}), "model_shape is malformed"),
    ],
    ids=["no-state-dict", "bad-config-key", "wrong-classes", "malformed-shape"],
)
def test_broken_checkpoints_are_refused_naming_the_file(tmp_path: Path, change, message: str) -> None:
    payload = torch.load(classification_run().run_dir / "checkpoints" / "final.pt", weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path / "broken.pt")
    assert "broken.pt" in str(info.value)


def test_model_shape_json_round_trip() -> None:
    shape = ModelShape("segmentation", 3, 2, 4, (16, 16, 16))
    assert ModelShape.from_json(json.loads(json.dumps(shape.to_json())), source="x") == shape
    with pytest.raises(CheckpointError, match="inconsistent"):
        ModelShape.from_json({**shape.to_json(), "spatial_shape": [16, 16]}, source="x")


def test_find_inputs_datalists_files_folders_and_series(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), tmp_path / "d" / "b.nii.gz")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "d" / "a.png")
    dicom_series(tmp_path / "d" / "series1", np.zeros((3, 4, 4)))
    (tmp_path / "d" / "readme.txt").write_text("x")
    assert [i.name for i in find_inputs(tmp_path / "d")] == ["a.png", "b.nii.gz", "series1"]
    series = find_inputs(tmp_path / "d" / "series1")
    assert len(series) == 1 and series[0].path == tmp_path / "d" / "series1"  # one series folder: one image

    (tmp_path / "list.json").write_text(json.dumps({"test": [{"image": "d/a.png"}], "training": [{"image": "d/b.nii.gz", "label": 0}]}))
    found = find_inputs(tmp_path / "list.json")
    assert [(i.index, i.name) for i in found] == [(0, "d/b.nii.gz"), (1, "d/a.png")]  # training, then test
    assert found[0].path == tmp_path / "d" / "b.nii.gz"

    dicom_series(tmp_path / "mixed", np.zeros((2, 4, 4)))
    dicom_series(tmp_path / "other", np.zeros((2, 4, 4)))
    for k, f in enumerate(sorted((tmp_path / "other").iterdir())):
        f.rename(tmp_path / "mixed" / f"other{k}.dcm")
    with pytest.raises(DataError, match="2 DICOM series"):
        find_inputs(tmp_path / "mixed")
    with pytest.raises(DataError, match="does not exist"):
        find_inputs(tmp_path / "absent")
    (tmp_path / "empty.json").write_text(json.dumps({"test": []}))
    with pytest.raises(DataError, match="lists no images"):
        find_inputs(tmp_path / "empty.json")
