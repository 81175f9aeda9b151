"""``medfed.simulations.bench.quality_study``: the rerunnable quality study (issue 14).

The study runs on tiny synthetic files in the MedMNIST layout (``{train,val,test}_{images,labels}``)
with one round, so every method trains for real in a few seconds; the acceptance checks are
tested on hand-made rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medfed.simulations.bench.quality_study import (
    ALTERNATIVES,
    DATASETS,
    MEASURED_LIMITS,
    NUM_SITES,
    SCHEDULES,
    STUDY_EPOCHS,
    TRAIN_IMAGES,
    Cell,
    Check,
    acceptance_checks,
    decision_table,
    global_scorer,
    main,
    merge_rows,
    methods_for,
    plan_study,
    prediction_figures,
    run_study,
    training_log_prior,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REQUIRED = (
    "dataset", "partition", "seed", "method", "test_auc", "test_accuracy", "test_balanced_accuracy",
    "majority_rate", "pooled_test_auc", "selected_round_test_auc", "model", "epochs", "rounds", "seconds",
)
METHODS = ["default", "fedprox", "pooled", "local-only"]
ONE_ROUND = {"num-server-rounds": 1, "local-epochs": 1, "batch-size": 16}
"""The tests' cells: one round of one local epoch (the study's schedules train more)."""


def write_medmnist(path: Path, *, sizes: tuple[int, int, int] = (48, 16, 24), side: int = 14, seed: int = 0) -> Path:
    """A learnable 2-class 2D set in the MedMNIST layout: class 1 images are brighter."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        labels = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
        labels[:2, 0] = [0, 1]  # both classes in every split
        images = rng.integers(0, 120, size=(n, side, side)) + 100 * labels[:, :, None]
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One dataset x one seed x two partitions x four methods, one round each, written to results.json."""
    root = tmp_path_factory.mktemp("study")
    write_medmnist(root / "breastmnist.npz")
    results = root / "results.json"
    results.write_text(json.dumps({"overhead": {"ratio": 1.1}}))  # another section, which must survive
    plan = plan_study(
        data_dir=root, datasets=["breastmnist"], partitions=["iid", "dirichlet"], seeds=[0], methods=METHODS,
        alternative="fedprox", run_dir=str(root / "runs"), extra=ONE_ROUND,
    )
    before = torch.get_num_threads()
    seen: list[int] = []
    rows = run_study(plan, results=results, workers=1, on_cell=lambda cell, rows, i, total, s: seen.append(i))
    torch.set_num_threads(before)
    return {"root": root, "results": results, "plan": plan, "rows": rows, "seen": seen}


def test_every_method_and_partition_gets_a_row_with_every_field(study: dict[str, Any]) -> None:
    rows = study["rows"]
    # pooled is one run serving both partitions: 7 cells, 8 rows
    assert len(study["plan"].cells) == 7 and study["seen"] == list(range(1, 8))
    assert sorted((r["partition"], r["method"]) for r in rows) == sorted(
        (p, m) for p in ("iid", "dirichlet") for m in METHODS
    )
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, f"{row['method']} {row['partition']}: missing {missing}"
        assert row["dataset"] == "breastmnist" and row["seed"] == 0 and row["model"] == "simplecnn"
        assert row["epochs"] == row["rounds"] * row["local_epochs"] == 1
        for key in ("test_auc", "test_accuracy", "test_balanced_accuracy", "majority_rate", "pooled_test_auc"):
            assert 0.0 <= row[key] <= 1.0, (row["method"], key, row[key])
    pooled = {r["partition"]: r for r in rows if r["method"] == "pooled"}
    assert pooled["iid"]["test_auc"] == pooled["dirichlet"]["test_auc"]
    assert all(r["pooled_test_auc"] == pooled["iid"]["test_auc"] for r in rows)
    # every method trains with the default loss, pooled included: the ratios compare regimes, not losses
    assert {(r["loss"], r["pooled_loss"]) for r in rows} == {("balanced-softmax", "balanced-softmax")}
    # the test split's class mix, computed from its labels
    with np.load(study["root"] / "breastmnist.npz") as data:
        labels = data["test_labels"][:, 0]
    assert all(r["majority_rate"] == round(max(np.bincount(labels)) / len(labels), 4) for r in rows)
    federated = [r for r in rows if r["kind"] == "federated"]
    assert all(r["selected_round"] == 1 and r["selected_round_test_auc"] is not None for r in federated)
    local = [r for r in rows if r["method"] == "local-only"]
    assert all(len(r["site_test_auc"]) == 4 and r["selected_round_test_auc"] is None for r in local)
    assert all(r["test_auc"] == pytest.approx(np.mean(r["site_test_auc"]), abs=1e-3) for r in local)
    assert {r["overrides"].get("strategy") for r in rows if r["method"] == "fedprox"} == {"fedprox"}
    # each site's local test split: the global and the kept (personalized) model, and each site alone
    for r in federated:
        assert len(r["site_local_test_auc_global"]) == len(r["site_local_test_auc_personalized"]) == 4
        for key in ("global", "personalized"):
            aucs = [a for a in r[f"site_local_test_auc_{key}"] if a is not None]  # None: one class locally
            assert aucs and r[f"local_test_auc_{key}"] == pytest.approx(np.mean(aucs), abs=1e-3)
    assert all(len(r["site_local_test_auc_local_only"]) == 4 for r in local)
    # the population decision's figures (logits + log training class shares), on every method
    for r in rows:
        assert 0.0 <= r["test_accuracy_prior"] <= 1.0 and 0.0 <= r["test_balanced_accuracy_prior"] <= 1.0
        assert r["predicted_classes_prior"] in (1, 2) and r["test_loss_prior"] > 0 and r["test_loss"] > 0


@pytest.mark.parametrize("bn_mode", ["global", "local-stats", "fedbn"])
def test_the_global_model_is_scored_with_the_statistics_the_server_gives_it(tmp_path: Path, bn_mode: str) -> None:
    """Where the sites keep their BatchNorm statistics the global weights carry the initial ones (the sites
    send back what they received): the study must score the model with statistics re-estimated on the
    training split, as the server's evaluation does, not with those."""
    from medfed.shared.config import RunConfig
    from medfed.shared.data.loading import load_dataset
    from medfed.shared.weights import get_weights

    cfg = RunConfig(dataset=str(write_medmnist(tmp_path / "breastmnist.npz")), model="simplecnn", bn_mode=bn_mode,
                    eval_precision="fp32")
    train = load_dataset(cfg).train
    scorer = global_scorer(cfg, train)
    weights = get_weights(scorer.model)  # fresh: running means 0, variances 1
    first = next(m for m in scorer.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model = scorer.load(weights)
    assert model is scorer.model and not model.training
    if bn_mode == "global":
        assert torch.equal(first.running_mean, torch.zeros_like(first.running_mean))
        return
    # re-estimated: the first convolution's outputs over the training images, not the initial 0 and 1
    assert float(first.running_mean.abs().max()) > 1e-3
    assert not torch.allclose(first.running_var, torch.ones_like(first.running_var))
    assert torch.equal(first.num_batches_tracked, torch.tensor(1))  # one pass over the 48 images, batch 64


def test_rows_go_to_the_quality_section_and_other_sections_stay(study: dict[str, Any]) -> None:
    data = json.loads(study["results"].read_text())
    assert data["overhead"] == {"ratio": 1.1}
    assert len(data["quality"]) == 8


def test_a_second_run_skips_the_cells_already_written(study: dict[str, Any]) -> None:
    root, rows = study["root"], json.loads(study["results"].read_text())["quality"]
    args: dict[str, Any] = dict(data_dir=root, datasets=["breastmnist"], partitions=["iid", "dirichlet"], seeds=[0],
                                methods=METHODS, alternative="fedprox", run_dir=str(root / "runs"))
    again = plan_study(**args, existing=rows, extra=ONE_ROUND)
    assert again.cells == [] and len(again.skipped) == 7
    # a lost row is measured again, and only that one
    kept = [r for r in rows if not (r["method"] == "default" and r["partition"] == "iid")]
    partial = plan_study(**args, existing=kept, extra=ONE_ROUND)
    assert [(c.method.name, c.partitions) for c in partial.cells] == [("default", ("iid",))]
    # other settings (two rounds) are another measurement: every cell runs again
    changed = plan_study(**args, existing=rows, extra={"num-server-rounds": 2, "batch-size": 16})
    assert len(changed.cells) == 7
    assert len(plan_study(**args, existing=rows, extra=ONE_ROUND,
                          fresh=True).cells) == 7


def test_the_command_refuses_missing_files_naming_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_medmnist(tmp_path / "breastmnist.npz")
    code = main(["--data-dir", str(tmp_path), "--results", str(tmp_path / "r.json"), "--out", str(tmp_path / "B.md")])
    err = capsys.readouterr().err
    assert code == 2
    assert "retinamnist.npz" in err and "adrenalmnist3d.npz" in err and "vesselmnist3d.npz" in err
    assert "breastmnist.npz" not in err and "--datasets" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--methods", "default", "fedavgx"], "fedavgx"),
        (["--alternative", "nope"], "nope"),
        (["--partitions", "quantity"], "quantity"),
        (["--set", "learning-rat=0.1"], "learning-rat"),
    ],
)
def test_the_command_refuses_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                       names: str) -> None:
    write_medmnist(tmp_path / "breastmnist.npz")
    code = main(["--data-dir", str(tmp_path), "--datasets", "breastmnist", "--results", str(tmp_path / "r.json"),
                 "--out", str(tmp_path / "B.md"), *argv])
    assert code == 2 and names in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- acceptance from rows
def _row(dataset: str, partition: str, seed: int, method: str, auc: float, *, accuracy: float = 0.8,
         majority: float = 0.7, selected: float | None = None, pooled: float = 0.9) -> dict[str, Any]:
    return {
        "dataset": dataset, "partition": partition, "seed": seed, "method": method, "schedule": "study",
        "model": "simplecnn", "rounds": 20, "local_epochs": 1, "epochs": 20, "test_auc": auc,
        "test_accuracy": accuracy, "test_balanced_accuracy": accuracy, "majority_rate": majority,
        "selected_round_test_auc": auc if selected is None else selected, "selected_round": 20,
        "pooled_test_auc": pooled, "predicted_classes": 2, "seconds": 1.0,
        "site_train_class_counts": [[5, 5], [0, 9], [4, 1], [3, 3]],
    }


def _rows(dir_aucs: list[float], iid_aucs: list[float], *, pooled: float = 0.9, **kw: Any) -> list[dict[str, Any]]:
    rows = [_row("breastmnist", "dirichlet", s, "default", a, pooled=pooled, **kw) for s, a in enumerate(dir_aucs)]
    rows += [_row("breastmnist", "iid", s, "default", a, pooled=pooled, **kw) for s, a in enumerate(iid_aucs)]
    rows += [_row("breastmnist", p, s, "pooled", pooled, pooled=pooled) for p in ("iid", "dirichlet")
             for s in range(len(dir_aucs))]
    return rows


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {"pooled" if c.name.startswith("pooled") else c.name: c for c in checks}


MEAN = "federated / pooled test AUC, Dirichlet 0.5, mean over seeds"
FLOOR = "federated / pooled test AUC, Dirichlet 0.5, lowest split"
IID = "federated / pooled test AUC, IID, mean over seeds"
ACC = "final-round test accuracy above the majority-class rate, every split"
GAP = "|final-round - validation-selected round| test AUC, every split"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # every ratio 0.99: all met (pooled 0.9 < 0.901: the published check is not met)
        (_rows([0.891] * 5, [0.891] * 5), {MEAN: True, FLOOR: True, IID: True, ACC: True, GAP: True, "pooled": False}),
        # mean 0.968 (< 0.97) though no split is below 0.90
        (_rows([0.9, 0.9, 0.9, 0.837, 0.819], [0.9] * 5), {MEAN: False, FLOOR: True, IID: True}),
        # mean 0.974 meets, but one split at 0.889 (< 0.90)
        (_rows([0.9, 0.9, 0.9, 0.883, 0.8], [0.9] * 5), {MEAN: True, FLOOR: False}),
        # IID mean 0.979 (< 0.98)
        (_rows([0.9] * 5, [0.881] * 5), {IID: False, MEAN: True}),
        # accuracy equal to the majority rate is not above it
        (_rows([0.9] * 5, [0.9] * 5, accuracy=0.7, majority=0.7), {ACC: False}),
        # selected round 0.031 away from the final one
        (_rows([0.9] * 5, [0.9] * 5, selected=0.869), {GAP: False}),
        (_rows([0.9] * 5, [0.9] * 5, selected=0.871), {GAP: True}),
        # pooled at the published figure meets it
        (_rows([0.9] * 5, [0.9] * 5, pooled=0.901), {"pooled": True}),
        # no rows of the default method: nothing measured, nothing met
        ([_row("breastmnist", "iid", 0, "pooled", 0.95)], {MEAN: None, FLOOR: None, IID: None, ACC: None, GAP: None,
                                                           "pooled": True}),
    ],
)
def test_acceptance_checks_from_rows(rows: list[dict[str, Any]], expected: dict[str, bool | None]) -> None:
    checks = _by_name(acceptance_checks(merge_rows([], rows)))
    assert {name: checks[name].met for name in expected} == expected


def test_each_row_quotes_the_pooled_run_of_its_own_length_and_partition() -> None:
    rows = _rows([0.9] * 5, [0.9] * 5)  # 20 epochs, pooled 0.9 for both partitions
    longer = [{**_row("breastmnist", "dirichlet", 0, "pooled", 0.95, pooled=0.95), "epochs": 80},
              {**_row("breastmnist", "dirichlet", 0, "default", 0.93, pooled=0.95), "epochs": 80}]
    merged = merge_rows([], [*rows, *longer[:1]])  # the 80-epoch pooled run replaced the Dirichlet row only
    by = {(r["partition"], r["method"], r["seed"]): r for r in merged}
    assert by[("iid", "pooled", 0)]["epochs"] == 20 and by[("dirichlet", "pooled", 0)]["epochs"] == 80
    assert by[("iid", "default", 0)]["pooled_test_auc"] == 0.9  # its own length (20), not the newer row
    assert by[("dirichlet", "default", 0)]["pooled_test_auc"] == 0.9  # 20 epochs: the IID row's run (same length)
    alone = merge_rows([], [r for r in merged if not (r["method"] == "pooled" and r["epochs"] == 20 and r["seed"] == 0)])
    assert {r["pooled_test_auc"] for r in alone if r["seed"] == 0 and r["epochs"] == 20} == {None}  # no 20-epoch run
    merged = merge_rows(merged, longer[1:])
    assert {r["pooled_test_auc"] for r in merged if r["method"] == "default" and r["seed"] == 0
            and r["partition"] == "dirichlet"} == {0.95}


def test_a_low_split_names_its_seed_and_its_single_class_sites() -> None:
    checks = _by_name(acceptance_checks(merge_rows([], _rows([0.9, 0.9, 0.9, 0.7, 0.9], [0.9] * 5))))
    assert checks[FLOOR].met is False
    assert "seed 3: 0.778" in checks[FLOOR].limits and "1 of 4 sites train on one class" in checks[FLOOR].limits
    assert checks[FLOOR].measured == "0.778 (n=5)"


PERSONAL = "personalized mean local-test AUC >= global and >= local-only, Dirichlet 0.5, mean over seeds"


@pytest.mark.parametrize(
    ("personalized", "global_", "alone", "met"),
    [(0.80, 0.78, 0.70, True), (0.78, 0.78, 0.78, True), (0.77, 0.78, 0.70, False), (0.75, 0.70, 0.76, False)],
)
def test_personalization_is_checked_against_the_global_and_the_local_only_model(
    personalized: float, global_: float, alone: float, met: bool
) -> None:
    rows = _rows([0.9] * 5, [0.9] * 5)
    for r in rows:
        if r["method"] == "default" and r["partition"] == "dirichlet":
            r.update(local_test_auc_personalized=personalized, local_test_auc_global=global_,
                     site_local_test_class_counts=[[2, 31], [3, 6], [8, 2], [2, 1]])  # BreastMNIST seed 0's
    rows += [{**_row("breastmnist", "dirichlet", s, "local-only", 0.7), "local_test_auc_local_only": alone}
             for s in range(5)]
    check = _by_name(acceptance_checks(merge_rows([], rows)))[PERSONAL]
    assert check.met is met and f"personalized {personalized:.3f}" in check.measured
    assert ("local test splits hold 3-33 images" in check.limits) is (not met)
    assert _by_name(acceptance_checks(merge_rows([], _rows([0.9] * 5, [0.9] * 5))))[PERSONAL].met is None


def test_a_missed_ratio_line_names_the_measured_limit_of_its_set() -> None:
    checks = _by_name(acceptance_checks(merge_rows([], _rows([0.85] * 5, [0.85] * 5))))
    for name, partition in ((MEAN, "dirichlet"), (IID, "iid")):
        assert checks[name].met is False
        assert checks[name].limits.startswith(MEASURED_LIMITS[("breastmnist", partition)])
        assert "simplecnn, 20 epochs" in checks[name].limits
    assert _by_name(acceptance_checks(merge_rows([], _rows([0.9] * 5, [0.9] * 5))))[MEAN].limits == ""
    other = [{**r, "dataset": "retinamnist"} for r in _rows([0.85] * 5, [0.85] * 5)]  # no measured limit
    assert _by_name(acceptance_checks(merge_rows([], other)))[MEAN].limits.startswith("the study's model and schedule")


def test_a_ratio_of_two_losses_is_named_in_the_limits() -> None:
    rows = _rows([0.9] * 5, [0.9] * 5)
    for r in rows:
        r["loss"] = "ce" if r["method"] == "pooled" else "balanced-softmax"
    checks = _by_name(acceptance_checks(merge_rows([], rows)))
    assert "different losses (balanced-softmax vs pooled ce)" in checks[MEAN].limits
    assert "loss ce" in checks["pooled"].name
    for r in rows:
        r["loss"] = "balanced-softmax"
    assert "different losses" not in _by_name(acceptance_checks(merge_rows([], rows)))[MEAN].limits


def test_summary_only_writes_the_region_and_keeps_the_notes(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"quality": _rows([0.85] * 5, [0.9] * 5)}))
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# notes\n\nhand-written\n\n<!-- bench:quality-study -->\nold\n<!-- /bench -->\n\nafter\n")
    code = main(["--summary-only", "--results", str(results), "--out", str(out), "--plots", str(tmp_path / "plots"),
                 "--data-dir", str(tmp_path), "--datasets", "breastmnist"])
    text = out.read_text()
    assert code == 0
    assert text.startswith("# notes\n\nhand-written\n") and text.rstrip().endswith("after") and "\nold\n" not in text
    assert "**not met**" in text and "0.944 (n=5)" in text  # 0.85 / 0.9, mean over the Dirichlet seeds
    assert "](plots/quality-study.png)" in text and (tmp_path / "plots" / "quality-study.png").stat().st_size > 0
    assert json.loads(results.read_text())["quality"][0]["dataset"] == "breastmnist"  # rows kept


@pytest.mark.parametrize(
    ("logits", "targets", "expected"),
    [
        # always class 1 on a 3:1 set: accuracy 0.25, balanced 0.5, majority 0.75, one class predicted
        ([[0, 1], [0, 1], [0, 1], [0, 1]], [0, 0, 0, 1], {"accuracy": 0.25, "balanced_accuracy": 0.5,
                                                          "majority_rate": 0.75, "predicted_classes": 1}),
        # perfect
        ([[1, 0], [1, 0], [0, 1], [0, 1]], [0, 0, 1, 1], {"accuracy": 1.0, "balanced_accuracy": 1.0, "auc": 1.0,
                                                          "majority_rate": 0.5, "predicted_classes": 2}),
        # 3 classes, one recall 0: balanced (1 + 1 + 0) / 3
        ([[5, 0, 0], [0, 5, 0], [5, 0, 0], [5, 0, 0]], [0, 1, 2, 2],
         {"accuracy": 0.5, "balanced_accuracy": pytest.approx(2 / 3), "majority_rate": 0.5, "predicted_classes": 2}),
    ],
)
def test_prediction_figures(logits: list[list[float]], targets: list[int], expected: dict[str, float]) -> None:
    figures = prediction_figures(torch.tensor(logits, dtype=torch.float32), torch.tensor(targets),
                                 num_classes=len(logits[0]))
    assert {k: figures[k] for k in expected} == expected
    assert math.isfinite(figures["loss"])


PRIOR_CASES = [
    # balanced logits that call the two weak examples class 1 (right); a 3:1 prior for class 0 flips both (wrong)
    ([[0.0, 0.2], [0.0, 2.0], [2.0, 0.0], [0.0, 0.1]], [1, 1, 0, 1], [3.0, 1.0],
     {"accuracy": 1.0, "accuracy_prior": 0.5, "predicted_classes_prior": 2}),
    # a prior of equal shares changes nothing
    ([[0.0, 0.2], [1.0, 0.0], [2.0, 0.0], [0.0, 0.1]], [1, 0, 0, 0], [1.0, 1.0],
     {"accuracy": 0.75, "accuracy_prior": 0.75, "balanced_accuracy_prior": pytest.approx(5 / 6)}),
    # majority class 0 (3 of 4): the balanced argmax calls two examples class 1, the prior one of them back
    ([[0.0, 0.5], [0.0, 3.0], [1.0, 0.0], [0.0, 0.3]], [0, 1, 0, 0], [3.0, 1.0],
     {"accuracy": 0.5, "accuracy_prior": 1.0, "balanced_accuracy_prior": 1.0}),
]


@pytest.mark.parametrize(("logits", "targets", "counts", "expected"), PRIOR_CASES)
def test_the_population_decision_adds_the_log_training_shares(
    logits: list[list[float]], targets: list[int], counts: list[float], expected: dict[str, float]
) -> None:
    shares = torch.tensor(counts) / sum(counts)
    figures = prediction_figures(torch.tensor(logits), torch.tensor(targets), num_classes=2, log_prior=torch.log(shares))
    assert {k: figures[k] for k in expected} == expected
    # the binary AUC is a ranking: a constant shift of the logit difference leaves it as it is
    assert figures["auc_prior"] == pytest.approx(figures["auc"])
    assert "accuracy_prior" not in prediction_figures(torch.tensor(logits), torch.tensor(targets), num_classes=2)


def test_the_training_log_prior_counts_every_class_at_least_once() -> None:
    from medfed.shared.data.base import ImageSet

    data = ImageSet(images=np.zeros((4, 1, 2, 2), dtype=np.float32), targets=np.array([0, 0, 0, 2]),
                    task="classification", num_classes=3)
    assert torch.exp(training_log_prior(data)).tolist() == pytest.approx([3 / 5, 1 / 5, 1 / 5])


def test_the_decision_table_counts_splits_above_the_majority_at_each_decision() -> None:
    rows = [dict(_row("breastmnist", "dirichlet", s, "default", 0.8), test_accuracy=acc, test_accuracy_prior=prior,
                 majority_rate=0.73, predicted_classes_prior=classes, test_balanced_accuracy=0.7,
                 test_balanced_accuracy_prior=0.6, test_loss=0.6, test_loss_prior=0.5)
            for s, (acc, prior, classes) in enumerate([(0.70, 0.75, 2), (0.74, 0.73, 1), (0.60, 0.80, 2)])]
    table = decision_table(rows)
    line = next(x for x in table.splitlines() if x.startswith("| breastmnist"))
    assert "| 1 / 2 of 3 | 1 |" in line and "0.700 / 0.600" in line and "0.600 / 0.500" in line
    assert decision_table([_row("breastmnist", "dirichlet", 0, "default", 0.8)]) == ""  # rows before the field


@pytest.mark.slow
def test_two_worker_processes_give_the_rows_of_one(study: dict[str, Any], tmp_path: Path) -> None:
    root = study["root"]
    plan = plan_study(
        data_dir=root, datasets=["breastmnist"], partitions=["dirichlet"], seeds=[0], methods=["default", "local-only"],
        alternative="fedprox", run_dir=str(tmp_path / "runs"), extra=ONE_ROUND,
    )
    rows = run_study(plan, results=tmp_path / "results.json", workers=2)
    serial = {(r["partition"], r["method"]): r for r in study["rows"]}
    assert len(rows) == 2
    for row in rows:
        same = serial[(row["partition"], row["method"])]
        assert (row["test_auc"], row["test_accuracy"]) == (same["test_auc"], same["test_accuracy"])


@pytest.mark.data("breastmnist.npz")
def test_one_real_cell(medmnist: Path, tmp_path: Path) -> None:
    plan = plan_study(
        data_dir=medmnist, datasets=["breastmnist"], partitions=["dirichlet"], seeds=[0], methods=["default"],
        alternative="fedprox", run_dir=str(tmp_path / "runs"), extra={"num-server-rounds": 1},
    )
    (row,) = run_study(plan, results=tmp_path / "results.json")
    assert row["dataset"] == "breastmnist" and row["model"] == "simplecnn"
    assert row["majority_rate"] == round(114 / 156, 4)  # the official test split: 42 malignant, 114 benign
    assert 0.0 <= row["test_auc"] <= 1.0 and len(row["site_train_class_counts"]) == 4
    # the 546 official training images: the sites' training splits and their local test splits
    assert sum(map(sum, row["site_train_class_counts"])) + sum(map(sum, row["site_local_test_class_counts"])) == 546
    assert sum(map(sum, row["site_local_test_class_counts"])) > 0


def test_resnet18_rows_cover_the_2d_sets_seeds_0_to_2_default_and_pooled(tmp_path: Path) -> None:
    for name in ("breastmnist", "adrenalmnist3d"):
        write_medmnist(tmp_path / f"{name}.npz")
    plan = plan_study(
        data_dir=tmp_path, datasets=["breastmnist", "adrenalmnist3d"], partitions=["iid", "dirichlet"],
        seeds=[0, 3], methods=METHODS, alternative="fedprox", run_dir=str(tmp_path / "runs"), resnet18_rows=True,
    )
    resnet = [c for c in plan.cells if c.schedule_name == "resnet18"]
    assert sorted((c.dataset, c.partitions, c.seed, c.method.name) for c in resnet) == [
        ("breastmnist", ("dirichlet",), 0, "default"), ("breastmnist", ("dirichlet",), 0, "pooled"),
    ]
    assert all(c.config("dirichlet").model == "resnet18" and c.config("dirichlet").image_size == 0 for c in resnet)
    # the published figures' optimizer (MedMNIST v2: Adam 1e-3); the study's own cells keep the default recipe
    assert {(c.config("dirichlet").optimizer, c.config("dirichlet").learning_rate) for c in resnet} == {("adam", 0.001)}
    study = [c for c in plan.cells if c.schedule_name == "study"]
    assert len(study) == 2 * 2 * (3 * 2 + 1)  # datasets x seeds x (3 methods x 2 partitions + 1 pooled)
    assert {c.config(c.partitions[0]).image_size for c in study if c.dataset == "adrenalmnist3d"} == {16}
    assert plan.cells[0].method.kind == "pooled"  # pooled first: the other rows quote it


def test_a_failing_cell_stops_the_study_naming_it_and_keeps_the_rows_so_far(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_medmnist(tmp_path / "breastmnist.npz")
    with np.load(write_medmnist(tmp_path / "retinamnist.npz")) as data:  # a file without its test split
        np.savez(tmp_path / "retinamnist.npz", **{k: data[k] for k in data.files if not k.startswith("test_")})
    results = tmp_path / "results.json"
    code = main(["--data-dir", str(tmp_path), "--datasets", "breastmnist", "retinamnist", "--seeds", "0",
                 "--partitions", "iid", "--methods", "pooled", "--set", "num-server-rounds=1", "--workers", "1",
                 "--results", str(results), "--out", str(tmp_path / "B.md"), "--plots", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "cell retinamnist iid seed 0 pooled (study) failed" in err and "resumes" in err
    assert [(r["dataset"], r["method"]) for r in json.loads(results.read_text())["quality"]] == [
        ("breastmnist", "pooled")
    ]


@pytest.mark.parametrize("name", sorted(ALTERNATIVES))
def test_every_registered_alternative_is_a_valid_run_config_that_differs_from_the_default(name: str) -> None:
    def config(method):  # no data is read: the config is resolved and validated only
        return Cell(dataset="breastmnist", data_path="/nowhere/breastmnist.npz", partitions=("dirichlet",), seed=0,
                    method=method, schedule_name="study", schedule=SCHEDULES["breastmnist"],
                    run_dir="/nowhere/runs").config("dirichlet")

    alternative, default = config(ALTERNATIVES[name]), config(methods_for(name)["default"])
    assert alternative != default
    for key, value in ALTERNATIVES[name].overrides.items():
        assert getattr(alternative, key.replace("-", "_")) == value


def test_the_schedules_give_an_average_site_16_steps_a_round_at_the_sets_epochs() -> None:
    for name, schedule in SCHEDULES.items():
        rounds, local = schedule["num-server-rounds"], schedule["local-epochs"]
        assert rounds * local == STUDY_EPOCHS[name], name  # pooled and local-only train the same epochs
        per_site = TRAIN_IMAGES[name] * 0.9 / NUM_SITES  # less the 10% local test share
        assert local * -(-per_site // 32) >= 16 and rounds >= 5, name
    assert (SCHEDULES["breastmnist"]["num-server-rounds"], SCHEDULES["breastmnist"]["local-epochs"]) == (10, 4)
    assert (SCHEDULES["adrenalmnist3d"]["num-server-rounds"], SCHEDULES["adrenalmnist3d"]["local-epochs"]) == (10, 2)


@pytest.mark.data("breastmnist.npz", "retinamnist.npz", "adrenalmnist3d.npz", "vesselmnist3d.npz")
def test_the_training_sizes_are_the_files(medmnist: Path) -> None:
    for name, size in TRAIN_IMAGES.items():
        with np.load(medmnist / DATASETS[name]) as f:
            assert len(f["train_labels"]) == size, name
