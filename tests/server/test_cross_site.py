"""The server's side of cross-site evaluation: the best-worst subgroup gap, pooled over sites."""

from __future__ import annotations

from typing import Any

import pytest

from medfed.server.cross_site import build_report, cross_site_config, subgroup_gaps
from medfed.shared.config import RunConfig
from medfed.shared.cross_site import SiteCrossSite, Subgroup


def _site(name: str, *groups: tuple[str, str, int, dict[str, float]]) -> dict[str, Any]:
    return {"site": name, "n": 100, "metrics": {}, "suppressed": 0,
            "subgroups": [{"key": k, "value": v, "n": n, "metrics": m} for k, v, n, m in groups]}


GAPS: dict[str, tuple[list[dict[str, Any]], list[tuple[str, str, str, float, str, float]]]] = {
    "one site": (
        [_site("site-0", ("sex", "F", 20, {"auc": 0.9}), ("sex", "M", 30, {"auc": 0.7}))],
        [("sex", "auc", "F", 0.9, "M", 0.7)],
    ),
    "pooled by subgroup size over sites": (
        [_site("site-0", ("sex", "F", 10, {"auc": 0.9}), ("sex", "M", 10, {"auc": 0.8})),
         _site("site-1", ("sex", "F", 30, {"auc": 0.5}), ("sex", "M", 10, {"auc": 0.6}))],
        [("sex", "auc", "M", 0.7, "F", 0.6)],  # F: (10*0.9 + 30*0.5) / 40 = 0.6
    ),
    "a key with one subgroup has no gap": (
        [_site("site-0", ("scanner", "a", 20, {"auc": 0.9}), ("sex", "F", 10, {"auc": 0.5}))], []
    ),
    "keys in metadata order, every metric but the threshold": (
        [_site("site-0", ("age", "<40", 10, {"accuracy": 0.5, "threshold": 0.3}),
               ("age", "60+", 10, {"accuracy": 0.75, "threshold": 0.3}),
               ("sex", "F", 10, {"dice": 0.4}), ("sex", "M", 10, {"dice": 0.6}))],
        [("sex", "dice", "M", 0.6, "F", 0.4), ("age", "accuracy", "60+", 0.75, "<40", 0.5)],
    ),
}


@pytest.mark.parametrize("case", sorted(GAPS))
def test_subgroup_gaps(case: str) -> None:
    sites, expected = GAPS[case]
    got = subgroup_gaps(sites)
    assert [(g["key"], g["metric"], g["best_value"], g["worst_value"]) for g in got] == [
        (k, m, bv, wv) for k, m, bv, _, wv, _ in expected
    ]
    for gap, (_, _, _, best, _, worst) in zip(got, expected, strict=True):
        assert (gap["best"], gap["worst"], gap["gap"]) == pytest.approx((best, worst, best - worst))


def test_the_report_has_the_agreed_shape() -> None:
    result = SiteCrossSite(40, {"auc": 0.8, "threshold": 0.4},
                           [Subgroup("age", "60plus", 12, {"auc": 0.6}), Subgroup("age", "lt40", 20, {"auc": 0.9}),
                            Subgroup("sex", "f", 21, {"auc": float("nan")})], 1)
    report = build_report([("site-0", result)], checkpoint="final", server_round=3, task="classification", min_count=10)
    assert list(report) == ["checkpoint", "round", "task", "min_count", "sites", "gaps"]
    (site,) = report["sites"]
    assert list(site) == ["site", "n", "metrics", "subgroups", "suppressed"]
    assert [(g["key"], g["value"], g["n"]) for g in site["subgroups"]] == [("sex", "F", 21), ("age", "<40", 20),
                                                                          ("age", "60+", 12)]
    assert site["subgroups"][0]["metrics"] == {}  # no NaN in the JSON
    assert report["gaps"] == [{"key": "age", "metric": "auc", "best_value": "<40", "best": 0.9,
                               "worst_value": "60+", "worst": 0.6, "gap": pytest.approx(0.3)}]


def test_the_request_config() -> None:
    cfg = RunConfig(cross_site_min_count=15)
    assert cross_site_config(cfg, threshold=0.25) == {"cross-site": 1, "cross-site-min-count": 15,
                                                      "cross-site-threshold": 0.25}
    assert cross_site_config(cfg, threshold=None) == {"cross-site": 1, "cross-site-min-count": 15}
