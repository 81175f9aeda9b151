"""Spreading a run's epochs over rounds so that small sites take enough local steps a round."""

from __future__ import annotations

import pytest

from medfed.shared.local_schedule import (
    MIN_LOCAL_STEPS,
    MIN_ROUNDS,
    local_epochs_for,
    schedule_line,
    spread_epochs,
    steps_per_epoch,
)


@pytest.mark.parametrize(
    ("samples", "batch", "steps"),
    [(123, 32, 4), (128, 32, 4), (129, 32, 5), (5, 32, 1), (0, 32, 1), (300, 1, 300)],
)
def test_steps_per_epoch_keeps_the_last_batch(samples: float, batch: int, steps: int) -> None:
    assert steps_per_epoch(samples, batch_size=batch) == steps


@pytest.mark.parametrize(
    ("samples", "batch", "epochs"),
    [
        (123, 32, 4),  # BreastMNIST over 4 sites: 4 steps an epoch
        (243, 32, 2),  # RetinaMNIST
        (267, 32, 2),  # AdrenalMNIST3D
        (300, 32, 2),  # VesselMNIST3D
        (512, 32, 1),  # 16 steps already
        (10_000, 32, 1),
        (10, 32, 16),  # one step an epoch
    ],
)
def test_local_epochs_reach_the_minimum_steps(samples: float, batch: int, epochs: int) -> None:
    assert local_epochs_for(samples, batch_size=batch) == epochs
    assert epochs * steps_per_epoch(samples, batch_size=batch) >= MIN_LOCAL_STEPS
    if epochs > 1:  # the fewest such epochs
        assert (epochs - 1) * steps_per_epoch(samples, batch_size=batch) < MIN_LOCAL_STEPS


@pytest.mark.parametrize(
    ("total", "samples", "expected"),
    [(20, 123, (5, 4)), (20, 243, (10, 2)), (10, 267, (5, 2)), (10, 300, (5, 2)), (20, 5000, (20, 1)),
     (40, 123, (10, 4)), (20, 10, (5, 4)),  # one step an epoch: capped at 4 epochs to keep 5 rounds
     (3, 123, (3, 1)), (9, 123, (9, 1)), (10, 123, (5, 2)), (1, 10, (1, 1))],
)
def test_spread_epochs_keeps_enough_rounds(total: int, samples: float, expected: tuple[int, int]) -> None:
    rounds, local = spread_epochs(total, samples_per_site=samples, batch_size=32)
    assert (rounds, local) == expected
    assert rounds * local <= total
    assert rounds >= min(total, MIN_ROUNDS)


def test_bad_values_name_the_key() -> None:
    with pytest.raises(ValueError, match="batch-size = 0"):
        steps_per_epoch(10, batch_size=0)
    with pytest.raises(ValueError, match="total epochs = 0"):
        spread_epochs(0, samples_per_site=10, batch_size=32)


def test_schedule_line_suggests_the_spread_only_when_steps_are_few() -> None:
    few = schedule_line(train_samples=491, num_sites=4, batch_size=32, rounds=20, local_epochs=1)
    assert "4 optimizer step(s) a round" in few and "--rounds 5 --local-epochs 4" in few
    enough = schedule_line(train_samples=4000, num_sites=4, batch_size=32, rounds=20, local_epochs=1)
    assert "32 optimizer step(s) a round" in enough and "--rounds" not in enough
    short = schedule_line(train_samples=491, num_sites=4, batch_size=32, rounds=3, local_epochs=2)
    assert "8 optimizer step(s) a round" in short and "--rounds" not in short  # 6 epochs: no 5 rounds of more
