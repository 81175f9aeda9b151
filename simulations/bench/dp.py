"""Benchmark of sample-level DP-SGD: cost per local epoch, and accuracy and leakage at several epsilons.

Run ``python -m medfed.simulations.bench.dp`` (both parts) or ``--part speed`` / ``--part auc``.

Part 1 (speed): one local epoch with Opacus DP-SGD (secure generator and hardened noise, as a site
runs it) over the same epoch without DP, for each model and each Opacus per-sample-gradient mode,
measured interleaved in one process on the same data (``--samples`` 28x28 BreastMNIST-shaped
images, ``--batch-size``). Medians over ``--repeats`` epochs after one warm-up epoch.

Part 2 (auc): federated BreastMNIST runs (``medfed.simulations.simulate.run_federated``, Flower on Ray)
with the same sites, rounds and seed, without DP and with ``dp-target-epsilon`` = each of
``--epsilons``. Reports the final global model's test AUC and accuracy, the epsilon each site
spent, and a loss-threshold membership-inference attack on the final model (members: the training
split, which the sites partition; non-members: the test split, matched in class proportions).

Part 3 (study): the DP utility study of issue 16, in process (:func:`medfed.simulations.bench.quality.federate_in_process`:
the sites' real DP-SGD path, ledgers and budgets, without Ray). For each ``--datasets`` file, each
start (random weights, and each ``--public-init`` file) and no DP plus each of ``--epsilons``, one
federated run at the run-config defaults (DP defaults included) under the flags and ``--set`` pairs.
Each row goes to section ``"dp"`` of ``docs/bench/results.json`` (:data:`STUDY_FIELDS`; a row of
the same dataset, epsilon, init and mode is replaced, every other row is kept).

Figures are printed; they are indicative (shared CPUs are noisy) and state their conditions.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.client.site_data import simulated_site_data
from medfed.server.run_dir import read_metrics
from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.config_sources import mapping_layer, resolve_config, set_layer
from medfed.shared.data.base import ImageSet
from medfed.shared.data.npz import load_npz
from medfed.shared.metrics import THRESHOLD_RULES, choose_threshold, decision_metrics
from medfed.shared.models import build_model, count_parameters
from medfed.shared.privacy import (
    GRAD_SAMPLE_MODES,
    PrivacyLedger,
    make_private_training,
    secure_generator,
    site_ledger_path,
)
from medfed.shared.task import model_for
from medfed.shared.training import make_loss, make_optimizer, train_epochs
from medfed.shared.weights import set_weights
from medfed.simulations.bench.support import (
    fmt,
    line_plot,
    medmnist_file,
    ratio,
    read_results_section,
    write_results_section,
)
from medfed.simulations.membership import (
    UpdateAttack,
    loss_threshold_attack,
    matched_non_members,
    per_example_losses,
    score_auc_interval,
)

if TYPE_CHECKING:
    from medfed.simulations.bench import BenchContext, SectionResult

__all__ = [
    "STUDY_FIELDS",
    "SpeedResult",
    "auc_base_config",
    "build_parser",
    "dp_section",
    "epoch_speed",
    "main",
    "merge_study_rows",
    "plot_attacks",
    "plot_study",
    "study_row",
    "threshold_decisions",
]

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = os.environ.get(
    "MEDFED_DATA_DIR", str(Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist")
)
"""``--data-dir`` default: ``$MEDFED_DATA_DIR``, else ``shared/data/medmnist`` beside the repository."""
BREASTMNIST = Path(DEFAULT_DATA_DIR) / "breastmnist.npz"
"""The speed part's images when present (else random images)."""
SPEED_MODELS: tuple[str, ...] = ("simplecnn", "resnet18", "densenet121")
RESULTS = Path("docs/bench/results.json")
"""Where ``--part study`` writes its rows (section :data:`STUDY_SECTION`)."""
STUDY_SECTION = "dp"
STUDY_FIELDS: dict[str, type] = {
    "dataset": str, "epsilon": float, "delta": float, "init": str, "mode": str, "test_auc": float,
    "test_accuracy": float, "majority_rate": float, "nondp_test_auc": float, "membership_attack_auc": float,
    "dp_time_ratio": float,
}
"""The fields every row of section ``"dp"`` holds (issue 16); ``epsilon`` 0 is the run without DP
(its ``dp_time_ratio`` is 1). Rows hold more: ``predicted_classes`` (how many classes the final
model's argmax predicts on the test split), ``predicted_share`` (share of test images per predicted
class), ``balanced_accuracy`` (at the validation-chosen threshold), ``initial_test_auc`` (the start's,
before any training), ``test_nll`` / ``prior_nll`` (test
cross-entropy of the model / of always predicting the test class shares), ``mean_majority_probability``
(the model's mean probability of the majority class, against ``majority_rate``), ``max_site_epsilon`` (ledger),
``wall_s``, ``load_1min``, the recipe; ``decision_threshold`` (the rule of the server's threshold)
and ``decisions`` (:func:`threshold_decisions`: test accuracy, balanced accuracy and predicted
classes at the argmax and at thresholds chosen on the validation split by each rule)."""


@dataclass(frozen=True)
class SpeedResult:
    """Median seconds per local epoch for one model."""

    model: str
    parameters: int
    plain: float
    private: dict[str, float]  # grad_sample_mode -> seconds (nan if the mode failed)

    def ratio(self, mode: str) -> float:
        """DP epoch time over non-DP epoch time."""
        return self.private[mode] / self.plain


def _images(samples: int, *, seed: int) -> TensorDataset:
    """``samples`` BreastMNIST training images (28x28) if the file is there, else random ones."""
    if BREASTMNIST.exists():
        train = load_npz(BREASTMNIST).train
        x = torch.as_tensor(train.images[:samples])
        y = torch.as_tensor(train.targets[:samples])
    else:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.rand(samples, 1, 28, 28, generator=g), torch.randint(0, 2, (samples,), generator=g)
    return TensorDataset(x, y)


def epoch_speed(
    name: str, *, samples: int, batch_size: int, repeats: int, modes: tuple[str, ...], seed: int = 0
) -> SpeedResult:
    """Time one local epoch of ``name`` without DP and with DP-SGD in each of ``modes``.

    Epochs of the variants are interleaved (plain, mode 1, mode 2, ..., plain, ...) so that load
    changes on a shared machine affect them alike; the first round of epochs is a warm-up.
    """
    data = _images(samples, seed=seed)
    device = torch.device("cpu")

    def fresh() -> nn.Module:
        torch.manual_seed(seed)
        return build_model(name, spatial_dims=2, in_channels=1, out_channels=2, norm="group", image_size=28)

    def plain_epoch() -> float:
        model = fresh()
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        opt = make_optimizer(model.parameters(), name="sgd", learning_rate=0.01, weight_decay=0.0)
        return train_epochs(model, loader, opt, task="classification", epochs=1, device=device).seconds

    def private_epoch(mode: str) -> float:
        model = fresh()
        loader = DataLoader(data, batch_size=batch_size, shuffle=True)
        opt = make_optimizer(model.parameters(), name="sgd", learning_rate=0.01, weight_decay=0.0)
        private = make_private_training(
            model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, generator=secure_generator(),
            grad_sample_mode=mode, secure_noise=True, criterion=make_loss("classification"),
        )
        try:
            return train_epochs(private.model, private.loader, private.optimizer, task="classification",
                                epochs=1, device=device, criterion=private.criterion).seconds
        finally:
            private.close()

    plain: list[float] = []
    private: dict[str, list[float]] = {m: [] for m in modes}
    failed: set[str] = set()
    for rep in range(repeats + 1):
        t = plain_epoch()
        if rep:
            plain.append(t)
        for mode in modes:
            if mode in failed:
                continue
            try:
                t = private_epoch(mode)
            except Exception as err:  # report the mode as failed, keep benchmarking the others
                logger.warning("%s: grad_sample_mode=%r failed: %s", name, mode, str(err).splitlines()[0])
                failed.add(mode)
                continue
            if rep:
                private[mode].append(t)
    return SpeedResult(
        model=name,
        parameters=count_parameters(fresh()),
        plain=statistics.median(plain),
        private={m: statistics.median(v) if v else float("nan") for m, v in private.items()},
    )


def _federated(cfg: RunConfig, work: Path) -> dict[str, float]:
    from medfed.simulations.simulate import run_federated

    start = time.perf_counter()
    result = run_federated(cfg, run_path=work / "run")
    seconds = time.perf_counter() - start
    splits = load_npz(cfg.dataset, image_size=cfg.image_size)
    model = model_for(cfg, splits.train)
    state = torch.load(result.run_dir / "checkpoints" / "final.pt", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    attack = loss_threshold_attack(
        model, members=splits.train, non_members=matched_non_members(splits.train, splits.test, seed=cfg.seed)
    )
    model.eval()
    with torch.no_grad():
        predicted = model(torch.as_tensor(splits.test.images)).argmax(dim=1)
    records = read_metrics(result.run_dir)
    site_eps = [
        s["fit"]["dp-epsilon"] for r in records[-1:] for s in r["sites"].values() if "dp-epsilon" in s.get("fit", {})
    ]
    declined = sum(
        int(s.get("fit", {}).get("dp-declined", 0)) for r in records for s in r["sites"].values()
    )
    final = result.final_metrics
    initial = records[0].get("global", {}) if records and records[0].get("round") == 0 else {}
    return {
        "initial_auc": float(initial.get("auc", float("nan"))),  # the round-0 global model (init-weights loaded)
        "auc": float(final.get("auc", float("nan"))),
        "accuracy": float(final.get("accuracy", float("nan"))),  # at the argmax
        "balanced_accuracy": float(final.get("balanced-accuracy", float("nan"))),  # at the validation threshold
        "max_site_epsilon": max(site_eps) if site_eps else float("nan"),
        "declined": float(declined),
        "mia_auc": attack.auc,
        "predicted_1": float(predicted.float().mean()),  # share of test images predicted class 1
        "seconds": seconds,
    }


def auc_base_config(args: argparse.Namespace, *, dataset: Path) -> RunConfig:
    """The run config shared by every setting of the auc part: the flags, then ``--set`` pairs (they win).

    Raises
    ------
    ConfigError
        A ``--set`` item is malformed, names an unknown key or gives an invalid value (naming it).
    """
    flags: dict[str, object] = {
        "dataset": str(dataset), "model": args.model, "norm": "group", "num-sites": args.sites,
        "num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "batch-size": args.fed_batch_size,
        "learning-rate": args.lr, "optimizer": args.optimizer, "augment": False, "seed": args.seed,
        "dp-delta": 1e-5, "dp-secure-noise": True,
    }
    if args.max_grad_norm is not None:  # else the run-config default (the DP recipe's)
        flags["dp-max-grad-norm"] = args.max_grad_norm
    return resolve_config(mapping_layer(flags, source="bench.dp flags"), set_layer(args.set)).config


def run_auc_part(args: argparse.Namespace) -> None:
    """Federated BreastMNIST without DP and at each target epsilon (see the module docstring)."""
    dataset = Path(args.data_dir) / "breastmnist.npz"
    if not dataset.exists():
        print(f"auc part skipped: breastmnist.npz is not in {args.data_dir} (pass --data-dir).")
        return
    base = auc_base_config(args, dataset=dataset)
    print(
        f"\nFederated BreastMNIST: {base.model} (norm {base.norm}), {base.num_sites} sites IID, "
        f"{base.num_server_rounds} rounds x {base.local_epochs} local epoch(s), batch {base.batch_size}, "
        f"{base.optimizer} lr {base.learning_rate}, seed {base.seed}, trainable {base.trainable}, init-weights "
        f"{Path(base.init_weights).name if base.init_weights else 'none (random)'}; DP: max grad norm "
        f"{base.dp_max_grad_norm}, delta {base.dp_delta:g}, RDP accountant, noise from secure_generator(). "
        "Test AUC of the final global model." + (f" --set: {' '.join(args.set)}." if args.set else "")
    )
    print(
        f"{'setting':>10} {'init AUC':>9} {'test AUC':>9} {'test acc':>9} {'bal. acc':>9} {'max site eps':>13} "
        f"{'declined':>9} {'MIA AUC':>8} {'pred. 1':>8} {'wall s':>7}"
    )
    settings: list[tuple[str, float]] = [("no DP", 0.0)] + [(f"eps {e:g}", e) for e in args.epsilons]
    for label, eps in settings:
        with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
            cfg = base.replace(
                run_dir=tmp, dp=eps > 0, dp_target_epsilon=eps, dp_budget_epsilon=max(eps, 1.0),
                ledger_dir=os.path.join(tmp, "ledgers"),
            )
            row = _federated(cfg, Path(tmp))
        print(
            f"{label:>10} {row['initial_auc']:>9.3f} {row['auc']:>9.3f} {row['accuracy']:>9.3f} "
            f"{row['balanced_accuracy']:>9.3f} {row['max_site_epsilon']:>13.3f} "
            f"{int(row['declined']):>9d} {row['mia_auc']:>8.3f} {row['predicted_1']:>8.3f} {row['seconds']:>7.1f}"
        )


def study_row(
    cfg: RunConfig, *, dataset: str, init: str, nondp_auc: float, nondp_seconds: float
) -> dict[str, object]:
    """One federated run of ``cfg`` in process and its row of section ``"dp"`` (:data:`STUDY_FIELDS`).

    ``nondp_auc`` / ``nondp_seconds``: the same recipe's run without DP (``nan`` / 0 for that run
    itself, which then reports its own AUC and a time ratio of 1).
    """
    from medfed.simulations.bench.quality import federate_in_process

    splits = load_npz(cfg.dataset, image_size=cfg.image_size)
    # A curious server without SecAgg+ attacks every update of every site, calibrated by the model
    # the site received; members: that site's training images; non-members: test images of its class mix.
    site_train = [simulated_site_data(cfg, site_index=i, num_sites=cfg.num_sites).train for i in range(cfg.num_sites)]
    spy = UpdateAttack(
        model_for(cfg, splits.train), members=site_train,
        non_members=[matched_non_members(t, splits.test, seed=cfg.seed + i) for i, t in enumerate(site_train)],
    )
    curve = federate_in_process(cfg, on_update=lambda _round, site, received, returned: spy.observe(
        site, received, returned))
    curve.seconds -= spy.seconds  # the attack's own passes are not training time
    updates = spy.result(seed=cfg.seed)
    model = model_for(cfg, splits.train)
    set_weights(model, curve.final_weights)
    non_members = matched_non_members(splits.train, splits.test, seed=cfg.seed)
    attack = loss_threshold_attack(model, members=splits.train, non_members=non_members)
    attack_interval = score_auc_interval(
        -per_example_losses(model, splits.train), -per_example_losses(model, non_members), seed=cfg.seed
    )
    set_weights(model, curve.final_weights)
    model.eval()
    targets = torch.as_tensor(splits.test.targets).long().flatten()
    with torch.no_grad():
        logits = model(torch.as_tensor(splits.test.images))
    predicted = logits.argmax(dim=1)
    share = torch.bincount(predicted, minlength=splits.test.num_classes).float() / len(predicted)
    decisions = threshold_decisions(model, val=splits.val, test=splits.test, test_logits=logits)
    counts = torch.bincount(targets, minlength=splits.test.num_classes).float()
    majority = float(counts.max()) / len(targets)
    prior = counts / counts.sum()
    majority_class = int(counts.argmax())
    spent = [
        PrivacyLedger.open(site_ledger_path(cfg, site_index=i)).epsilon(cfg.dp_delta) for i in range(cfg.num_sites)
    ] if cfg.dp else []
    auc = curve.final("auc")
    return {
        "dataset": dataset, "epsilon": float(cfg.dp_target_epsilon if cfg.dp else 0.0), "delta": float(cfg.dp_delta),
        "init": init, "mode": cfg.trainable, "test_auc": round(auc, 4), "test_accuracy": round(curve.final("accuracy"), 4),
        "majority_rate": round(majority, 4),
        "nondp_test_auc": round(auc if cfg.dp is False else nondp_auc, 4),
        "membership_attack_auc": round(attack.auc, 4),
        "membership_attack_interval": [round(v, 4) for v in attack_interval],  # 95% bootstrap
        # the calibrated attack on every site update (membership.UpdateAttack) and its 95% bootstrap interval
        "update_attack_auc": round(updates.auc, 4),
        "update_attack_interval": [round(updates.low, 4), round(updates.high, 4)],
        "update_attack_updates": updates.updates,
        "dp_time_ratio": round(curve.seconds / nondp_seconds, 3) if cfg.dp and nondp_seconds > 0 else 1.0,
        "balanced_accuracy": round(curve.final("balanced-accuracy"), 4),
        "initial_test_auc": round(curve.series("auc")[0], 4),  # the start (init-weights loaded), round 0
        # calibration: test cross-entropy against that of always predicting the test class shares,
        # and the mean predicted probability of the majority class against its share
        "test_nll": round(float(nn.functional.cross_entropy(logits, targets)), 4),
        "prior_nll": round(float(-(prior * prior.clamp(min=1e-12).log()).sum()), 4),
        "mean_majority_probability": round(float(torch.softmax(logits, dim=1)[:, majority_class].mean()), 4),
        "predicted_classes": int((share > 0).sum()),
        "predicted_share": [round(float(v), 4) for v in share],
        "max_site_epsilon": round(max(spent), 4) if spent else 0.0,
        "decision_threshold": cfg.decision_threshold,  # the rule of the server's threshold (balanced_accuracy)
        "decisions": decisions,
        "wall_s": round(curve.seconds, 1), "load_1min": round(os.getloadavg()[0], 2),
        "recipe": {
            "model": cfg.model, "norm": cfg.norm, "sites": cfg.num_sites, "rounds": cfg.num_server_rounds,
            "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
            "learning_rate": cfg.learning_rate, "dp_max_grad_norm": cfg.dp_max_grad_norm,
            "trainable": cfg.trainable, "seed": cfg.seed,
        },
    }


def threshold_decisions(
    model: nn.Module, *, val: ImageSet, test: ImageSet, test_logits: torch.Tensor
) -> dict[str, dict[str, float]]:
    """The test decisions of a binary ``model`` at a threshold chosen on ``val`` by each rule of
    :data:`medfed.shared.metrics.THRESHOLD_RULES` (never on ``test``), and at the argmax.

    Parameters
    ----------
    val, test
        The validation split (in simulation: the union of the sites' validation splits, as the
        server scores it) and the test split.
    test_logits
        ``(N, K)`` ``model``'s logits on ``test``.

    Returns
    -------
    dict
        ``{"argmax" | rule: {"threshold", "accuracy", "balanced_accuracy", "predicted_classes",
        "val_accuracy"}}``; more than two classes, or no ``val``: the argmax entry only.
    """
    targets = torch.as_tensor(test.targets).long().flatten()
    out: dict[str, dict[str, float]] = {}

    def decide(name: str, predicted: torch.Tensor, threshold: float, val_accuracy: float) -> None:
        figures = decision_metrics(predicted, targets, num_classes=test.num_classes)
        out[name] = {
            "threshold": round(threshold, 4), "accuracy": round(float((predicted == targets).float().mean()), 4),
            "balanced_accuracy": round(figures.get("balanced-accuracy", float("nan")), 4),
            "predicted_classes": int(figures["predicted-classes"]), "val_accuracy": round(val_accuracy, 4),
        }

    with torch.no_grad():
        val_logits = model(torch.as_tensor(val.images)) if len(val) else None
    val_targets = torch.as_tensor(val.targets).long().flatten()
    argmax_val = float((val_logits.argmax(dim=1) == val_targets).float().mean()) if val_logits is not None else float("nan")
    decide("argmax", test_logits.argmax(dim=1), 0.5, argmax_val)
    if test.num_classes != 2 or val_logits is None:
        return out
    val_scores = torch.softmax(val_logits.float(), dim=1)[:, 1]
    test_scores = torch.softmax(test_logits.float(), dim=1)[:, 1]
    for rule in THRESHOLD_RULES:
        cut = choose_threshold(val_scores, val_targets, rule=rule)
        decide(rule, (test_scores >= cut).long(), cut, float(((val_scores >= cut).long() == val_targets).float().mean()))
    return out


def _check_study_rows(rows: list[dict[str, object]]) -> None:
    for i, row in enumerate(rows):
        for name, kind in STUDY_FIELDS.items():
            value = row.get(name)
            ok = isinstance(value, str) if kind is str else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
            )
            if not ok:
                raise ValueError(f"results.json section {STUDY_SECTION!r}, row {i}: field {name!r} = {value!r} is not a "
                                 f"finite {kind.__name__}.")


def merge_study_rows(results: Path, rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Read-modify-write section ``"dp"`` of ``results``: ``rows`` replace the rows of the same
    (dataset, epsilon, init, mode); every other row, and every other section, is kept.

    Raises
    ------
    ValueError
        A row misses a field of :data:`STUDY_FIELDS` or holds a non-finite number (naming it).
    """
    _check_study_rows(rows)

    def key(row: dict[str, object]) -> tuple[object, ...]:
        return (row.get("dataset"), float(row.get("epsilon", 0.0)), row.get("init"), row.get("mode"))  # type: ignore[arg-type]

    new = {key(r): r for r in rows}
    kept = [r for r in read_results_section(results, STUDY_SECTION) or [] if key(r) not in new]
    section = kept + list(new.values())
    write_results_section(results, STUDY_SECTION, section)
    return section


def plot_attacks(rows: list[dict[str, object]], *, path: Path, init: str = "random", mode: str = "all") -> Path | None:
    """Membership-attack AUC with its 95% bootstrap interval against epsilon ("no DP" first), one
    line per dataset, for the rows of ``init`` and ``mode`` that carry the update attack
    (``update_attack_interval``); a dashed line at chance (0.5) and the +-0.05 band of issue 16's
    acceptance 3. ``None`` when no row qualifies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r.get("init") == init and r.get("mode") == mode and r.get("update_attack_interval")]
    if not chosen:
        return None
    levels = sorted({float(r["epsilon"]) for r in chosen}, key=lambda e: (e != 0, e))  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=100)
    try:
        ax.axhspan(0.45, 0.55, color="0.92", label="0.5 +- 0.05")
        ax.axhline(0.5, linestyle="--", linewidth=1.0, color="grey")
        datasets = sorted({str(r["dataset"]) for r in chosen})
        for k, name in enumerate(datasets):
            mine = {float(r["epsilon"]): r for r in chosen if r["dataset"] == name}  # type: ignore[arg-type]
            xs = [i + (k - (len(datasets) - 1) / 2) * 0.08 for i, e in enumerate(levels) if e in mine]
            auc = [float(mine[e]["update_attack_auc"]) for e in levels if e in mine]  # type: ignore[arg-type]
            low = [a - float(mine[e]["update_attack_interval"][0]) for a, e in zip(auc, [e for e in levels if e in mine],  # type: ignore[index]
                                                                                      strict=True)]
            high = [float(mine[e]["update_attack_interval"][1]) - a for a, e in zip(auc, [e for e in levels if e in mine],  # type: ignore[index]
                                                                                       strict=True)]
            ax.errorbar(xs, auc, yerr=[low, high], marker="o", markersize=3, linewidth=1.0, capsize=2, label=name)
        ax.set_xticks(range(len(levels)), ["no DP" if e == 0 else f"eps {e:g}" for e in levels])
        ax.set_ylabel("attack AUC (95% bootstrap interval)", fontsize=8)
        ax.set_title(f"Curious server's attack on every site update ({init} init, trainable {mode})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def plot_study(rows: list[dict[str, object]], *, dataset: str, path: Path) -> Path | None:
    """Test AUC vs epsilon of ``dataset``'s rows, one line per (init, mode), the no-DP AUC of each
    as a dashed line; ``None`` when ``dataset`` has no DP row."""
    mine = [r for r in rows if r.get("dataset") == dataset]
    series: dict[str, tuple[list[float], list[float]]] = {}
    hlines: dict[str, float] = {}
    for r in sorted(mine, key=lambda r: float(r["epsilon"])):  # type: ignore[arg-type]
        label = f"{r['init']}, {r['mode']}"
        if float(r["epsilon"]) > 0:  # type: ignore[arg-type]
            xs, ys = series.setdefault(label, ([], []))
            xs.append(float(r["epsilon"]))  # type: ignore[arg-type]
            ys.append(float(r["test_auc"]))  # type: ignore[arg-type]
        else:
            hlines[f"{label}, no DP"] = float(r["test_auc"])  # type: ignore[arg-type]
    if not series:
        return None
    return line_plot(path, series=series, hlines=hlines, title=f"{dataset}: federated DP-SGD, test AUC vs epsilon",
                     xlabel="epsilon (delta 1e-5, per site, whole run)", ylabel="test AUC", logx=True)


def _decision_cells(row: dict[str, object]) -> str:
    """Test accuracy, balanced accuracy and predicted classes at the validation-chosen Youden (J)
    and accuracy (A) thresholds, as printed by the study."""
    decisions: dict[str, dict[str, float]] = row.get("decisions") or {}  # type: ignore[assignment]
    cells = []
    for rule in ("youden", "accuracy"):
        d = decisions.get(rule)
        cells.append(f"{d['accuracy']:>6.3f} {d['balanced_accuracy']:>6.3f} {int(d['predicted_classes']):>4d}" if d
                     else f"{'-':>6} {'-':>6} {'-':>4}")
    return " ".join(cells)


def run_study_part(args: argparse.Namespace) -> None:
    """The DP utility study (see the module docstring): rows printed and merged into results.json."""
    inits: list[tuple[str, str]] = [("random", "")] + [(Path(p).stem, p) for p in args.public_init]
    print(
        "\nDP utility study (in process, the sites' real DP-SGD path): test AUC / accuracy (argmax) of the final "
        f"global model; --set: {' '.join(args.set) or '-'}; load {os.getloadavg()[0]:.1f}."
    )
    print(f"{'dataset':>12} {'init':>28} {'mode':>10} {'eps':>6} {'AUC':>6} {'acc':>6} {'major.':>6} {'bal.acc':>7} "
          f"{'classes':>7} {'p(maj)':>6} {'NLL':>6} {'site eps':>8} {'MIA':>6} {'MIA-u':>6} {'time x':>6} {'wall s':>7} "
          f"{'accJ':>6} {'bacJ':>6} {'clsJ':>4} {'accA':>6} {'bacA':>6} {'clsA':>4}")
    rows: list[dict[str, object]] = []
    for name in args.datasets:
        dataset = Path(args.data_dir) / f"{name}.npz"
        if not dataset.exists():
            print(f"{name}: skipped, {dataset.name} is not in {args.data_dir} (pass --data-dir).")
            continue
        for init_name, init_path in inits:
            base = auc_base_config(args, dataset=dataset).replace(store="off", init_weights=init_path)
            nondp_auc, nondp_seconds = float("nan"), 0.0
            for eps in (0.0, *args.epsilons):
                with tempfile.TemporaryDirectory(prefix="bench-dp-study-") as tmp:
                    cfg = base.replace(
                        run_dir=tmp, dp=eps > 0, dp_target_epsilon=eps, dp_budget_epsilon=max(eps, 1.0),
                        ledger_dir=os.path.join(tmp, "ledgers"),
                    )
                    row = study_row(cfg, dataset=name, init=init_name, nondp_auc=nondp_auc,
                                    nondp_seconds=nondp_seconds)
                if eps == 0:
                    nondp_auc, nondp_seconds = float(row["test_auc"]), float(row["wall_s"])  # type: ignore[arg-type]
                rows.append(row)
                print(
                    f"{name:>12} {init_name[:28]:>28} {row['mode']:>10} {eps:>6g} {row['test_auc']:>6.3f} "
                    f"{row['test_accuracy']:>6.3f} {row['majority_rate']:>6.3f} {row['balanced_accuracy']:>7.3f} "
                    f"{row['predicted_classes']:>7d} {row['mean_majority_probability']:>6.3f} {row['test_nll']:>6.3f} "
                    f"{row['max_site_epsilon']:>8.3f} {row['membership_attack_auc']:>6.3f} {row['update_attack_auc']:>6.3f} "
                    f"{row['dp_time_ratio']:>6.2f} {row['wall_s']:>7.1f} {_decision_cells(row)}",
                    flush=True,
                )
    if rows and not args.no_write:
        merged = merge_study_rows(Path(args.results), rows)
        print(f"{len(rows)} row(s) merged into section {STUDY_SECTION!r} of {args.results}.")
        for name in sorted({str(r["dataset"]) for r in rows}):
            plot = plot_study(merged, dataset=name, path=Path(args.results).parent / f"dp-study-{name}.png")
            if plot is not None:
                print(f"plot: {plot}")
        attacks = plot_attacks(merged, path=Path(args.results).parent / "dp-study-attacks.png")
        if attacks is not None:
            print(f"plot: {attacks}")


def run_speed_part(args: argparse.Namespace) -> None:
    """Local-epoch time with and without DP-SGD per model and mode (see the module docstring)."""
    print(
        f"\nLocal epoch time, DP-SGD / no DP: {args.samples} images 28x28x1, batch {args.batch_size}, "
        f"SGD, norm group, CPU x{torch.get_num_threads()} threads, torch {torch.__version__}; median of "
        f"{args.repeats} epochs after a warm-up, variants interleaved. DP: secure generator + hardened noise."
    )
    modes = tuple(args.modes)
    header = f"{'model':>12} {'params':>10} {'no DP s':>8}" + "".join(f" {m + ' s':>11} {'ratio':>6}" for m in modes)
    print(header)
    for name in args.models:
        r = epoch_speed(name, samples=args.samples, batch_size=args.batch_size, repeats=args.repeats, modes=modes)
        cells = "".join(f" {r.private[m]:>11.3f} {r.ratio(m):>6.2f}" for m in modes)
        print(f"{name:>12} {r.parameters:>10,d} {r.plain:>8.3f}{cells}")


# --------------------------------------------------------------------------- benchmark section
def dp_section(ctx: BenchContext) -> SectionResult:
    """Section ``privacy-dp`` of ``medfed bench``: test AUC vs epsilon, and the DP-SGD epoch-time ratio.

    AUC part: federated BreastMNIST (simplecnn, GroupNorm, IID sites, Adam 0.003, batch 16, no
    augmentation) without DP and with ``dp-target-epsilon`` = each of the profile's epsilons
    (``dp-budget-epsilon`` the same, delta 1e-5, RDP, secure noise), run in process
    (:func:`medfed.simulations.bench.quality.federate_in_process`: the sites' real DP-SGD path, ledgers
    and budgets); final test AUC and accuracy, the largest epsilon a site's ledger records, and a
    loss-threshold membership attack on the final model. Speed part: :func:`epoch_speed` (hooks).
    """
    from medfed.simulations.bench import SectionResult, Table, Target
    from medfed.simulations.bench.quality import federate_in_process

    p = ctx.profile
    seed = p.seeds[0]
    auc_table = Table(
        title="Federated test AUC under sample-level DP-SGD (BreastMNIST)",
        columns=["setting", "test AUC", "test accuracy", "AUC / no-DP AUC", "max site epsilon (ledger)",
                 "membership attack AUC", "wall s"],
    )
    speed_table = Table(
        title="Local epoch time, DP-SGD / non-private (hooks mode)",
        columns=["model", "parameters", "non-private epoch s", "DP-SGD epoch s", "DP time ratio"],
    )
    result = SectionResult(tables=[auc_table, speed_table])
    try:
        path = medmnist_file(ctx.data_dir, "breastmnist.npz", workdir=ctx.workdir, train=p.slice_train,
                             val=p.slice_val, test=p.slice_test)
    except FileNotFoundError as err:
        auc_table.add_unavailable(f"not available: {err}")
        path = None
    if path is not None:
        base = RunConfig(
            dataset=str(path), model="simplecnn", norm="group", num_sites=p.dp_sites, num_server_rounds=p.dp_rounds,
            local_epochs=p.dp_local_epochs, batch_size=16, learning_rate=0.003, optimizer="adam", augment=False,
            seed=seed, dp_delta=1e-5, dp_secure_noise=True, store="off",
        )
        splits = load_npz(path)
        rows: list[tuple[str, float, dict[str, float]]] = []
        for eps in (0.0, *p.dp_epsilons):
            work = ctx.workdir / "runs" / f"dp-eps{eps:g}"
            cfg = base.replace(
                run_dir=str(work), dp=eps > 0, dp_target_epsilon=eps, dp_budget_epsilon=max(eps, 1.0),
                ledger_dir=str(work / "ledgers"),
            )
            curve = federate_in_process(cfg)
            model = model_for(cfg, splits.train)
            set_weights(model, curve.final_weights)
            attack = loss_threshold_attack(
                model, members=splits.train, non_members=matched_non_members(splits.train, splits.test, seed=seed)
            )
            spent = [
                PrivacyLedger.open(site_ledger_path(cfg, site_index=i)).epsilon(cfg.dp_delta) for i in range(cfg.num_sites)
            ] if cfg.dp else []
            figures = {"auc": curve.final("auc"), "accuracy": curve.final("accuracy"), "mia": attack.auc,
                       "eps": max(spent) if spent else float("nan"), "seconds": curve.seconds}
            rows.append(("no DP" if eps == 0 else f"epsilon {eps:g}", eps, figures))
        plain_auc = rows[0][2]["auc"]
        for label, eps, f in rows:
            auc_table.add(
                label, fmt(f["auc"]), fmt(f["accuracy"]), ratio(f["auc"], plain_auc),
                fmt(f["eps"], 2, reason="n/a: no DP, nothing spent") if eps else "n/a: no DP, nothing spent",
                fmt(f["mia"]), fmt(f["seconds"], 1),
            )
        auc_table.notes.append(
            f"Conditions: {p.dp_sites} IID sites, {p.dp_rounds} rounds x {p.dp_local_epochs} local epoch(s), "
            f"{len(splits.train)} training images, simplecnn with GroupNorm, Adam 0.003, batch 16 (Poisson "
            f"sampling under DP), max grad norm {base.dp_max_grad_norm:g}, delta 1e-5, RDP accountant, noise from the OS CSPRNG; seed "
            f"{seed}. The noise multiplier is the one that spends the target epsilon over all planned rounds."
        )
        eps_rows = [(eps, f) for _, eps, f in rows if eps > 0]
        result.plots.append(
            line_plot(
                ctx.plot_path("dp-epsilon.png"),
                series={
                    "test AUC": ([e for e, _ in eps_rows], [f["auc"] for _, f in eps_rows]),
                    "test accuracy": ([e for e, _ in eps_rows], [f["accuracy"] for _, f in eps_rows]),
                },
                hlines={"AUC without DP": plain_auc, "accuracy without DP": rows[0][2]["accuracy"]},
                title="BreastMNIST, federated DP-SGD: test metrics vs epsilon",
                xlabel="target epsilon (delta 1e-5)", ylabel="test metric", logx=True,
            )
        )
    for name in p.dp_speed_models:
        r = epoch_speed(name, samples=p.dp_speed_samples, batch_size=16, repeats=p.dp_speed_repeats, modes=("hooks",))
        speed_table.add(name, f"{r.parameters:,d}", fmt(r.plain), fmt(r.private["hooks"],
                        reason="failed: Opacus hooks mode failed for this model (see the log)"),
                        ratio(r.private["hooks"], r.plain))
        result.targets.append(Target.check(
            f"DP-SGD epoch time / non-private ({name}, hooks)", "issue 3", value=r.ratio("hooks"), at_most=2.0,
            limits="Opacus computes and clips a gradient per sample; on a CPU that costs more than the 2x target "
            "(ghost clipping was slower still here, see bench.dp --modes)",
        ))
    speed_table.notes.append(
        f"Conditions: {p.dp_speed_samples} BreastMNIST images (28x28), batch 16, SGD, GroupNorm, "
        f"torch x{torch.get_num_threads()} threads; median of {p.dp_speed_repeats} epoch(s) after a warm-up, "
        "variants interleaved; DP: secure generator and hardened noise, as a site runs it."
    )
    result.commands.append(ctx.reproduce("privacy-dp"))
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m medfed.simulations.bench.dp``."""
    parser = argparse.ArgumentParser(prog="python -m medfed.simulations.bench.dp", description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("speed", "auc", "study", "all"), default="all",
                        help="all: speed and auc (the study runs only when asked for)")
    parser.add_argument("--models", nargs="+", default=list(SPEED_MODELS))
    parser.add_argument("--modes", nargs="+", default=["hooks", "ghost"], choices=GRAD_SAMPLE_MODES)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--model", default="simplecnn", help="model of the federated runs")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--fed-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    parser.add_argument("--max-grad-norm", type=float, default=None,
                        help="dp-max-grad-norm of the auc and study runs (default: the run-config default)")
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder holding breastmnist.npz (auc part) and the --datasets files (study)")
    parser.add_argument("--datasets", nargs="+", default=["breastmnist"],
                        help="study: MedMNIST file stems in --data-dir (breastmnist, retinamnist, ...)")
    parser.add_argument("--public-init", nargs="*", default=[],
                        help="study: init-weights files trained on public data (each beside a random start)")
    parser.add_argument("--results", default=str(RESULTS), help="study: the results.json to merge section 'dp' into")
    parser.add_argument("--no-write", action="store_true", help="study: print the rows only")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any run-config key for the auc and study runs, over the flags (repeatable): --set trainable=head",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen parts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.part in ("auc", "all", "study"):
        try:
            auc_base_config(args, dataset=Path(args.data_dir) / "breastmnist.npz")
        except ConfigError as err:
            parser.error(str(err))
    missing = [p for p in args.public_init if not Path(p).is_file()] if args.part == "study" else []
    if missing:
        parser.error(f"--public-init {' '.join(missing)}: no such file (write one with `medfed pretrain ... --out FILE`).")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("flwr", "ray"):  # keep the printed figures readable
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.part in ("speed", "all"):
        run_speed_part(args)
    if args.part in ("auc", "all"):
        run_auc_part(args)
    if args.part == "study":
        run_study_part(args)


if __name__ == "__main__":
    main()
