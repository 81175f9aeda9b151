"""Explanation maps (shared/explain.py): Grad-CAM points at what the model learned, and changes when
the model's weights are randomised (Adebayo et al. 2018); every method and model yields valid maps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medfed.shared.data.synthetic import make_bright_blob
from medfed.shared.explain import (
    METHODS,
    check_method,
    explain_batch,
    find_target_layer,
    map_correlation,
    randomized_copy,
    write_explanations,
)
from medfed.shared.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # MONAI occlusion code


# ----------------------------------------------------------------------------- the bright-blob model
@pytest.fixture(scope="module")
def blob_model() -> tuple[nn.Module, np.ndarray, np.ndarray, np.ndarray]:
    """A simplecnn (BatchNorm) trained for a few seconds on 2D images whose class is "has a bright blob";
    returns the model, test images, test labels and the bright blobs' masks."""
    torch.manual_seed(0)
    train, _ = make_bright_blob(spatial_dims=2, num_samples=256, image_size=32, seed=0)
    test, masks = make_bright_blob(spatial_dims=2, num_samples=64, image_size=32, seed=1)
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2, norm="batch")
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    x, y = torch.from_numpy(train.images), torch.from_numpy(train.targets)
    for _ in range(8):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 32):
            batch = order[start : start + 32]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, test.images, test.targets, masks


def _hits(maps: np.ndarray, masks: np.ndarray, which: np.ndarray) -> float:
    """Fraction of the images ``which`` whose map's maximum lies inside the bright blob."""
    inside = [masks[i, 0][np.unravel_index(maps[i, 0].argmax(), maps.shape[2:])] for i in which]
    return float(np.mean(inside))


def test_gradcam_peaks_inside_the_bright_blob(blob_model) -> None:
    model, images, labels, masks = blob_model
    result = explain_batch(model, images, method="gradcam")
    assert (result.predicted == labels).mean() >= 0.9  # the model learned the task
    positive = np.flatnonzero((labels == 1) & (result.predicted == 1))
    assert len(positive) >= 25
    # measured 0.97 (31 of 32 blob images); chance (blob area / image area) is about 0.06
    assert _hits(result.maps, masks, positive) >= 0.8


@pytest.mark.parametrize("method", ["gradcampp", "occlusion"])
def test_other_methods_peak_inside_the_bright_blob(blob_model, method: str) -> None:
    model, images, labels, masks = blob_model
    result = explain_batch(model, images[:16], method=method)
    positive = np.flatnonzero((labels[:16] == 1) & (result.predicted == 1))
    assert _hits(result.maps, masks, positive) >= 0.75  # measured on all 64: gradcampp 1.0, occlusion 1.0


@pytest.mark.parametrize("last", [None, 3], ids=["full", "cascade-last-block"])
def test_randomised_weights_change_the_gradcam_maps(blob_model, last: int | None) -> None:
    """Model randomisation test: over 4 random draws, the mean Spearman correlation of each image's map
    with its trained map is below 0.5 (measured: full 0.18 from draws -0.21, 0.60, 0.17, 0.16; the
    last conv block and head 0.09 from 0.16, -0.26, 0.46, 0.00: one draw alone can exceed 0.5, as a
    random conv net also highlights the brightest blob)."""
    model, images, _, _ = blob_model
    trained = explain_batch(model, images, method="gradcam").maps
    correlations = []
    for seed in range(4):
        random_maps = explain_batch(randomized_copy(model, seed=seed, last=last), images, method="gradcam").maps
        correlations += [map_correlation(a, b) for a, b in zip(trained, random_maps, strict=True)]
    values = np.array(correlations)
    assert np.isnan(values).mean() < 0.1  # constant maps have no correlation; they must be rare
    assert np.nanmean(values) < 0.5
    # the same comparison with the trained model itself is perfect: the test can fail
    assert map_correlation(trained[0], explain_batch(model, images[:1], method="gradcam").maps[0]) > 0.99


def test_randomized_copy_leaves_the_model_alone(blob_model) -> None:
    model, *_ = blob_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = randomized_copy(model, seed=0, last=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(clone.head.weight, model.head.weight)
    assert torch.equal(clone.features[0].weight, model.features[0].weight)  # only the last module


# ----------------------------------------------------------------------------- every model, every method
MODEL_CASES = [
    ("simplecnn", 2, "features.10"),
    ("simplecnn", 3, "features.10"),
    ("densenet121", 2, "class_layers.relu"),
    ("densenet121", 3, "features.transition3.conv"),  # its last block sees one voxel at 32^3
    ("resnet18", 2, "layer4.1.act"),
    pytest.param("resnet18", 3, "layer4.1.act", marks=pytest.mark.slow),
    ("resnet34", 2, "layer4.2.act"),
    pytest.param("resnet34", 3, "layer4.2.act", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "dims", "layer"), MODEL_CASES)
def test_gradcam_works_for_every_model(name: str, dims: int, layer: str) -> None:
    side = 28 if dims == 2 else 16
    torch.manual_seed(0)
    model = build_model(name, spatial_dims=dims, in_channels=1, out_channels=3, norm="group", image_size=side)
    images = torch.rand(2, 1, *(side,) * dims)
    result = explain_batch(model, images, method="gradcam")
    assert result.target_layer == layer
    assert result.maps.shape == (2, 1, *(side,) * dims) and result.maps.dtype == np.float32
    assert result.maps.min() >= 0.0 and result.maps.max() == pytest.approx(1.0)
    assert model.training  # left in the mode it came in
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dims", [2, 3])
def test_every_method_gives_maps_in_unit_range(method: str, dims: int) -> None:
    side = 16 if dims == 2 else 12
    torch.manual_seed(0)
    model = build_model("simplecnn", spatial_dims=dims, in_channels=3 if dims == 2 else 1, out_channels=2).eval()
    images = torch.rand(3, model.features[0].in_channels, *(side,) * dims)
    result = explain_batch(model, images, method=method, occlusion_mask=side // 2)
    assert result.maps.shape == (3, 1, *(side,) * dims)
    assert 0.0 <= result.maps.min() and result.maps.max() <= 1.0
    assert np.ptp(result.maps[0]) > 0  # not a blank map
    assert result.probability.shape == (3,) and np.all((result.probability >= 0.5) & (result.probability <= 1))
    assert (result.target_layer is None) == (method == "occlusion")


def test_a_batch_explains_each_image_for_its_own_class() -> None:
    """MONAI scores logits[:, class_idx], which mixes the classes of a batch; each map here equals
    the map of its image alone."""
    torch.manual_seed(3)
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=4).eval()
    images = torch.rand(8, 1, 16, 16) * torch.linspace(0.2, 3, 8).view(-1, 1, 1, 1)
    for method in ("gradcam", "gradcampp"):
        batch = explain_batch(model, images, method=method)
        assert len(set(batch.predicted.tolist())) > 1  # the batch mixes predicted classes
        for i in range(len(images)):
            alone = explain_batch(model, images[i : i + 1], method=method)
            np.testing.assert_allclose(batch.maps[i], alone.maps[0], atol=1e-4)


def test_a_given_class_and_layer_are_used() -> None:
    torch.manual_seed(0)
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=3).eval()
    images = torch.rand(2, 1, 16, 16)
    result = explain_batch(model, images, method="gradcam", class_index=2, target_layer="features.6")
    assert result.explained.tolist() == [2, 2] and result.target_layer == "features.6"
    with pytest.raises(ValueError, match="out of range: the model has 3 classes"):
        explain_batch(model, images, class_index=3)
    with pytest.raises(ValueError, match="'features.99' is not a layer of the model"):
        explain_batch(model, images, target_layer="features.99")


def test_find_target_layer_skips_pooled_outputs() -> None:
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2)
    assert find_target_layer(model, torch.rand(1, 1, 20, 20)) == "features.10"
    with pytest.raises(ValueError, match="--target-layer"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.rand(1, 1, 2, 2))


@pytest.mark.parametrize("bad", ["gradcm", "lime", ""])
def test_a_bad_method_name_lists_the_valid_ones(bad: str) -> None:
    with pytest.raises(ValueError, match="Valid methods: 'gradcam', 'gradcampp', 'occlusion'"):
        check_method(bad)
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match="is not an explanation method"):
        write_explanations(model, np.zeros((1, 1, 8, 8), np.float32), method=bad, out_dir="unused")


# ----------------------------------------------------------------------------- writing
@pytest.mark.parametrize("dims", [2, 3])
def test_write_explanations_writes_overlays_maps_and_index(tmp_path: Path, dims: int) -> None:
    torch.manual_seed(0)
    model = build_model("simplecnn", spatial_dims=dims, in_channels=1, out_channels=2).eval()
    images = np.random.default_rng(0).random((3, 1, *(12,) * dims), dtype=np.float32)
    done: list[int] = []
    index = write_explanations(
        model, images, method="gradcam", out_dir=tmp_path / "maps", ids=[4, 9, 11], labels=[0, 1, 1],
        batch_size=2, on_batch=done.append, extra={"split": "test"},
    )
    assert done == [2, 1]
    data = json.loads(index.read_text())
    assert data["count"] == 3 and data["split"] == "test" and data["target_layer"] == "features.10"
    assert [row["index"] for row in data["rows"]] == [4, 9, 11]
    assert [row["label"] for row in data["rows"]] == [0, 1, 1]
    for row in data["rows"]:
        png = tmp_path / "maps" / row["png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert set(row) == {"index", "predicted", "probability", "explained", "label", "method", "png", "nifti"}
        if dims == 3:
            volume = nib.load(tmp_path / "maps" / row["nifti"]).get_fdata()
            assert volume.shape == (12, 12, 12) and 0 <= volume.min() and volume.max() <= 1
        else:
            assert row["nifti"] is None
    assert str(tmp_path) not in index.read_text()


@pytest.mark.parametrize(
    ("ids", "message"),
    [([1, 1], "unique"), (["a/b", "c"], "not usable file names"), ([0], "1 ids for 2 images"), (["..", "x"], "not usable")],
)
def test_bad_ids_are_rejected(tmp_path: Path, ids: list, message: str) -> None:
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match=message):
        write_explanations(model, np.zeros((2, 1, 8, 8), np.float32), method="gradcam", out_dir=tmp_path, ids=ids)
    assert not list(tmp_path.iterdir())


def test_bright_blob_data_is_what_it_says() -> None:
    with warnings.catch_warnings():
        data, masks = make_bright_blob(spatial_dims=3, num_samples=6, image_size=12, seed=5)
    assert data.images.shape == (6, 1, 12, 12, 12) and masks.shape == data.images.shape
    assert sorted(data.targets.tolist()) == [0, 0, 0, 1, 1, 1]
    for image, label, mask in zip(data.images, data.targets, masks, strict=True):
        assert mask.any() == bool(label)
        assert (image.max() == 1.0) == bool(label)  # only the bright blob reaches 1
        if label:
            assert np.all(image[mask] == 1.0)
