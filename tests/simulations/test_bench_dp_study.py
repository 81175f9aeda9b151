"""``bench.dp --part study`` writes section ``"dp"`` of results.json by read-modify-write: its own
rows replace those of the same (dataset, epsilon, init, mode), everything else is kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfed.simulations.bench.dp import STUDY_FIELDS, merge_study_rows


def _row(dataset: str, epsilon: float, auc: float, *, init: str = "random") -> dict[str, object]:
    return {
        "dataset": dataset, "epsilon": epsilon, "delta": 1e-5, "init": init, "mode": "all", "test_auc": auc,
        "test_accuracy": 0.731, "majority_rate": 0.731, "nondp_test_auc": 0.84, "membership_attack_auc": 0.5,
        "dp_time_ratio": 1.4,
    }


def test_rows_replace_their_own_key_and_keep_the_rest(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"quality": [{"x": 1}], "dp": [_row("retinamnist", 3.0, 0.6), _row("breastmnist", 3.0, 0.6)]}))
    merged = merge_study_rows(results, [_row("breastmnist", 3.0, 0.7), _row("breastmnist", 8.0, 0.72, init="public")])
    data = json.loads(results.read_text())
    assert data["quality"] == [{"x": 1}]  # other sections untouched
    assert data["dp"] == merged
    by_key = {(r["dataset"], r["epsilon"], r["init"]): r["test_auc"] for r in merged}
    assert by_key == {("retinamnist", 3.0, "random"): 0.6, ("breastmnist", 3.0, "random"): 0.7,
                      ("breastmnist", 8.0, "public"): 0.72}


@pytest.mark.parametrize("field", sorted(STUDY_FIELDS))
def test_a_row_missing_a_field_is_refused_naming_it(field: str, tmp_path: Path) -> None:
    row = _row("breastmnist", 3.0, 0.7)
    del row[field]
    results = tmp_path / "results.json"
    with pytest.raises(ValueError, match=repr(field)):
        merge_study_rows(results, [row])
    assert not results.exists()  # nothing written


def test_a_non_finite_figure_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test_auc"):
        merge_study_rows(tmp_path / "results.json", [_row("breastmnist", 3.0, float("nan"))])


def test_the_plot_has_one_line_per_start_and_none_without_dp_rows(tmp_path: Path) -> None:
    from medfed.simulations.bench.dp import plot_study

    rows = [_row("breastmnist", e, 0.6 + e / 100) for e in (0.0, 1.0, 3.0)] + [_row("retinamnist", 0.0, 0.7)]
    path = plot_study(rows, dataset="breastmnist", path=tmp_path / "dp.png")
    assert path == tmp_path / "dp.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_study(rows, dataset="retinamnist", path=tmp_path / "r.png") is None  # no DP row
    assert not (tmp_path / "r.png").exists()


def test_a_missing_public_init_exits_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medfed.simulations.bench.dp import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--part", "study", "--data-dir", str(tmp_path), "--public-init", str(tmp_path / "none.pt")])
    assert exit_info.value.code == 2
    assert "--public-init" in capsys.readouterr().err


def test_threshold_decisions_are_chosen_on_validation_for_each_rule() -> None:
    """The study's per-row decisions: at the argmax and at the Youden and accuracy thresholds chosen
    on the validation split; the test labels never move a threshold, and the accuracy rule does
    not fall below the majority rate where the argmax does (a model biased towards the minority)."""
    import numpy as np
    import torch
    from torch import nn

    from medfed.shared.data.base import ImageSet
    from medfed.simulations.bench.dp import threshold_decisions

    class Biased(nn.Module):  # logits from the mean intensity, pushed towards class 1
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = 8.0 * (x.flatten(1).mean(dim=1) - 0.5) + 2.0
            return torch.stack([-m, m], dim=1)

    rng = np.random.default_rng(0)

    def split(n: int, *, flip: bool = False) -> ImageSet:
        labels = (rng.random(n) < 0.2).astype(np.int64)
        brightness = np.clip(0.4 + 0.2 * labels + 0.1 * rng.standard_normal(n), 0, 1).astype(np.float32)
        return ImageSet(np.repeat(brightness[:, None, None, None], 4, axis=2).repeat(4, axis=3),
                        1 - labels if flip else labels, "classification", 2)

    val, test = split(300), split(600)
    flipped = ImageSet(test.images, 1 - test.targets, "classification", 2)
    model = Biased()
    with torch.no_grad():
        logits = model(torch.as_tensor(test.images))
    got = threshold_decisions(model, val=val, test=test, test_logits=logits)
    other = threshold_decisions(model, val=val, test=flipped, test_logits=logits)
    assert set(got) == {"argmax", "youden", "accuracy"}
    for rule in ("youden", "accuracy"):
        assert got[rule]["threshold"] == other[rule]["threshold"]  # chosen on val only
        assert got[rule]["predicted_classes"] == 2
    majority = 0.8
    assert got["argmax"]["accuracy"] < majority - 0.1  # biased: calls most images class 1
    assert got["accuracy"]["accuracy"] > majority and got["accuracy"]["threshold"] > 0.5
    assert got["argmax"]["threshold"] == 0.5


def test_the_attack_plot_draws_rows_with_the_update_attack_only(tmp_path: Path) -> None:
    from medfed.simulations.bench.dp import plot_attacks

    older = [_row("breastmnist", e, 0.7) for e in (0.0, 3.0)]  # rows from before the update attack
    assert plot_attacks(older, path=tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    rows = [{**r, "update_attack_auc": 0.55, "update_attack_interval": [0.52, 0.58]} for r in older]
    path = plot_attacks(rows, path=tmp_path / "plots" / "attacks.png")
    assert path == tmp_path / "plots" / "attacks.png" and path.read_bytes()[:4] == b"\x89PNG"
