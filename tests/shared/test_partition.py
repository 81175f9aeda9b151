"""Partitioning one dataset into simulated sites, and the train/val/test split helper."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.shared.partition import (
    class_counts,
    local_test_size,
    partition_indices,
    site_partitions,
    split_train_val_test,
)

METHODS = ("iid", "dirichlet", "quantity")


def _labels(n: int = 1000, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n)


def _max_class_share(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean over sites of the largest class share on the site."""
    counts = class_counts(labels, parts, num_classes)
    return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))


@pytest.mark.parametrize(
    ("method", "n", "num_classes", "num_sites", "alpha"),
    [
        ("iid", 1000, 10, 5, 0.5),
        ("iid", 7, 2, 3, 0.5),
        ("dirichlet", 1000, 10, 5, 0.1),
        ("dirichlet", 240, 2, 3, 0.5),
        ("dirichlet", 500, 4, 10, 1.0),
        ("quantity", 1000, 10, 5, 0.5),
        ("quantity", 30, 3, 8, 0.1),
        ("iid", 10, 2, 1, 0.5),
    ],
)
def test_every_index_exactly_once(
    method: str, n: int, num_classes: int, num_sites: int, alpha: float
) -> None:
    labels = _labels(n, num_classes)
    parts = partition_indices(labels, num_sites=num_sites, method=method, alpha=alpha, seed=3)
    assert len(parts) == num_sites
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    assert min(len(p) for p in parts) >= 2  # default min_per_site
    counts = class_counts(labels, parts, num_classes)
    assert counts.shape == (num_sites, num_classes)
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(labels, minlength=num_classes))


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_split_other_seed_other_split(method: str) -> None:
    labels = _labels(400, 4)
    a = partition_indices(labels, num_sites=4, method=method, seed=7)
    b = partition_indices(labels, num_sites=4, method=method, seed=7)
    c = partition_indices(labels, num_sites=4, method=method, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_equal_and_label_mix_close_to_global() -> None:
    labels = _labels(1000, 10)
    parts = partition_indices(labels, num_sites=5, method="iid", seed=0)
    assert [len(p) for p in parts] == [200] * 5
    assert _max_class_share(labels, parts, 10) < 0.2


def test_dirichlet_small_alpha_is_visibly_skewed() -> None:
    labels = _labels(1000, 10)
    iid = _max_class_share(labels, partition_indices(labels, num_sites=5, method="iid", seed=0), 10)
    skew = partition_indices(labels, num_sites=5, method="dirichlet", alpha=0.1, seed=0)
    mild = partition_indices(labels, num_sites=5, method="dirichlet", alpha=100.0, seed=0)
    assert _max_class_share(labels, skew, 10) > iid + 0.2
    assert _max_class_share(labels, mild, 10) < iid + 0.05
    # label skew: some site lacks some class entirely
    assert (class_counts(labels, skew, 10) == 0).any()


def test_quantity_skew_unequal_sizes_iid_labels() -> None:
    labels = _labels(1000, 2)
    parts = partition_indices(labels, num_sites=5, method="quantity", alpha=0.3, seed=1)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 2 * sizes.min()
    big = parts[int(np.argmax(sizes))]
    assert abs(labels[big].mean() - labels.mean()) < 0.1


@pytest.mark.parametrize("min_per_site", [0, 5, 20])
def test_min_per_site_is_respected(min_per_site: int) -> None:
    labels = _labels(200, 5)
    for method in METHODS:
        parts = partition_indices(
            labels, num_sites=6, method=method, alpha=0.2, seed=2, min_per_site=min_per_site
        )
        assert min(len(p) for p in parts) >= min_per_site


def test_class_counts_exact() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]
    np.testing.assert_array_equal(class_counts(labels, parts, 4), [[1, 0, 1, 0], [0, 2, 2, 0]])
    with pytest.raises(ValueError, match="num_classes"):
        class_counts(labels, parts, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_sites": 0}, "num-sites"),
        ({"num_sites": 11}, r"num-sites = 11 .*--sites 10"),
        ({"alpha": 0.0}, r"dirichlet-alpha .*--alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"method": "random"}, "partition = 'random'"),
        ({"min_per_site": 5, "num_sites": 3}, "min_per_site"),
        ({"labels": np.zeros((10, 2), dtype=int)}, "labels"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    args = {"labels": np.arange(10) % 2, "num_sites": 2, "method": "dirichlet", "seed": 0}
    args.update(kwargs)
    labels = args.pop("labels")
    with pytest.raises(ValueError, match=match):
        partition_indices(labels, **args)


def test_dirichlet_impossible_min_raises_clear_error() -> None:
    # 2 samples of one class each over 10 sites with a near-degenerate Dirichlet cannot give
    # every site 1 sample in 100 draws.
    labels = np.repeat(np.arange(2), 6)
    with pytest.raises(ValueError, match=r"min_per_site.*Increase dirichlet-alpha \(--alpha 0\.5\)"):
        partition_indices(
            labels, num_sites=12, method="dirichlet", alpha=0.01, seed=0, min_per_site=1
        )


@pytest.mark.parametrize(("n", "stratify"), [(100, True), (7, True), (3, False), (1000, False)])
def test_split_train_val_test(n: int, stratify: bool) -> None:
    labels = np.arange(n) % 2
    tr, va, te = split_train_val_test(
        labels, val_fraction=0.15, test_fraction=0.15, seed=0, stratify=stratify
    )
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va, te])), np.arange(n))
    assert len(va) == len(te) == max(1, round(0.15 * n))
    if stratify and n >= 100:
        for part in (tr, va, te):
            assert abs(labels[part].mean() - 0.5) < 0.1
    again = split_train_val_test(
        labels, val_fraction=0.15, test_fraction=0.15, seed=0, stratify=stratify
    )
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again, strict=True))


# ------------------------------------------------------------ the sites' validation and local test splits
def _site_splits(method: str, alpha: float, seed: int, num_classes: int, fraction: float, sites: int = 4):
    train = _labels(2000, num_classes, seed=seed)
    val = _labels(500, num_classes, seed=seed + 100)
    parts = site_partitions(
        train, val, num_sites=sites, method=method, alpha=alpha, seed=seed, local_test_fraction=fraction
    )
    return train, val, parts


@pytest.mark.parametrize(
    ("method", "alpha", "seed", "num_classes", "fraction"),
    [
        ("dirichlet", 0.5, 0, 2, 0.1),
        ("dirichlet", 0.5, 1, 2, 0.2),
        ("dirichlet", 0.1, 2, 2, 0.1),
        ("dirichlet", 0.1, 3, 5, 0.1),
        ("dirichlet", 1.0, 4, 5, 0.0),
        ("iid", 0.5, 0, 2, 0.1),
        ("quantity", 0.5, 5, 3, 0.1),
    ],
)
def test_every_site_validates_and_tests_on_its_training_class_mix(
    method: str, alpha: float, seed: int, num_classes: int, fraction: float
) -> None:
    train, val, parts = _site_splits(method, alpha, seed, num_classes, fraction)
    tr = class_counts(train, parts.train, num_classes)
    for labels, split in ((val, parts.val), (train, parts.test)):
        got = class_counts(labels, split, num_classes)
        totals = got.sum(axis=0)
        expected = tr / tr.sum(axis=0, keepdims=True) * totals  # the site's training share of each class
        assert np.abs(got - expected).max() < 2, (got, expected)  # rounding (< 1), plus a top-up of a tiny site
        assert not ((tr == 0) & (got > 0)).any()  # no site validates or tests on a class it never trains on
        for k in range(len(split)):
            if got[k].sum() >= 20:  # large enough for its class shares to be compared
                share = got[k] / got[k].sum()
                assert np.abs(share - tr[k] / tr[k].sum()).sum() < 0.15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_test_splits_come_from_the_training_split_and_leave_training_disjoint(seed: int) -> None:
    train, val, parts = _site_splits("dirichlet", 0.5, seed, 3, 0.1)
    used = np.concatenate([*parts.train, *parts.test])
    np.testing.assert_array_equal(np.sort(used), np.arange(len(train)))  # each training sample in one place
    np.testing.assert_array_equal(np.sort(np.concatenate(parts.val)), np.arange(len(val)))
    assert sum(len(t) for t in parts.test) == local_test_size(len(train), 0.1) == 200
    again = _site_splits("dirichlet", 0.5, seed, 3, 0.1)[2]
    for a, b in zip([*parts.train, *parts.val, *parts.test], [*again.train, *again.val, *again.test], strict=True):
        np.testing.assert_array_equal(a, b)
    other = _site_splits("dirichlet", 0.5, seed + 10, 3, 0.1)[2]
    assert not all(np.array_equal(a, b) for a, b in zip(parts.val, other.val, strict=True))


def test_without_local_tests_the_training_shares_are_the_plain_partition() -> None:
    train, val = _labels(600, 2, seed=1), _labels(100, 2, seed=2)
    parts = site_partitions(train, val, num_sites=3, method="dirichlet", alpha=0.5, seed=4)
    plain = partition_indices(train, num_sites=3, method="dirichlet", alpha=0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts.train, plain, strict=True))
    assert all(len(t) == 0 for t in parts.test)


def test_every_site_gets_a_validation_sample_of_a_class_it_trains_on() -> None:
    train = np.array([0, 1] * 4)
    val = np.array([0, 0, 1, 1])
    parts = site_partitions(train, val, num_sites=4, method="iid", alpha=0.5, seed=0)
    assert [len(v) for v in parts.val] == [1, 1, 1, 1]
    for k in range(4):
        assert set(val[parts.val[k]]) <= set(train[parts.train[k]])
    with pytest.raises(ValueError, match="validation split has 3"):
        site_partitions(train, val[:3], num_sites=4, method="iid", alpha=0.5, seed=0)
