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
