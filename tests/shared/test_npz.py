"""MedMNIST-style npz reader: shapes, scaling, labels and error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfed.shared.data.base import DataError
from medfed.shared.data.npz import load_npz

SIZES = {"train": 10, "val": 4, "test": 6}


def _write(
    path: Path,
    sample_shape: tuple[int, ...],
    *,
    label_shape: str = "flat",
    num_classes: int = 3,
    drop: str | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a fake MedMNIST file; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in SIZES.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *sample_shape), dtype=np.uint8)
        labels = np.arange(n) % num_classes
        if label_shape == "column":
            labels = labels[:, None]
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    if drop:
        arrays.pop(drop)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize(
    ("sample_shape", "label_shape", "expected_sample"),
    [
        ((28, 28), "flat", (1, 28, 28)),
        ((28, 28), "column", (1, 28, 28)),
        ((20, 20, 3), "flat", (3, 20, 20)),
        ((12, 12, 12), "column", (1, 12, 12, 12)),
    ],
)
def test_shapes_dtypes_scaling(
    tmp_path: Path,
    sample_shape: tuple[int, ...],
    label_shape: str,
    expected_sample: tuple[int, ...],
) -> None:
    path = tmp_path / "set.npz"
    arrays = _write(path, sample_shape, label_shape=label_shape)
    splits = load_npz(path)
    for split, image_set in zip(SIZES, (splits.train, splits.val, splits.test), strict=True):
        assert image_set.images.shape == (SIZES[split], *expected_sample)
        assert image_set.images.dtype == np.float32
        assert image_set.targets.shape == (SIZES[split],)
        assert image_set.targets.dtype == np.int64
        assert image_set.task == "classification"
        raw = arrays[f"{split}_images"].astype(np.float32) / 255
        if len(sample_shape) == 3 and sample_shape[-1] == 3:  # RGB -> channels first
            raw = raw.transpose(0, 3, 1, 2)
        else:
            raw = raw[:, None]
        np.testing.assert_allclose(image_set.images, raw, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(image_set.targets, arrays[f"{split}_labels"].reshape(-1))
    assert 0.0 <= splits.train.images.min() and splits.train.images.max() <= 1.0
    assert splits.num_classes == 3


def test_num_classes_over_all_splits_and_at_least_two(tmp_path: Path) -> None:
    path = tmp_path / "one_class.npz"
    _write(path, (8, 8), num_classes=1)
    assert load_npz(path).num_classes == 2
    # the largest label only in the test split still counts
    arrays = dict(np.load(path))
    arrays["test_labels"] = arrays["test_labels"].copy()
    arrays["test_labels"][0] = 4
    np.savez(path, **arrays)
    assert load_npz(path).num_classes == 5


@pytest.mark.parametrize(
    ("sample_shape", "size", "expected"),
    [((28, 28), 16, (1, 16, 16)), ((20, 20, 3), 32, (3, 32, 32)), ((12, 12, 12), 8, (1, 8, 8, 8))],
)
def test_resize(
    tmp_path: Path, sample_shape: tuple[int, ...], size: int, expected: tuple[int, ...]
) -> None:
    path = tmp_path / "set.npz"
    _write(path, sample_shape)
    splits = load_npz(path, image_size=size)
    assert splits.test.images.shape == (SIZES["test"], *expected)
    assert splits.test.images.dtype == np.float32
    assert splits.test.images.min() >= 0.0 and splits.test.images.max() <= 1.0


def test_multilabel_rejected(tmp_path: Path) -> None:
    path = tmp_path / "chest.npz"
    arrays = _write(path, (8, 8))
    for split, n in SIZES.items():
        arrays[f"{split}_labels"] = np.zeros((n, 14), dtype=np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"chest\.npz.*train_labels.*multi-label"):
        load_npz(path)


def test_missing_file_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere\.npz does not exist"):
        load_npz(tmp_path / "nothere.npz")


def test_missing_key_named(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    _write(path, (8, 8), drop="val_labels")
    with pytest.raises(DataError, match=r"partial\.npz lacks key\(s\) val_labels") as info:
        load_npz(path)
    assert "train_images" in str(info.value)  # says what a valid file holds


@pytest.mark.parametrize(
    "content", [b"this is not a zip file at all", b"PK\x03\x04" + bytes(range(256)) * 4]
)
def test_corrupt_file_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"corrupt\.npz is not a readable npz file.*re-export"):
        load_npz(path)


def test_truncated_file_named(tmp_path: Path) -> None:
    path = tmp_path / "trunc.npz"
    _write(path, (16, 16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"trunc\.npz"):
        load_npz(path)


def test_npy_instead_of_npz(tmp_path: Path) -> None:
    path = tmp_path / "single.npy"
    np.save(path, np.zeros((3, 4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match=r"single\.npy is a single \.npy array"):
        load_npz(path)


def test_wrong_dtype_and_mismatched_lengths(tmp_path: Path) -> None:
    path = tmp_path / "floaty.npz"
    arrays = _write(path, (8, 8))
    arrays["train_images"] = arrays["train_images"].astype(np.float64)
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"floaty\.npz: train_images has dtype float64"):
        load_npz(path)
    arrays = _write(path, (8, 8))
    arrays["val_labels"] = arrays["val_labels"][:-1]
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"val_images has 4 samples but val_labels has 3"):
        load_npz(path)


@pytest.mark.parametrize(
    ("name", "sizes", "sample"),
    [
        pytest.param("breastmnist.npz", (546, 78, 156), (1, 28, 28), marks=pytest.mark.data("breastmnist.npz")),
        pytest.param("adrenalmnist3d.npz", (1188, 98, 298), (1, 28, 28, 28), marks=pytest.mark.data("adrenalmnist3d.npz")),
    ],
)
def test_real_medmnist(name: str, sizes: tuple[int, int, int], sample: tuple[int, ...], medmnist: Path) -> None:
    path = medmnist / name
    splits = load_npz(path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == sizes
    assert splits.train.images.shape[1:] == sample
    assert splits.train.images.dtype == np.float32
    assert 0.0 <= splits.train.images.min() and splits.train.images.max() <= 1.0
    assert splits.num_classes == 2
    assert set(np.unique(splits.train.targets)) == {0, 1}
