"""``bench.overhead`` compares a simulation with a plain loop of the *same* work (no simulation runs here)."""

from __future__ import annotations

import pytest

from medfed.shared.config import RunConfig
from medfed.simulations.bench.overhead import LOOP_WORK, loop_work, measure_overhead
from medfed.simulations.simulate import SimulationResult

EXTRA_WORK_CASES = [
    ({}, ["personalize = 'bn+head'", "cross-site = True"]),  # the defaults: both extras on
    ({"personalize": "off"}, ["cross-site = True"]),
    ({"cross_site": False}, ["personalize = 'bn+head'"]),
    ({"personalize": "off", "cross_site": False, "local_only_baseline": True}, ["local-only-baseline = True"]),
]


@pytest.mark.parametrize(("changes", "named"), EXTRA_WORK_CASES)
def test_a_config_with_work_the_loop_does_not_do_is_refused(changes: dict, named: list[str], tmp_path) -> None:
    cfg = RunConfig(dataset="synthetic", model="simplecnn", run_dir=str(tmp_path), **changes)
    with pytest.raises(ValueError) as err:
        # A finished simulation is passed, so nothing runs: the check comes before any work.
        measure_overhead(cfg, sim=SimulationResult(run_dir=tmp_path))
    message = str(err.value)
    for key in named:
        assert key in message
    assert "loop_work(cfg)" in message
    # Keys already matching the loop are not named.
    for key in ("personalize", "cross-site", "local-only-baseline"):
        if not any(n.startswith(key + " ") for n in named):
            assert f"{key} =" not in message


def test_loop_work_turns_every_extra_off_and_keeps_the_rest(tmp_path) -> None:
    cfg = RunConfig(dataset="synthetic", model="simplecnn", num_sites=3, num_server_rounds=7,
                    local_only_baseline=True, run_dir=str(tmp_path))
    same = loop_work(cfg)
    assert (same.personalize, same.cross_site, same.local_only_baseline) == ("off", False, False)
    assert {k: getattr(same, k) for k in LOOP_WORK} == LOOP_WORK
    assert (same.num_sites, same.num_server_rounds, same.model) == (3, 7, "simplecnn")


def _figures(ratio: float, later_s: float, plain_s: float = 10.0) -> dict[str, float]:
    return {"overhead_ratio": ratio, "later_round_mean_s": later_s, "plain_loop_s": plain_s, "simulation_s": ratio * plain_s}


def test_repeated_measurements_report_the_median_run_with_every_runs_ratios(tmp_path) -> None:
    from medfed.simulations.bench.overhead import median_figures

    cfg = RunConfig(dataset="synthetic", num_server_rounds=10, run_dir=str(tmp_path))
    runs = [_figures(1.4, 1.3), _figures(1.2, 1.2), _figures(1.3, 1.0)]  # plain round: 1.0 s
    chosen = median_figures(cfg, runs)
    assert chosen["overhead_ratio"] == 1.3 and chosen["later_round_mean_s"] == 1.0  # one run's own figures
    assert chosen["ratio_wall_runs"] == [1.4, 1.2, 1.3] and chosen["ratio_later_rounds_runs"] == [1.3, 1.2, 1.0]
    assert chosen["ratio_later_rounds_median"] == pytest.approx(1.2) and chosen["runs"] == 3
    # An even count takes the lower median: the figure in the engine's favour is not the default.
    assert median_figures(cfg, runs[:2])["overhead_ratio"] == 1.2
    with pytest.raises(ValueError, match="no runs"):
        median_figures(cfg, [])


def test_the_plain_loop_evaluates_as_the_simulations_server_does(tmp_path, monkeypatch) -> None:
    """Same work: the server's evaluation (BatchNorm pass on the pooled training split, threshold on
    validation), initial model and every round, not a cheaper test-only pass."""
    from medfed.server import server_app
    from medfed.simulations.bench import overhead

    calls: list[int] = []

    def counting(cfg, splits):
        evaluate = server_app.simulation_evaluate_fn(cfg, splits)

        def evaluate_fn(server_round, weights, config):
            calls.append(server_round)
            return evaluate(server_round, weights, config)

        return evaluate_fn

    monkeypatch.setattr(overhead, "simulation_evaluate_fn", counting)
    cfg = loop_work(RunConfig(dataset="synthetic", model="simplecnn", num_sites=2, num_server_rounds=2,
                              synthetic_samples=32, image_size=12, run_dir=str(tmp_path)))
    assert overhead.plain_loop(cfg) > 0
    assert calls == [0, 1, 2]
