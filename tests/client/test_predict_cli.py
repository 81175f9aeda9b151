"""``medfed predict`` on real one-round runs: rows, probabilities, thresholds, masks with the input's affine
(NIfTI datalist and DICOM series), training's own preprocessing, and clear errors (issue 18)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage
from PIL import Image
from typer.testing import CliRunner

from medfed.cli import app
from medfed.shared.config import RunConfig
from medfed.shared.data.datalist import load_datalist
from medfed.shared.data.dicom_series import read_dicom_series
from medfed.shared.task import model_for
from tests.support.trained_runs import (
    SEG_AFFINE,
    classification_run,
    dicom_series,
    segmentation_run,
    segmentation_volume,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


def _predict(model: Path, source: Path, out: Path, *extra: str) -> list[dict[str, str]]:
    result = runner.invoke(app, ["predict", "--model", str(model), "--input", str(source), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    with (out / "predictions.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_classification_rows_probabilities_and_validation_threshold(tmp_path: Path) -> None:
    run = classification_run()
    rows = _predict(run.run_dir / "checkpoints" / "final.pt", run.datalist, tmp_path)
    entries = json.loads(run.datalist.read_text())["training"]
    assert [r["image"] for r in rows] == [e["image"] for e in entries]
    checkpoint = torch.load(run.run_dir / "checkpoints" / "final.pt", weights_only=True)
    threshold = checkpoint["metrics"]["threshold"]
    for row in rows:
        p0, p1 = float(row["probability-0"]), float(row["probability-1"])
        assert p0 + p1 == pytest.approx(1.0, abs=1e-6)
        assert float(row["threshold"]) == pytest.approx(threshold)
        assert int(row["label"]) == int(p1 >= threshold)
    report = json.loads((tmp_path / "predictions.json").read_text())
    assert report["model"]["threshold_source"] == "validation" and report["model"]["round"] == 1
    assert [r["index"] for r in report["predictions"]] == list(range(len(entries)))

    # The same preprocessing as training: the model on load_datalist's images gives these probabilities.
    cfg = RunConfig.from_mapping(checkpoint["config"])
    every = tmp_path / "every.json"  # all sections given: nothing carved, datalist order kept
    every.write_text(json.dumps({s: [{**e, "image": str(run.datalist.parent / e["image"])} for e in entries]
                                 for s in ("training", "validation", "test")}))
    splits = load_datalist(every, image_size=run.image_size)
    model = model_for(cfg, splits.train)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    with torch.no_grad():
        direct = torch.softmax(model(torch.from_numpy(splits.train.images)), dim=1)
    np.testing.assert_allclose([float(r["probability-1"]) for r in rows], direct[:, 1].numpy(), atol=1e-5)


def test_segmentation_masks_keep_the_inputs_grid_and_affine_nifti_and_dicom_series(tmp_path: Path) -> None:
    run = segmentation_run()
    rows = _predict(run.run_dir, run.datalist, tmp_path / "nifti")  # the run directory: its best.pt
    entries = json.loads(run.datalist.read_text())["training"]
    assert len(rows) == len(entries)
    for row, entry in zip(rows, entries, strict=True):
        mask = nib.load(tmp_path / "nifti" / row["mask"])
        source = nib.load(run.datalist.parent / entry["image"])
        assert mask.shape == source.shape == (20, 18, 22)
        np.testing.assert_allclose(mask.affine, SEG_AFFINE, atol=1e-6)
        values = np.asarray(mask.dataobj)
        assert set(np.unique(values)) <= {0, 1}
        assert int(row["voxels-0"]) + int(row["voxels-1"]) == values.size
        assert int(row["voxels-1"]) == int((values == 1).sum())

    volume, _ = segmentation_volume(np.random.default_rng(7), (10, 20, 18))
    series = dicom_series(tmp_path / "series", volume * 10)
    rows = _predict(run.run_dir, series, tmp_path / "dicom")
    assert len(rows) == 1  # the folder is one series, one image
    mask = nib.load(tmp_path / "dicom" / rows[0]["mask"])
    read = LoadImage(image_only=True, ensure_channel_first=True)(str(series))
    assert mask.shape == tuple(read.shape[1:])
    np.testing.assert_allclose(mask.affine, np.asarray(read.affine), atol=1e-5)
    assert sorted(np.diag(np.abs(mask.affine))[:3].round(3)) == [0.7, 0.7, 2.0]  # the series' spacing


def test_sliding_window_segments_at_the_files_resolution(tmp_path: Path) -> None:
    run = segmentation_run()
    rows = _predict(run.run_dir, run.datalist.parent / "v1.nii.gz", tmp_path, "--sliding-window")
    mask = nib.load(tmp_path / rows[0]["mask"])
    assert len(rows) == 1 and mask.shape == (20, 18, 22)
    np.testing.assert_allclose(mask.affine, SEG_AFFINE, atol=1e-6)
    assert json.loads((tmp_path / "predictions.json").read_text())["model"]["inference"] == "sliding-window"


def test_explain_writes_one_heat_map_per_predicted_row(tmp_path: Path) -> None:
    """``--explain gradcam``: an overlay per row, named by the row's index, each map read from the
    same preprocessed image the row's probabilities came from (the index's predicted class agrees)."""
    run = classification_run()
    rows = _predict(run.run_dir / "checkpoints" / "final.pt", run.datalist, tmp_path, "--explain", "gradcam")
    index = json.loads((tmp_path / "explanations" / "index.json").read_text())
    listed = index["rows"] if isinstance(index, dict) else index
    assert [str(r["index"]) for r in listed] == [r["index"] for r in rows]
    for entry, row in zip(listed, rows, strict=True):
        assert (tmp_path / "explanations" / entry["png"]).is_file()
        assert entry["method"] == "gradcam"
        probs = [float(row["probability-0"]), float(row["probability-1"])]
        assert int(entry["predicted"]) == int(np.argmax(probs))
        assert float(entry["probability"]) == pytest.approx(max(probs), abs=1e-5)


def test_explain_is_refused_for_a_segmentation_model(tmp_path: Path) -> None:
    run = segmentation_run()
    message = _fail(["predict", "--model", str(run.run_dir), "--input", str(run.datalist), "--out",
                     str(tmp_path), "--explain", "gradcam"])
    assert "--explain is for classifiers" in message


def _fail(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def test_clear_errors(tmp_path: Path) -> None:
    run = classification_run()
    final = str(run.run_dir / "checkpoints" / "final.pt")
    out = str(tmp_path / "out")
    assert "does not exist" in _fail(["predict", "-m", str(tmp_path / "nope.pt"), "-i", str(run.datalist), "-o", out])

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    message = _fail(["predict", "-m", str(tmp_path / "other.pt"), "-i", str(run.datalist), "-o", out])
    assert "not a medfed checkpoint" in message and "state_dict" in message

    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    message = _fail(["predict", "-m", final, "-i", str(tmp_path / "rgb.png"), "-o", out])
    assert "input image 0" in message and "3 channel(s) but the model takes 1" in message

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    message = _fail(["predict", "-m", final, "-i", str(tmp_path / "vol.nii.gz"), "-o", out])
    assert "is 3D but the model takes 2D" in message

    message = _fail(["predict", "-m", final, "-i", str(run.datalist), "-o", out, "--sliding-window"])
    assert "segmentation models" in message
    message = _fail(["predict", "-m", final, "-i", str(tmp_path / "missing"), "-o", out])
    assert "does not exist" in message


def test_logs_name_no_input_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from medfed.shared.inference import load_checkpoint
    from medfed.shared.predictions import find_inputs, predict_with

    run = classification_run()
    caplog.set_level("DEBUG", logger="medfed")
    (tmp_path / "in").mkdir()
    for name in ("c0.nii.gz", "c1.nii.gz"):
        (tmp_path / "in" / name).write_bytes((run.datalist.parent / name).read_bytes())
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "in" / "zz-rgb.png")
    loaded = load_checkpoint(run.run_dir / "checkpoints" / "final.pt")
    inputs = find_inputs(tmp_path / "in")
    assert [i.name for i in inputs] == ["c0.nii.gz", "c1.nii.gz", "zz-rgb.png"]  # notes.txt left out, with a warning
    with pytest.raises(ValueError, match="zz-rgb.png"):  # the exception names it (for the CLI user) ...
        predict_with(loaded, inputs, tmp_path / "out")
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "1 file(s) in the input folder are not images" in logged and "image 2 of 3" in logged
    assert not any(name in logged for name in ("c0.nii", "zz-rgb", "notes", str(tmp_path)))  # ... the logs do not


@pytest.mark.data("breastmnist.npz")
def test_a_medmnist_model_predicts_8bit_png_files_as_the_npz_reader_scales_them(medmnist: Path, tmp_path: Path) -> None:
    """An npz-trained model: files are divided by 255 and resized as load_npz does (not scaled per image)."""
    from medfed.shared.data.npz import load_npz
    from medfed.simulations.pooled import run_pooled

    npz = medmnist / "breastmnist.npz"
    cfg = RunConfig(
        dataset=str(npz), model="simplecnn", num_server_rounds=1, local_epochs=1, batch_size=64, store="off",
        run_dir=str(tmp_path), image_size=0, local_test_fraction=0.0,
    )
    run_dir = run_pooled(cfg, run_path=tmp_path / "run").run_dir
    with np.load(npz) as arrays:
        raw = arrays["test_images"][:6]
    (tmp_path / "png").mkdir()
    for i, image in enumerate(raw):
        Image.fromarray(image).save(tmp_path / "png" / f"{i}.png")
    rows = _predict(run_dir / "checkpoints" / "final.pt", tmp_path / "png", tmp_path / "out")
    checkpoint = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)
    test = load_npz(npz).test
    model = model_for(cfg, test)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    with torch.no_grad():
        direct = torch.softmax(model(torch.from_numpy(test.images[:6])), dim=1)[:, 1].numpy()
    np.testing.assert_allclose([float(r["probability-1"]) for r in rows], direct, atol=1e-5)


@pytest.mark.data
def test_a_real_pacs_ct_series_gets_a_mask_on_its_own_grid(medmnist: Path, tmp_path: Path) -> None:
    """Six slices of the real head CT series (GE, 512x512, gantry tilt) and its MD5SUMS file through the 3D
    model: one row, a mask on the series' own grid as medfed reads it (slices in position order,
    the 18.5 degree gantry tilt and the uneven slice gaps corrected: shared.data.dicom_series)."""
    source = medmnist.parent / "dicom" / "ct-head-ge"
    if not source.is_dir():
        pytest.skip(f"needs the real DICOM series {source} (beside the clone, as ../shared/data)")
    series = tmp_path / "series"  # a temporary subset (the whole series takes 40 s to resize on 2 cores)
    series.mkdir()
    for name in ("10.dcm", "11.dcm", "12.dcm", "13.dcm", "14.dcm", "15.dcm", "MD5SUMS"):
        (series / name).write_bytes((source / name).read_bytes())
    rows = _predict(segmentation_run().run_dir, series, tmp_path / "out")
    assert len(rows) == 1
    mask = nib.load(tmp_path / "out" / rows[0]["mask"])
    volume, affine, _ = read_dicom_series(series)
    assert mask.shape == volume.shape and mask.shape[:2] == (512, 512)
    np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
