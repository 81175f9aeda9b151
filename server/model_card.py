"""What a model card says about one run, gathered from its run directory (no HTML here).

:func:`gather_model_card` reads ``config.json``, ``metrics.jsonl``, ``summary.json``, the
checkpoints' metrics, ``app_bundle.json`` (a signed deployment's bundle hash), ``cross_site.json``
(the cross-site evaluation: per-site and per-subgroup test metrics, fairness gaps) and a folder of
explanation maps a site chose to share, and, where the run's dataset is reachable from here,
recomputes two things the run directory does not hold: each simulated site's class mix and the
final model's calibration on the test split. Every section it cannot fill says why.

Only aggregate figures go into a card: counts, class mixes, metrics, epsilon. Data paths are
reduced to file names (:func:`medfed.server.store.redact_config`).
"""

from __future__ import annotations

import base64
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.server.run_dir import read_metrics
from medfed.server.store.redaction import redact_config

__all__ = [
    "APP_BUNDLE_FILE",
    "CROSS_SITE_FILE",
    "EXPLANATIONS_DIR",
    "MAX_EXPLANATIONS",
    "ModelCard",
    "ReportError",
    "gather_model_card",
]

logger = logging.getLogger(__name__)

CROSS_SITE_FILE = "cross_site.json"
"""The cross-site evaluation's output in a run directory."""
INIT_WEIGHTS_FILE = "init_weights.json"
"""What ``init-weights`` loaded into the initial model (:meth:`RunDirectory.write_init_weights`)."""
APP_BUNDLE_FILE = "app_bundle.json"
"""A signed deployment's app bundle: ``{"fab_sha256", "signed"}`` (:meth:`RunDirectory.write_app_bundle`)."""
EXPLANATIONS_DIR = "explanations"
"""Explanation maps shared into the run directory (``medfed explain --out <run>/explanations``)."""
MAX_EXPLANATIONS = 6
"""Explanation maps embedded in a card at most."""

CLASSIFICATION_METRICS = ("auc", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "threshold")
SEGMENTATION_METRICS = ("dice",)

RECIPE_KEYS = (
    "strategy", "model", "norm", "num-server-rounds", "num-sites", "fraction-fit", "fraction-evaluate",
    "local-epochs", "batch-size", "learning-rate", "optimizer", "weight-decay", "loss", "augment", "image-size",
    "partition", "dirichlet-alpha", "bn-mode", "personalize", "proximal-mu", "server-learning-rate",
    "max-update-norm", "seed", "init-weights", "trainable",
)
"""Run-config keys shown as the training recipe (the full config is in the card too)."""


class ReportError(ValueError):
    """A run directory cannot be reported on (the message names the file and what to do)."""


@dataclass
class ModelCard:
    """Everything a model card shows, section by section; ``None`` or ``[]`` plus a ``*_note``
    saying why when a section has nothing to show."""

    run_id: str
    mode: str
    status: str
    task: str
    primary_metric: str
    started: float | None
    seconds: float | None
    rounds: int | None
    planned_rounds: int | None
    dataset: str
    intended_use: str
    intended_use_source: str
    config: dict[str, Any]
    recipe: list[tuple[str, Any]]
    versions: dict[str, str]
    curve: list[tuple[int, float]] = field(default_factory=list)
    """``(round, value)`` of the primary metric per round (server test split, else sites' validation)."""
    curve_source: str = ""
    data_sites: list[dict[str, Any]] = field(default_factory=list)
    data_note: str = ""
    global_rows: list[dict[str, Any]] = field(default_factory=list)
    global_note: str = ""
    site_rows: list[dict[str, Any]] = field(default_factory=list)
    site_note: str = ""
    cross_site: dict[str, Any] | None = None
    cross_site_note: str = ""
    calibration: Any = None
    calibration_note: str = ""
    site_gap: dict[str, Any] | None = None
    privacy_sites: list[dict[str, Any]] = field(default_factory=list)
    privacy_ledger: list[dict[str, Any]] = field(default_factory=list)
    client_dp: list[dict[str, Any]] = field(default_factory=list)
    privacy_note: str = ""
    secagg: dict[str, Any] = field(default_factory=dict)
    app_bundle: dict[str, Any] = field(default_factory=dict)
    init_weights: dict[str, Any] = field(default_factory=dict)
    explanations: list[dict[str, Any]] = field(default_factory=list)
    explanations_note: str = ""
    warnings: list[str] = field(default_factory=list)


def _shareable(config: dict[str, Any]) -> dict[str, Any]:
    """The run config as a card shows it: the store's redaction, and local folders reduced to names."""
    out = redact_config(config)
    for key in ("run-dir", "tracking-tensorboard", "init-weights"):
        if out.get(key):
            out[key] = Path(str(out[key])).name
    store = str(out.get("store", ""))
    if store.startswith("sqlite:///"):
        out["store"] = "sqlite:///.../" + Path(store[len("sqlite:///"):]).name
    return out


def _read_json(path: Path, *, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ReportError(f"{path} ({what}) cannot be read: {err}. Repair or remove it and run the report again.") from None


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def gather_model_card(
    run: str | Path,
    *,
    intended_use: str | None = None,
    explanations: str | Path | None = None,
    dataset: str | None = None,
    calibrate: bool = True,
) -> ModelCard:
    """Read run directory ``run`` into a :class:`ModelCard`.

    Parameters
    ----------
    run
        The run directory (``config.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/``).
    intended_use
        The model's intended use; default: the run config's ``intended-use``, else a note that it
        was not stated.
    explanations
        A folder written by ``medfed explain --out`` that a site chose to share (``index.json`` and
        PNG files); default: ``<run>/explanations`` if present.
    dataset
        Where the run's dataset is, if not where ``config.json`` says (relative paths are read from
        the current folder); used for the class mix per simulated site and the calibration.
    calibrate
        Compute the calibration of the final model (loads the dataset and the checkpoint).

    Raises
    ------
    ReportError
        ``run`` is not a run directory, or one of its files is not valid JSON.
    """
    path = Path(run)
    meta = _read_json(path / "config.json", what="the run config")
    if not path.is_dir() or meta is None:
        raise ReportError(
            f"{path} is not a run directory (no config.json): give a folder that `medfed simulate` or "
            "`medfed run` wrote, e.g. runs/<UTC time>-fedavg-s0."
        )
    config: dict[str, Any] = dict(meta.get("config", {}))
    summary = _read_json(path / "summary.json", what="the run summary") or {}
    try:
        records = read_metrics(path) if (path / "metrics.jsonl").exists() else []
    except ValueError as err:
        raise ReportError(f"{path / 'metrics.jsonl'} is not JSON lines ({err}): the run directory is damaged.") from None
    cross = _read_json(path / CROSS_SITE_FILE, what="the cross-site evaluation")
    task = _task(config, cross)
    primary = str(summary.get("primary_metric") or ("dice" if task == "segmentation" else "auc"))
    stated = intended_use or str(config.get("intended-use", "") or "")
    card = ModelCard(
        run_id=path.name,
        mode=str(meta.get("mode", "federated")),
        status=str(summary.get("status", "running" if records else "not started")),
        task=task,
        primary_metric=primary,
        started=_finite(meta.get("started")),
        seconds=_finite(summary.get("seconds")),
        rounds=summary.get("rounds", records[-1]["round"] if records else None),
        planned_rounds=config.get("num-server-rounds"),
        dataset=str(_shareable(config).get("dataset", "")),
        intended_use=stated or "Not stated. Pass --intended-use TEXT to `medfed report`, or set the run-config "
        "key intended-use.",
        intended_use_source="--intended-use" if intended_use else ("run config" if stated else ""),
        config=_shareable(config),
        recipe=[(k, _shareable(config).get(k)) for k in RECIPE_KEYS if k in config],
        versions={str(k): str(v) for k, v in dict(meta.get("versions", {})).items()},
    )
    _curve(card, records)
    _global_metrics(card, path, summary)
    _site_metrics(card, records, summary)
    _cross_site(card, cross)
    _privacy(card, records, config)
    _secagg(card, records, config)
    _app_bundle(card, path, config)
    _init_weights(card, path)
    _explanations(card, Path(explanations) if explanations else path / EXPLANATIONS_DIR, given=explanations is not None)
    _data_and_calibration(card, path, config, records, dataset=dataset, calibrate=calibrate)
    return card


def _task(config: dict[str, Any], cross: Any) -> str:
    if isinstance(cross, dict) and cross.get("task") in ("classification", "segmentation"):
        return str(cross["task"])
    from medfed.shared.models import model_task

    try:
        return model_task(str(config.get("model", "")))
    except (ValueError, KeyError):
        return "classification"


def _metric_names(card: ModelCard) -> tuple[str, ...]:
    return SEGMENTATION_METRICS if card.task == "segmentation" else CLASSIFICATION_METRICS


def _pick(metrics: dict[str, Any], names: tuple[str, ...]) -> dict[str, float | None]:
    return {name: _finite(metrics.get(name)) for name in names}


def _curve(card: ModelCard, records: list[dict[str, Any]]) -> None:
    for source, key in (("server evaluation on the test split", "global"), ("sites' validation, weighted", "eval")):
        points = [(int(r["round"]), _finite(r.get(key, {}).get(card.primary_metric))) for r in records]
        points = [(n, v) for n, v in points if v is not None]
        if points:
            card.curve, card.curve_source = points, source  # type: ignore[assignment]
            return


def _checkpoint_metrics(path: Path, kind: str) -> tuple[int, dict[str, Any]] | None:
    file = path / "checkpoints" / f"{kind}.pt"
    if not file.exists():
        return None
    import torch

    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is reported, not fatal
        logger.warning("checkpoint %s cannot be read (%s): its metrics are left out of the card.", file.name, err)
        return None
    return int(payload.get("round", 0)), dict(payload.get("metrics", {}))


def _global_metrics(card: ModelCard, path: Path, summary: dict[str, Any]) -> None:
    names = _metric_names(card)
    rows = []
    final = _checkpoint_metrics(path, "final")
    if final is None and summary.get("final_metrics"):
        final = (int(summary.get("rounds") or 0), dict(summary["final_metrics"]))
    best = _checkpoint_metrics(path, "best")
    if best is None and summary.get("best_metrics") and summary.get("best_round"):
        best = (int(summary["best_round"]), dict(summary["best_metrics"]))
    deployed = card.config.get("dataset") == "deployment"
    for label, found in (("final", final), ("selected", best)):
        if found is None:
            continue
        round_number, metrics = found
        has_test = any(name in metrics for name in names) and not deployed
        row = {
            "model": label,
            "round": round_number,
            "split": "test (server)" if has_test else "validation (sites, weighted)",
            "n": _finite(metrics.get("num_examples")),
            "metrics": _pick(metrics, names),
            "validation": _pick({k[4:]: v for k, v in metrics.items() if k.startswith("val-")}, names),
        }
        if label == "selected":
            row["selected_by"] = summary.get("best_selected_by") or "the best validation metric"
        rows.append(row)
    card.global_rows = rows
    if not rows:
        card.global_note = "No checkpoint yet: the run has not completed a round."
    elif deployed:
        card.global_note = (
            "A deployment: the server holds no data, so these are the sites' validation metrics "
            "weighted by example count. Test metrics per site come from the cross-site evaluation below."
        )
    if summary.get("single_class", {}).get("final"):
        card.warnings.append(
            "The final model predicts a single class on the test or validation data (accuracy equals the "
            "majority rate): it does not discriminate at its threshold."
        )


def _site_metrics(card: ModelCard, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    names = _metric_names(card)
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    for record in records:
        for site, parts in record.get("sites", {}).items():
            if parts.get("eval", {}).get("num_examples"):
                latest[site] = (int(record["round"]), parts["eval"])
    personal = summary.get("personalization", {}).get("sites", {})
    rows = []
    for site in sorted(latest, key=_site_key):
        round_number, metrics = latest[site]
        row = {"site": site, "round": round_number, "n": _finite(metrics.get("num_examples")),
               "metrics": _pick(metrics, names)}
        local = personal.get(site, {})
        if local:
            row["local_test"] = {
                "n": _finite(local.get("local-test-examples")),
                "global": _finite(local.get(f"local-test-{card.primary_metric}-global")),
                "personalized": _finite(local.get(f"local-test-{card.primary_metric}-personalized")),
            }
        rows.append(row)
    card.site_rows = rows
    if not rows:
        card.site_note = "No site reported validation metrics (fraction-evaluate = 0, or no round completed)."
    primary = [(r["site"], r["metrics"].get(card.primary_metric)) for r in rows]
    primary = [(s, v) for s, v in primary if v is not None]
    if len(primary) >= 2:
        best = max(primary, key=lambda item: item[1])
        worst = min(primary, key=lambda item: item[1])
        card.site_gap = {"metric": card.primary_metric, "best_site": best[0], "best": best[1],
                         "worst_site": worst[0], "worst": worst[1], "gap": best[1] - worst[1]}


def _site_key(site: str) -> tuple[int, int, str]:
    tail = site.rsplit("-", 1)[-1]
    return (0, int(tail), site) if tail.isdigit() else (1, 0, site)


def _cross_site(card: ModelCard, cross: Any) -> None:
    if cross is None:
        card.cross_site_note = (
            "Cross-site evaluation not run: no cross_site.json in the run directory. It scores the final "
            "model on each site's test split and per subgroup (sex, age band, ...), with fairness gaps."
        )
        return
    if not isinstance(cross, dict) or not isinstance(cross.get("sites"), list):
        raise ReportError(
            f"{CROSS_SITE_FILE} has no 'sites' list: it was not written by the cross-site evaluation. "
            "Run it again or remove the file."
        )
    card.cross_site = cross


def _privacy(card: ModelCard, records: list[dict[str, Any]], config: dict[str, Any]) -> None:
    per_site: dict[str, dict[str, Any]] = {}
    for record in records:
        row: dict[str, Any] = {"round": int(record["round"]), "sites": {}}
        for site, parts in record.get("sites", {}).items():
            fit = parts.get("fit", {})
            eps = _finite(fit.get("dp-epsilon"))
            if eps is None:
                continue
            declined = bool(fit.get("dp-declined"))
            row["sites"][site] = {"epsilon": eps, "steps": _finite(fit.get("dp-steps")), "declined": declined}
            info = per_site.setdefault(site, {"site": site, "rounds": 0, "declined": 0})
            info.update(
                epsilon=eps,
                delta=_finite(fit.get("dp-delta")),
                budget=_finite(fit.get("dp-budget-epsilon")),
                noise=_finite(fit.get("dp-noise-multiplier")),
                sample_rate=_finite(fit.get("dp-sample-rate")),
            )
            info["declined" if declined else "rounds"] += 1
        if row["sites"]:
            card.privacy_ledger.append(row)
        client_eps = _finite(record.get("fit", {}).get("client-dp-epsilon"))
        if client_eps is not None:
            card.client_dp.append({
                "round": int(record["round"]), "epsilon": client_eps,
                "delta": _finite(record["fit"].get("client-dp-delta")),
                "noise": _finite(record["fit"].get("client-dp-noise-multiplier")),
            })
    card.privacy_sites = [per_site[s] for s in sorted(per_site, key=_site_key)]
    if not config.get("dp") and config.get("client-dp", "off") == "off":
        card.privacy_note = (
            "No differential privacy: dp = false and client-dp = off. The sites' updates carry no formal "
            "privacy guarantee."
        )
    elif config.get("dp") and not card.privacy_sites:
        card.privacy_note = "dp = true but no site has reported epsilon yet."


def _secagg(card: ModelCard, records: list[dict[str, Any]], config: dict[str, Any]) -> None:
    rounds = [r for r in records if r.get("secagg")]
    completed = sum(1 for r in rounds if r["secagg"].get("completed"))
    dropped = sum(int(r["secagg"].get("dropped") or 0) for r in rounds)
    failed = [
        {"round": int(r["round"]), "stage": r["secagg"].get("failed_stage")}
        for r in rounds if not r["secagg"].get("completed")
    ]
    card.secagg = {
        "enabled": bool(config.get("secagg")),
        "rounds": len(rounds),
        "completed": completed,
        "dropped": dropped,
        "failed": failed,
        "settings": {k: config.get(k) for k in ("secagg-num-shares", "secagg-reconstruction-threshold",
                                                "secagg-clipping-range", "secagg-quantization-range",
                                                "secagg-on-failure", "secagg-mask-generator") if k in config},
    }


def _app_bundle(card: ModelCard, path: Path, config: dict[str, Any]) -> None:
    bundle = _read_json(path / APP_BUNDLE_FILE, what="the app bundle record")
    signed = bool(config.get("app-signature"))
    if isinstance(bundle, dict) and bundle.get("fab_sha256"):
        card.app_bundle = {"fab_sha256": str(bundle["fab_sha256"]), "signed": bool(bundle.get("signed", signed)),
                           "note": ""}
    elif signed:
        card.app_bundle = {"fab_sha256": None, "signed": True, "note": (
            "A signed deployment, but the server did not record the bundle's hash (app_bundle.json is "
            "missing): `medfed run` printed it when the run was submitted.")}
    elif card.config.get("dataset") == "deployment":
        card.app_bundle = {"fab_sha256": None, "signed": False, "note": "A deployment without an app signature."}
    else:
        card.app_bundle = {"fab_sha256": None, "signed": False,
                           "note": "Not a signed deployment: a simulation on one machine, no app bundle."}


def _init_weights(card: ModelCard, path: Path) -> None:
    """What the initial model was loaded from (``init_weights.json``; the file's name, not its folder)."""
    record = _read_json(path / INIT_WEIGHTS_FILE, what="the init-weights record")
    if isinstance(record, dict) and record.get("sha256"):
        card.init_weights = {
            "file": Path(str(record.get("path", ""))).name, "kind": str(record.get("kind", "")),
            "sha256": str(record["sha256"]), "loaded_parameters": record.get("loaded_parameters"),
            "model_parameters": record.get("model_parameters"), "new": list(record.get("new", [])),
        }


def _explanations(card: ModelCard, folder: Path, *, given: bool) -> None:
    index = folder / "index.json"
    if not index.exists():
        card.explanations_note = (
            f"No explanation maps in {folder.name}/ (no index.json): check the folder given to --explanations."
            if given else
            "No site shared explanation maps. A site that allows it runs `medfed explain --out DIR` and "
            "passes DIR to `medfed report --explanations DIR`."
        )
        if given:
            raise ReportError(
                f"--explanations {folder}: no index.json there. Give the folder `medfed explain --out` wrote."
            )
        return
    rows = _read_json(index, what="the explanation index")
    if isinstance(rows, dict):  # medfed explain: {"method", "target_layer", "count", "rows": [...], ...}
        rows = rows.get("rows")
    if not isinstance(rows, list):
        raise ReportError(f"{index} must hold rows {{index, predicted, probability, method, png}} (as `medfed explain` "
                          "writes them): run it again.")
    for row in rows[:MAX_EXPLANATIONS]:
        png = folder / str(row.get("png", ""))
        if not row.get("png") or not png.is_file() or png.resolve().parent != folder.resolve():
            card.warnings.append(f"explanation map {row.get('png')!r} listed in index.json is missing: left out.")
            continue
        card.explanations.append({
            "index": row.get("index"),
            "predicted": row.get("predicted"),
            "probability": _finite(row.get("probability")),
            "method": str(row.get("method", "")),
            "explained": row.get("explained"),
            "png_base64": base64.b64encode(png.read_bytes()).decode("ascii"),
        })
    shown = len(card.explanations)
    card.explanations_note = f"{shown} of {len(rows)} map(s) shown (at most {MAX_EXPLANATIONS})."


def _data_and_calibration(
    card: ModelCard,
    path: Path,
    config: dict[str, Any],
    records: list[dict[str, Any]],
    *,
    dataset: str | None,
    calibrate: bool,
) -> None:
    counts: dict[str, dict[str, Any]] = {}
    for record in records:
        for site, parts in record.get("sites", {}).items():
            row = counts.setdefault(site, {"site": site, "train": None, "val": None, "class_mix": None})
            if parts.get("fit", {}).get("num_examples"):
                row["train"] = _finite(parts["fit"]["num_examples"])
            if parts.get("eval", {}).get("num_examples"):
                row["val"] = _finite(parts["eval"]["num_examples"])
    card.data_sites = [counts[s] for s in sorted(counts, key=_site_key)]
    cfg, why = _reachable_config(config, dataset=dataset)
    if cfg is None:
        card.data_note = f"Class mix per site not shown: {why} The counts are what the sites reported."
        card.calibration_note = f"Calibration not computed: {why}"
        return
    if card.mode == "federated":
        try:
            mixes = _simulated_class_mix(cfg)
        except Exception as err:  # noqa: BLE001 - a card without the mix beats no card
            card.data_note = f"Class mix per site not shown: the partition could not be recomputed ({type(err).__name__})."
        else:
            known = {row["site"] for row in card.data_sites}
            for site, mix in mixes.items():
                if site not in known:
                    card.data_sites.append({"site": site, "train": None, "val": None, "class_mix": None})
            for row in card.data_sites:
                row["class_mix"] = mixes.get(row["site"])
            card.data_note = (
                "Class mix recomputed from the run config's dataset, partition and seed (the same split the "
                "simulated sites drew). Training counts are the examples each site trained on in its last round "
                "(DP-SGD's Poisson sampling varies them)."
            )
    else:
        card.data_note = "A pooled baseline: one model trained on the pooled training split."
    if not calibrate:
        card.calibration_note = "Calibration not computed (--no-calibration)."
        return
    if card.task != "classification":
        card.calibration_note = "Calibration not computed: it is defined here for classification models only."
        return
    final = path / "checkpoints" / "final.pt"
    if not final.exists():
        card.calibration_note = "Calibration not computed: no final checkpoint yet."
        return
    try:
        card.calibration = _calibrate(cfg, final)
    except Exception as err:  # noqa: BLE001 - a card without calibration beats no card
        logger.warning("calibration failed: %s", type(err).__name__)
        card.calibration_note = f"Calibration not computed: evaluating the final checkpoint failed ({type(err).__name__})."


def _simulated_class_mix(cfg: Any) -> dict[str, dict[str, list[int]]]:
    """Each simulated site's class counts, ``{"site-k": {"train": [...], "val": [...]}}``: the split
    :func:`medfed.shared.partition.site_partitions` gives every simulated site (as
    ``medfed.client.site_data.simulated_class_counts``, which the server may not import)."""
    from medfed.shared.data.loading import load_dataset
    from medfed.shared.partition import class_counts, site_partitions

    splits = load_dataset(cfg)
    train, val = splits.train.class_labels(), splits.val.class_labels()
    parts = site_partitions(train, val, num_sites=cfg.num_sites, method=cfg.partition, alpha=cfg.dirichlet_alpha,
                            seed=cfg.seed, local_test_fraction=cfg.local_test_fraction)
    num_classes = splits.num_classes if splits.task == "classification" else 2
    train_counts = class_counts(train, parts.train, num_classes)
    val_counts = class_counts(val, parts.val, num_classes)
    return {f"site-{k}": {"train": train_counts[k].tolist(), "val": val_counts[k].tolist()}
            for k in range(cfg.num_sites)}


def _reachable_config(config: dict[str, Any], *, dataset: str | None) -> tuple[Any, str]:
    """The run's :class:`RunConfig` with a dataset readable from here, or ``(None, why)``."""
    from medfed.shared.config import ConfigError
    from medfed.shared.config_sources import config_from_run_config

    values = dict(config)
    if dataset:
        values["dataset"] = dataset
    name = str(values.get("dataset", ""))
    if name == "deployment":
        return None, "a deployment: the data stays at the sites and the coordinator holds none."
    if name != "synthetic" and not Path(name).exists():
        return None, (
            f"the run's dataset ({Path(name).name}) is not reachable from this folder; pass --dataset PATH."
        )
    for key in ("resume", "app-signature"):
        values.pop(key, None)
    try:
        return config_from_run_config(values, source="config.json"), ""
    except ConfigError as err:
        return None, f"the run config is not valid for this medfed version ({err})."


def _calibrate(cfg: Any, checkpoint: Path) -> dict[str, Any]:
    import torch

    from medfed.shared.calibration import calibration
    from medfed.shared.data.loading import load_dataset
    from medfed.shared.task import model_for
    from medfed.shared.training import predict, select_device

    splits = load_dataset(cfg)
    model = model_for(cfg, splits.train)
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["state_dict"])
    logits, targets, _ = predict(model, splits.test, device=select_device("auto"))
    result = calibration(logits, targets)
    return {"round": int(payload.get("round", 0)), "split": "test", "bins": result}
