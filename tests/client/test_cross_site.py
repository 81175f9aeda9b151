"""A site's cross-site evaluation: figures per site and per metadata subgroup, subgroups below the
minimum (and those that would reveal them) suppressed, identifier-like values never sent, and
metric names that pass the egress rules."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from medfed.client.cross_site import cross_site_metrics
from medfed.client.egress import allowed_name
from medfed.client.site_client import SiteClient
from medfed.client.site_data import simulated_site_data
from medfed.client.site_policy import SitePolicy
from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.cross_site import (
    CROSS_SITE,
    MIN_COUNT,
    THRESHOLD,
    SiteCrossSite,
    Subgroup,
    decode_metrics,
    encode_metrics,
)
from medfed.shared.data.base import ImageSet
from medfed.shared.metrics import classification_metrics

N = 30


class FirstPixel(nn.Module):
    """Logits ``(0, 4 * (x - 0.5))`` of each image's first pixel ``x``: a fixed, known model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x.reshape(len(x), -1)[:, :1]
        return torch.cat([torch.zeros_like(first), 4 * (first - 0.5)], dim=1)


def _test_set(metadata: list[dict[str, Any]]) -> ImageSet:
    rng = np.random.default_rng(1)
    targets = np.arange(len(metadata)) % 2
    images = rng.random((len(metadata), 1, 2, 2)).astype(np.float32) * 0.6 + 0.4 * targets[:, None, None, None]
    return ImageSet(images, targets.astype(np.int64), "classification", 2, tuple(metadata))


def _sex(*counts: tuple[str, int]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for value, count in counts:
        out += [{"sex": value} if value else {} for _ in range(count)]
    return out


# metadata -> (reported (key, code, n) in order, suppressed), min_count 10
SUPPRESSION: dict[str, tuple[list[dict[str, Any]], list[tuple[str, str, int]], int]] = {
    "both-reported": (_sex(("F", 15), ("M", 15)), [("sex", "f", 15), ("sex", "m", 15)], 0),
    "small-group-suppressed-and-its-complement-too": (_sex(("F", 24), ("M", 6)), [], 2),
    "secondary-suppression-hides-a-small-remainder": (
        _sex(("F", 12), ("M", 12), ("X", 6)), [("sex", "m", 12)], 2
    ),
    "entries-without-the-key-count-as-left-out": (_sex(("F", 20), ("", 10)), [("sex", "f", 20)], 0),
    "a-per-patient-field-is-left-out-whole": ([{"scanner": f"unit-{i % 10}"} for i in range(N)], [], 10),
    "identifier-like-values-are-never-grouped": ([{"scanner": "SN 1234567"} for _ in range(N)], [], 0),
    "age-bands": (
        [{"age": 20 + i} for i in range(N)], [("age", "40to59", 10), ("age", "lt40", 20)], 0
    ),
}


@pytest.mark.parametrize("case", sorted(SUPPRESSION))
def test_subgroups_and_suppression(case: str, caplog: pytest.LogCaptureFixture) -> None:
    metadata, reported, suppressed = SUPPRESSION[case]
    test = _test_set(metadata)
    with caplog.at_level(logging.INFO, logger="medfed.client.cross_site"):
        _, result = cross_site_metrics(FirstPixel(), test, val=None, threshold=0.5, min_count=10,
                                       device=torch.device("cpu"))
    assert [(g.key, g.code, g.n) for g in result.subgroups] == reported
    assert result.suppressed == suppressed and result.n == len(test)
    for group in result.subgroups:
        assert group.n >= 10
    assert "1234567" not in caplog.text and "unit-" not in caplog.text  # the site's log names no value


def test_a_subgroups_figures_are_those_of_its_images_at_the_given_threshold() -> None:
    test = _test_set(_sex(("F", 15), ("M", 15)))
    _, result = cross_site_metrics(FirstPixel(), test, val=None, threshold=0.6, min_count=10, device=torch.device("cpu"))
    logits = FirstPixel()(torch.as_tensor(test.images))
    targets = torch.as_tensor(test.targets)
    females = torch.arange(15)
    expected = classification_metrics(logits[females], targets[females], num_classes=2, threshold=0.6)
    (f, _) = result.subgroups
    assert f.metrics == pytest.approx({k: v for k, v in expected.items() if k in f.metrics})
    assert set(f.metrics) == {"auc", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "threshold"}
    whole = classification_metrics(logits, targets, num_classes=2, threshold=0.6)
    assert result.metrics["auc"] == pytest.approx(whole["auc"]) and result.metrics["threshold"] == 0.6


def test_without_a_global_threshold_the_site_chooses_one_on_its_validation_split() -> None:
    test = _test_set(_sex(("F", 15), ("M", 15)))
    val = _test_set(_sex(("F", 20)))
    _, result = cross_site_metrics(FirstPixel(), test, val=val, threshold=None, min_count=10, device=torch.device("cpu"))
    assert result.metrics["threshold"] != 0.5 and all(g.metrics["threshold"] == result.metrics["threshold"]
                                                      for g in result.subgroups)


def test_names_pass_the_egress_rules_and_decode_back() -> None:
    result = SiteCrossSite(
        n=40, metrics={"auc": 0.7, "balanced-accuracy": 0.6},
        subgroups=[Subgroup("manufacturer", "a-twenty-char-code-x", 12, {"balanced-accuracy": 0.5, "auc": 0.4}),
                   *[Subgroup("age", "40to59", 10, {"accuracy": 0.1 * i}) for i in range(11)]],
        suppressed=3,
    )
    sent = encode_metrics(result)
    assert all(allowed_name(name) for name in sent), [n for n in sent if not allowed_name(n)]
    assert decode_metrics({**sent, "site-index": 2}) == result
    assert decode_metrics({"accuracy": 0.5}) is None
    assert decode_metrics({"xsite-n": float("nan")}) is None  # a bad count from a site is not a row
    odd = decode_metrics({"xsite-n": 5, "xsite-sg-0-sex-f": -1.0, "xsite-sg-1-sex-m": 5, "xsite-sg-1-auc": 0.5})
    assert odd is not None and [(g.code, g.n) for g in odd.subgroups] == [("m", 5)]


def _site(policy: SitePolicy | None = None) -> SiteClient:
    cfg = RunConfig(dataset="synthetic", synthetic_samples=64, model="simplecnn", image_size=12, num_sites=2,
                    local_test_fraction=0.3, store="off", cross_site_min_count=12)
    return SiteClient(cfg=cfg, data=simulated_site_data(cfg, site_index=0, num_sites=2), site_index=0, policy=policy)


def test_a_site_without_metadata_reports_its_figures_and_no_subgroup() -> None:
    site = _site()
    loss, n, metrics = site.evaluate(site.get_parameters({}), {CROSS_SITE: 1, MIN_COUNT: 12, THRESHOLD: 0.4})
    assert site.data.test is not None and n == len(site.data.test) == metrics["xsite-n"]
    assert metrics["xsite-threshold"] == 0.4 and metrics["site-index"] == 0 and loss > 0
    assert metrics["xsite-suppressed"] == 0 and not any(k.startswith("xsite-sg-") for k in metrics)
    _, _, validation = site.evaluate(site.get_parameters({}), {})
    assert not any(k.startswith("xsite") for k in validation)  # the rounds' validation is unchanged


def test_the_site_policy_only_raises_the_minimum() -> None:
    assert _site().cross_site_min_count({MIN_COUNT: 12}) == 12
    assert _site().cross_site_min_count({MIN_COUNT: 30}) == 30
    assert _site(SitePolicy(cross_site_min_count=25)).cross_site_min_count({MIN_COUNT: 12}) == 25
    assert _site(SitePolicy(cross_site_min_count=5)).cross_site_min_count({MIN_COUNT: 2}) == 12  # the run's key


def test_the_policy_key_in_the_node_config() -> None:
    policy = SitePolicy(cross_site_min_count=20)
    assert policy.to_node_config()["cross-site-min-count"] == "20"
    assert SitePolicy.from_node_config({"cross-site-min-count": 20}) == policy
    with pytest.raises(ConfigError, match="cross-site-min-count.*0 .*or an integer >= 2.*site.toml"):
        SitePolicy.from_node_config({"cross-site-min-count": 1})
