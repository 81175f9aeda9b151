"""The SecAgg+ benchmark's per-stage medians skip round 1 (Ray starting its workers)."""

from __future__ import annotations

from medfed.simulations.bench.secagg import BenchResult


def test_median_stages_skip_the_first_round() -> None:
    rounds = [
        {"setup": 10.0, "share-keys": 0.1, "collect-masked-vectors": 0.5, "unmask": 0.2},
        {"setup": 0.04, "share-keys": 0.06, "collect-masked-vectors": 0.44, "unmask": 0.17},
        {"setup": 0.06, "share-keys": 0.08, "collect-masked-vectors": 0.52, "unmask": 0.15},
        {"setup": 0.05, "share-keys": 0.07, "collect-masked-vectors": 0.48, "unmask": 0.19},
    ]
    result = BenchResult(sites=8, num_params=1_000_000, secagg=True, stage_seconds=rounds)
    assert result.median_stages() == {"setup": 0.05, "share-keys": 0.07, "collect-masked-vectors": 0.48, "unmask": 0.17}
    assert BenchResult(sites=8, num_params=1, secagg=False).median_stages() == {}
