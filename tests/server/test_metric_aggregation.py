"""How the server combines the metrics sites report (``medfed.server.strategies.weighted_average``)."""

from __future__ import annotations

import pytest

from medfed.client.site_client import SKIPPED_FILES
from medfed.server.strategies import SUMMED_METRICS, weighted_average

CASES = [
    # (sites as (num_examples, metrics), expected aggregate entries)
    (
        [(100, {"train-loss": 1.0}), (300, {"train-loss": 2.0})],
        {"train-loss": 1.75, "train-loss-min": 1.0, "train-loss-max": 2.0},
    ),
    (
        [(100, {SKIPPED_FILES: 2}), (300, {SKIPPED_FILES: 5}), (50, {SKIPPED_FILES: 0})],
        {SKIPPED_FILES: 7.0, f"{SKIPPED_FILES}-min": 0.0, f"{SKIPPED_FILES}-max": 5.0},
    ),
    (  # a declined DP site (0 examples) still counts its skipped files
        [(0, {SKIPPED_FILES: 3}), (0, {SKIPPED_FILES: 1})],
        {SKIPPED_FILES: 4.0},
    ),
    (  # no examples at all: no mean, but min and max
        [(0, {"train-loss": 1.0})],
        {"train-loss-min": 1.0, "train-loss-max": 1.0},
    ),
]


@pytest.mark.parametrize(("results", "expected"), CASES)
def test_weighted_average(results: list, expected: dict[str, float]) -> None:
    out = weighted_average(results)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key
    if not any(n for n, _ in results):
        assert "train-loss" not in out


def test_site_index_is_dropped_and_counts_are_summed() -> None:
    assert SKIPPED_FILES in SUMMED_METRICS
    out = weighted_average([(10, {"site-index": 0, "auc": 0.5}), (30, {"site-index": 1, "auc": 0.9})])
    assert "site-index" not in out and out["auc"] == pytest.approx(0.8)
