"""Pretraining on public data (:mod:`medfed.shared.pretrain`): channel conversion, the backbone/head
split, supervised and contrastive training on tiny data, and the checkpoint payload init-weights reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medfed.shared.data.base import DataSplits, ImageSet
from medfed.shared.files import file_sha256
from medfed.shared.inference import CHECKPOINT_KEYS, ModelShape
from medfed.shared.models import MODELS, build_model
from medfed.shared.pretrain import (
    HEAD_LAYERS,
    PretrainError,
    PretrainSettings,
    backbone_features,
    convert_channels,
    linear_probe,
    load_public_data,
    pretrain,
    train_contrastive,
    write_checkpoint,
)
from medfed.shared.seeding import seed_everything

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16


def _write_npz(path: Path, *, channels: int, classes: int = 3, n: int = 24, seed: int = 0) -> Path:
    """A MedMNIST-style file whose class shows as a bright band (rows ``5 * label``)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n), ("val", 8), ("test", 8)):
        labels = rng.integers(0, classes, count)
        images = rng.integers(0, 40, (count, SIZE, SIZE, channels) if channels == 3 else (count, SIZE, SIZE))
        for i, label in enumerate(labels):
            images[i, 5 * label : 5 * label + 5, 2:14] = 230
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez(path, **arrays)
    return path


def _gratings(n: int, *, seed: int) -> ImageSet:
    """Easy images for instance discrimination: sine gratings of random frequency, angle and contrast."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    images = np.zeros((n, 1, SIZE, SIZE), np.float32)
    for i in range(n):
        freq, angle, amp = rng.uniform(1, 4), rng.uniform(0, np.pi), rng.uniform(0.3, 0.5)
        images[i, 0] = 0.5 + amp * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    return ImageSet(images, rng.integers(0, 2, n), "classification", 2)


# ---------------------------------------------------------------------------- channels
@pytest.mark.parametrize(
    ("have", "want", "expected"),
    [
        (3, 1, [[0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 1.0]]),  # BT.601 luma of one pixel (0.2, 0.4, 1.0)
        (1, 3, [[0.2], [0.2], [0.2]]),
        (3, 0, [[0.2], [0.4], [1.0]]),
        (3, 3, [[0.2], [0.4], [1.0]]),
    ],
)
def test_convert_channels(have: int, want: int, expected: list[list[float]]) -> None:
    pixel = np.array([0.2, 0.4, 1.0], np.float32)[:have].reshape(1, have, 1, 1)
    out = convert_channels(pixel, channels=want)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, :, 0], expected, rtol=1e-6)


@pytest.mark.parametrize(("have", "want"), [(3, 2), (1, 2), (4, 1)])
def test_convert_channels_refuses_what_it_cannot_do_naming_the_flag(have: int, want: int) -> None:
    with pytest.raises(PretrainError, match=f"--in-channels {want}: the data has {have} channel"):
        convert_channels(np.zeros((1, have, 2, 2), np.float32), channels=want)


# ---------------------------------------------------------------------------- head / backbone
def test_every_classification_model_names_its_head() -> None:
    """A classification model added to the registry must say where its head is (one place)."""
    classification = {name for name, spec in MODELS.items() if spec.task == "classification"}
    assert classification == set(HEAD_LAYERS)


@pytest.mark.parametrize("name", ["simplecnn", "resnet18", "vit", "densenet121"])
def test_backbone_features_are_the_heads_input_and_the_head_comes_back(name: str) -> None:
    model = build_model(name, spatial_dims=2, in_channels=1, out_channels=3, norm="group", image_size=SIZE).eval()
    head = model.get_submodule(HEAD_LAYERS[name])
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach()))
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        logits = model(x)
        with backbone_features(model, name) as width:
            features = model(x)
        after = model(x)
    handle.remove()
    assert isinstance(head, nn.Linear) and width == head.in_features
    assert features.shape == (2, width)
    torch.testing.assert_close(features, seen[0])  # what the head was given
    assert model.get_submodule(HEAD_LAYERS[name]) is head
    torch.testing.assert_close(after, logits)


# ---------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"model": "resnet81"}, "--model 'resnet81'"),
        ({"mode": "masked"}, "--mode 'masked'"),
        ({"norm": "layer"}, "--norm 'layer'"),
        ({"model": "unet"}, "--model 'unet' has none"),
        ({"epochs": 0}, "--epochs 0"),
        ({"batch_size": 1}, "--batch-size 1"),
        ({"learning_rate": 0.0}, "--lr 0.0"),
        ({"temperature": 0.0}, "--temperature 0.0"),
        ({"num_classes": 1}, "--num-classes 1"),
        ({"mode": "supervised", "all_splits": True}, "--all-splits is for --mode contrastive"),
    ],
)
def test_bad_settings_name_the_flag(changes: dict, flag: str) -> None:
    with pytest.raises(PretrainError, match=flag.replace("(", r"\(")):
        PretrainSettings(**{"model": "simplecnn", **changes})


# ---------------------------------------------------------------------------- training
def test_supervised_checkpoint_loads_strictly_into_the_registry_model(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "public.npz", channels=1)
    splits = load_public_data(path)
    settings = PretrainSettings(model="simplecnn", mode="supervised", epochs=2, batch_size=8, learning_rate=3e-3)
    result = pretrain(splits, settings=settings, data_name=path.name, data_sha256=file_sha256(path))
    payload = result.payload
    assert set(CHECKPOINT_KEYS) <= set(payload) and payload["round"] == 0
    assert len(result.epoch_losses) == 2 and all(np.isfinite(result.epoch_losses))
    assert result.epoch_losses[1] < result.epoch_losses[0]
    assert ModelShape.from_json(payload["model_shape"], source="test") == ModelShape(
        "classification", 2, 1, 3, (SIZE, SIZE)
    )
    target = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=3, norm="group", image_size=SIZE)
    target.load_state_dict(payload["state_dict"], strict=True)
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, result.model.state_dict()[key])
    meta = payload["pretrain"]
    assert meta["mode"] == "supervised" and meta["untrained_keys"] == []
    assert meta["loss_per_epoch"] == result.epoch_losses
    assert meta["data"] == {"name": "public.npz", "sha256": file_sha256(path), "samples": 24, "splits": "train",
                            "task": "classification", "classes": 3, "channel_conversion": None}
    assert 0.0 <= payload["metrics"]["val-accuracy"] <= 1.0


def test_contrastive_checkpoint_keeps_the_fresh_head_and_fits_a_target_with_other_classes(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "public_rgb.npz", channels=3)
    splits = load_public_data(path)
    settings = PretrainSettings(model="simplecnn", mode="contrastive", epochs=2, batch_size=8, in_channels=1,
                                num_classes=2, seed=3, all_splits=True)
    result = pretrain(splits, settings=settings, data_name=path.name, data_sha256="0" * 64)
    state = result.payload["state_dict"]
    meta = result.payload["pretrain"]
    assert meta["data"]["channel_conversion"] == "3->1" and meta["head"].startswith("random init")
    assert meta["data"]["samples"] == 24 + 8 + 8 and meta["data"]["splits"] == "train+val+test"
    assert meta["data"]["task"] == "classification" and meta["data"]["classes"] == 3
    assert meta["untrained_keys"] == ["head.weight", "head.bias"]
    assert len(meta["loss_per_epoch"]) == 2
    seed_everything(3)  # the model as pretrain built it, before training
    initial = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2, norm="group", image_size=SIZE)
    # Same config: loads key for key; the head is the freshly initialised one, the backbone trained.
    initial_state = {k: v.clone() for k, v in initial.state_dict().items()}
    initial.load_state_dict(state, strict=True)
    torch.testing.assert_close(state["head.weight"], initial_state["head.weight"])
    assert not torch.equal(state["features.0.weight"], initial_state["features.0.weight"])
    # A target with 5 classes: only the head differs in shape; the rest loads.
    target = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=5, norm="group", image_size=SIZE)
    shapes = target.state_dict()
    mismatched = sorted(k for k, v in state.items() if shapes[k].shape != v.shape)
    assert mismatched == ["head.bias", "head.weight"] and set(state) == set(shapes)
    missing, unexpected = target.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    assert sorted(missing) == mismatched and unexpected == []
    torch.testing.assert_close(target.state_dict()["features.0.weight"], state["features.0.weight"])


def test_contrastive_loss_decreases_on_easy_images() -> None:
    data = _gratings(64, seed=0)
    settings = PretrainSettings(model="simplecnn", mode="contrastive", epochs=4, batch_size=16, seed=0)
    seed_everything(0)
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2, norm="group", image_size=SIZE)
    losses = train_contrastive(model, data, settings=settings, device=torch.device("cpu"))
    assert len(losses) == 4
    assert losses[0] <= np.log(2 * 16 - 1) + 0.05  # NT-Xent starts near chance: log(2B - 1)
    assert losses[-1] < losses[0] - 0.2, losses


def test_the_written_file_is_plain_tensors_and_values_without_the_data_path(tmp_path: Path) -> None:
    folder = tmp_path / "patient-folder-1234"
    folder.mkdir()
    path = _write_npz(folder / "public.npz", channels=1, n=8)
    splits = load_public_data(path)
    settings = PretrainSettings(model="simplecnn", mode="contrastive", epochs=1, batch_size=4)
    result = pretrain(splits, settings=settings, data_name=path.name, data_sha256=file_sha256(path))
    out = write_checkpoint(tmp_path / "out" / "init.pt", result.payload)
    loaded = torch.load(out, map_location="cpu", weights_only=True)
    assert set(loaded) == {*CHECKPOINT_KEYS, "model_shape", "pretrain"}
    assert loaded["config"]["model"] == "simplecnn" and loaded["config"]["norm"] == "group"
    assert "patient-folder-1234" not in repr({k: v for k, v in loaded.items() if k != "state_dict"})


@pytest.mark.parametrize(
    ("path", "message"),
    [("missing.npz", "--data 'missing.npz' does not exist"), ("notes.txt", "unknown file type '.txt'"),
     ("list.json", "give --image-size")],
)
def test_load_public_data_names_the_flag(tmp_path: Path, path: str, message: str) -> None:
    if path != "missing.npz":
        (tmp_path / path).write_text("{}")
    with pytest.raises(PretrainError, match=message):
        load_public_data(tmp_path / path if path != "missing.npz" else path)


def test_supervised_needs_a_model_of_the_datas_task() -> None:
    data = _gratings(8, seed=1)
    with pytest.raises(PretrainError, match="--model 'unet' is a segmentation model"):
        pretrain(DataSplits(data, data, data), settings=PretrainSettings(model="unet", mode="supervised"),
                 data_name="x.npz", data_sha256="0")


def test_linear_probe_scores_a_separable_task_high_and_shuffled_labels_near_chance() -> None:
    """Gratings labelled by frequency (a task random convolutional features already separate) vs. the
    same images with labels that carry no information."""
    data = _gratings(96, seed=2)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    labels = np.zeros(96, np.int64)
    for i in range(96):  # relabel: low (0) or high (1) frequency, regenerated with a known frequency
        freq, angle = rng.choice([1.0, 4.0]), rng.uniform(0, np.pi)
        data.images[i, 0] = 0.5 + 0.4 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
        labels[i] = int(freq > 2)
    seed_everything(0)
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2, norm="group", image_size=SIZE)

    def split(y: np.ndarray) -> tuple[ImageSet, ImageSet]:
        full = ImageSet(data.images, y, "classification", 2)
        return full.subset(np.arange(64)), full.subset(np.arange(64, 96))

    train, test = split(labels)
    separable = linear_probe(model, "simplecnn", train=train, test=test)
    train, test = split(rng.permutation(labels))
    shuffled = linear_probe(model, "simplecnn", train=train, test=test)
    assert separable["auc"] > 0.9, separable
    assert shuffled["auc"] < 0.75, shuffled
    assert model.get_submodule("head") is not None and isinstance(model.head, nn.Linear)


@pytest.mark.parametrize("mode", ["supervised", "contrastive"])
def test_init_weights_loads_a_pretrain_checkpoint_and_keeps_an_untrained_head_new(tmp_path: Path, mode: str) -> None:
    """``medfed pretrain``'s file through ``init-weights``: the backbone loads with its values; a
    contrastive run's head (random, same shape) is reported as newly initialised, not as loaded."""
    from medfed.shared.init_weights import load_init_weights

    path = _write_npz(tmp_path / "public.npz", channels=1)
    settings = PretrainSettings(model="simplecnn", mode=mode, epochs=1, batch_size=8, num_classes=3, seed=1)
    result = pretrain(load_public_data(path), settings=settings, data_name=path.name, data_sha256="0" * 64)
    file = tmp_path / "init.pt"
    torch.save(result.payload, file)
    target = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=3, norm="group", image_size=SIZE)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_init_weights(target, path=file)
    assert report.kind == "medfed checkpoint"
    head = {"head.weight", "head.bias"}
    if mode == "contrastive":
        assert head <= set(report.new) and not head & set(report.loaded)
        torch.testing.assert_close(target.state_dict()["head.weight"], before["head.weight"])
    else:
        assert head <= set(report.loaded)
        torch.testing.assert_close(target.state_dict()["head.weight"], result.payload["state_dict"]["head.weight"])
    torch.testing.assert_close(target.state_dict()["features.0.weight"], result.payload["state_dict"]["features.0.weight"])
