"""The clearly labelled synthetic dataset: shapes, determinism, learnable labels, masks."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from medfed.shared.data.synthetic import make_synthetic

COMBOS = [
    ("classification", 2, 40, 32),
    ("classification", 3, 20, 16),
    ("segmentation", 2, 40, 32),
    ("segmentation", 3, 20, 16),
]


@pytest.mark.parametrize(("task", "dims", "n", "size"), COMBOS)
def test_shapes_dtypes_ranges(task: str, dims: int, n: int, size: int) -> None:
    splits = make_synthetic(task=task, spatial_dims=dims, num_samples=n, image_size=size, seed=0)
    sets = (splits.train, splits.val, splits.test)
    assert sum(len(s) for s in sets) == n
    assert len(splits.train) == n - 2 * round(0.15 * n)
    assert len(splits.val) == len(splits.test) == round(0.15 * n)
    for s in sets:
        assert s.task == task
        assert s.num_classes == 2
        assert s.images.shape[1:] == (1,) + (size,) * dims
        assert s.images.dtype == np.float32
        assert s.images.min() >= 0.0 and s.images.max() <= 1.0
        assert s.targets.dtype == np.int64
        if task == "classification":
            assert s.targets.shape == (len(s),)
            assert set(np.unique(s.targets)) == {0, 1}  # both classes in every split
        else:
            assert s.targets.shape == (len(s), 1) + (size,) * dims
            assert set(np.unique(s.targets)) <= {0, 1}
            fg = s.targets.reshape(len(s), -1).mean(axis=1)
            assert (fg > 0).all() and (fg < 0.8).all()  # every mask has foreground, not all


@pytest.mark.parametrize(("task", "dims", "n", "size"), COMBOS)
def test_deterministic_for_a_seed(task: str, dims: int, n: int, size: int) -> None:
    kwargs = dict(task=task, spatial_dims=dims, num_samples=n, image_size=size)
    a = make_synthetic(seed=5, **kwargs)
    b = make_synthetic(seed=5, **kwargs)
    c = make_synthetic(seed=6, **kwargs)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.targets, b.test.targets)
    assert not np.array_equal(a.train.images, c.train.images)


def test_segmentation_masks_match_bright_blobs() -> None:
    splits = make_synthetic(
        task="segmentation", spatial_dims=2, num_samples=40, image_size=32, seed=1
    )
    images, masks = splits.train.images[:, 0], splits.train.targets[:, 0]
    assert images[masks == 1].mean() > images[masks == 0].mean() + 0.2


def test_more_classes_and_multiclass_masks() -> None:
    cls = make_synthetic(
        task="classification", spatial_dims=2, num_samples=60, image_size=32, num_classes=3, seed=0
    )
    assert cls.num_classes == 3 and set(np.unique(cls.train.targets)) == {0, 1, 2}
    seg = make_synthetic(
        task="segmentation", spatial_dims=2, num_samples=30, image_size=32, num_classes=3, seed=0
    )
    assert seg.num_classes == 3 and set(np.unique(seg.train.targets)) == {0, 1, 2}


def test_classes_differ_in_blob_count_and_are_learnable() -> None:
    """A linear probe on the pixels beats chance clearly; the mean alone does not decide it."""
    splits = make_synthetic(
        task="classification", spatial_dims=2, num_samples=600, image_size=32, seed=0
    )
    x_train = splits.train.images.reshape(len(splits.train), -1)
    x_test = np.concatenate([splits.val.images, splits.test.images]).reshape(-1, 32 * 32)
    y_train = splits.train.targets
    y_test = np.concatenate([splits.val.targets, splits.test.targets])
    # more foreground on average in class 1 (more blobs)...
    assert x_train[y_train == 1].mean() > x_train[y_train == 0].mean()
    # ...but an oracle threshold on the mean intensity is far from perfect (not trivial)
    m = x_test.mean(axis=1)
    best = max(((m > t) == y_test).mean() for t in np.quantile(m, np.linspace(0.05, 0.95, 37)))
    assert best < 0.9

    # ridge-regularised least squares on 8x8-pooled pixels + mean: clearly above chance
    def feats(x: np.ndarray) -> np.ndarray:
        pooled = x.reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(x), -1)
        return np.hstack([pooled, (x > 0.5).mean(axis=1, keepdims=True), np.ones((len(x), 1))])

    f_train, f_test = feats(x_train), feats(x_test)
    w = np.linalg.solve(
        f_train.T @ f_train + 1e-2 * np.eye(f_train.shape[1]), f_train.T @ (2.0 * y_train - 1)
    )
    acc = ((f_test @ w > 0) == y_test).mean()
    assert acc > 0.7


def test_fast_and_clearly_labelled(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="medfed.shared.data.synthetic"):
        start = time.perf_counter()
        make_synthetic(
            task="classification", spatial_dims=2, num_samples=240, image_size=32, seed=0
        )
        assert time.perf_counter() - start < 2.0
    assert "SYNTHETIC" in caplog.text and "not medical" in caplog.text
    import medfed.shared.data.synthetic as module

    assert "SYNTHETIC" in (module.__doc__ or "")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "detection"}, "synthetic-task"),
        ({"spatial_dims": 4}, "synthetic-dims"),
        ({"image_size": 8}, r"image-size = 8 .*--image-size"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_samples": 4}, r"synthetic-samples = 4 .*--set synthetic-samples="),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = dict(task="classification", spatial_dims=2, num_samples=40, image_size=32, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_synthetic(**args)
