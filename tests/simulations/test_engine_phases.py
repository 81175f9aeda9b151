"""The phase arithmetic of ``bench.engine_phases`` (the simulation itself is timed by the benchmark, not here)."""

from __future__ import annotations

import pytest

from medfed.simulations.bench.engine_phases import phases


def test_phases_of_a_three_round_timeline() -> None:
    marks = [("init_ray>", 0.0), ("R0", 0.3), ("R1", 6.0), ("R2", 6.5), ("R3", 7.5), ("finish", 7.6),
             ("terminate>", 8.6), ("terminate<", 10.0), ("end", 10.1)]
    assert phases(marks) == {"first_round_s": 6.0, "wall_s": 10.1, "later_round_mean_s": 0.75,
                             "finish_to_terminate_s": 1.0, "terminate_s": 1.4}


def test_one_round_has_no_later_rounds_and_repeated_marks_count_once() -> None:
    marks = [("R0", 0.2), ("R1", 5.0), ("terminate>", 5.5), ("terminate>", 9.0), ("terminate<", 6.5), ("end", 7.0)]
    assert phases(marks) == {"first_round_s": 5.0, "wall_s": 7.0, "terminate_s": 1.0}


def test_a_run_without_its_first_round_is_an_error() -> None:
    with pytest.raises(ValueError, match="no round 1"):
        phases([("R0", 0.1), ("end", 3.0)])
