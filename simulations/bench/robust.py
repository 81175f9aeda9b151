"""Model poisoning: FedAvg against Flower's robust aggregation rules, one malicious site.

Run ``python -m medfed.simulations.bench.robust`` (about 5 minutes on 2 CPU cores; ``--help`` for
options). Each strategy runs twice in Flower's simulation engine (Ray) on the SYNTHETIC
classification task (:func:`task_config`: blobs, not medical images): once with every site
honest, once with site 0 poisoning (:func:`poisoning_attacks`: it trains honestly, then sends
``global - s * (local - global)``, a sign-flipped update scaled by ``s = 10``; test-only
:mod:`medfed.simulations.faults`). The table gives the final test accuracy and AUC of the global model,
evaluated by the server on the held-out split. Everything but the strategy is the same in
every run (seed, data, partition, schedule), so the clean FedAvg run is the reference.

Bulyan needs ``4f + 3`` sites per round (7 for one malicious site) and is skipped below that.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.client.client_app import make_client_app
from medfed.shared.config import ConfigError, RunConfig
from medfed.simulations.faults import Attack, attack_client_fn
from medfed.simulations.simulate import run_federated

if TYPE_CHECKING:
    from medfed.simulations.bench import BenchContext, SectionResult

__all__ = ["task_config", "poisoning_attacks", "RobustRow", "run_bench", "format_table", "main"]

logger = logging.getLogger(__name__)

DEFAULT_STRATEGIES: tuple[str, ...] = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def task_config(
    *, strategy: str = "fedavg", sites: int = 5, rounds: int = 3, samples: int = 600, seed: int = 0, **changes: Any
) -> RunConfig:
    """The poisoning task: synthetic 2-class blobs at 16x16, simplecnn, IID sites, 2 local epochs.

    600 samples give each of 5 sites 84 training images and a test split of 90; the clean
    FedAvg model reaches about 0.87 test accuracy in 3 rounds (seed 0). ``changes`` are
    further :class:`RunConfig` fields (``run_dir``, ``store``, ``max_update_norm``...).
    """
    base: dict[str, Any] = dict(
        dataset="synthetic", synthetic_samples=samples, image_size=16, model="simplecnn", batch_size=16,
        num_sites=sites, min_fit_clients=sites, num_server_rounds=rounds, local_epochs=2, learning_rate=0.05,
        fraction_evaluate=0.0, seed=seed, strategy=strategy, num_malicious_sites=1, secagg=False,
    )
    return RunConfig(**{**base, **changes})


def poisoning_attacks(*, factor: float = 10.0, attacker: int = 0) -> dict[int, Attack]:
    """Site ``attacker`` sends ``global - factor * (local - global)`` every round."""
    return {attacker: Attack("sign-flip", factor=factor)}


@dataclass
class RobustRow:
    """One strategy's final global metrics, clean and poisoned."""

    strategy: str
    clean: dict[str, float]
    poisoned: dict[str, float]
    seconds: float


def _final(cfg: RunConfig, attacks: dict[int, Attack], run_dir: Path) -> dict[str, float]:
    """Final global metrics of one run; every site must have answered every round."""
    app = make_client_app(cfg, client_fn=attack_client_fn(cfg, attacks))
    result = run_federated(cfg, run_path=run_dir, client_app=app)
    failed = [r.round for r in result.rounds if r.num_fit_failures or r.skipped]
    if failed:
        raise RuntimeError(f"{cfg.strategy}: sites failed or rounds were skipped in rounds {failed}; see {run_dir}.")
    return {k: float(v) for k, v in result.final_metrics.items()}


def run_bench(
    *,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    sites: int = 5,
    rounds: int = 3,
    samples: int = 600,
    factor: float = 10.0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    clean: bool = True,
) -> list[RobustRow]:
    """Run every strategy clean and poisoned; skip (with a warning) the ones ``sites`` cannot run.

    Parameters
    ----------
    strategies
        Strategy names (``medfed.shared.config.STRATEGIES``).
    sites, rounds, samples, seed
        The task (:func:`task_config`).
    factor
        The poisoning site's scale ``s``.
    out_dir
        Where run directories go (default: a temporary folder).
    clean
        Also run each strategy without the poisoning site (``False``: the rows' ``clean`` is empty).
    """
    root = Path(out_dir or tempfile.mkdtemp(prefix="medfed-robust-"))
    rows = []
    for name in strategies:
        try:
            cfg = task_config(strategy=name, sites=sites, rounds=rounds, samples=samples, seed=seed,
                              run_dir=str(root), store="off")
        except ConfigError as err:
            logger.warning("%s skipped: %s", name, err)
            continue
        start = time.perf_counter()
        clean_final = _final(cfg, {}, root / f"{name}-clean") if clean else {}
        poisoned = _final(cfg, poisoning_attacks(factor=factor), root / f"{name}-poisoned")
        rows.append(RobustRow(name, clean_final, poisoned, time.perf_counter() - start))
        logger.warning("%s: clean accuracy %.3f, poisoned %.3f", name, clean_final.get("accuracy", float("nan")),
                       poisoned.get("accuracy", float("nan")))
    return rows


def format_table(rows: Sequence[RobustRow], *, reference: str = "fedavg") -> str:
    """A Markdown table: accuracy and AUC, clean and with the poisoning site, and the change."""
    ref = next((r.clean.get("accuracy") for r in rows if r.strategy == reference), None)
    lines = [
        "| strategy | clean accuracy | clean AUC | poisoned accuracy | poisoned AUC | poisoned - clean FedAvg (accuracy) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        delta = f"{r.poisoned['accuracy'] - ref:+.3f}" if ref is not None and "accuracy" in r.poisoned else "n/a"
        lines.append(
            f"| {r.strategy} | {r.clean.get('accuracy', float('nan')):.3f} | {r.clean.get('auc', float('nan')):.3f} | "
            f"{r.poisoned.get('accuracy', float('nan')):.3f} | {r.poisoned.get('auc', float('nan')):.3f} | {delta} |"
        )
    return "\n".join(lines)


def bench_section(ctx: BenchContext) -> SectionResult:
    """Section ``robustness`` of ``medfed bench``: :func:`run_bench` with the profile's strategies and sites.

    One row per strategy (a strategy the number of sites cannot run is left out by
    :func:`run_bench` and listed with the reason); the change is against clean FedAvg when the
    profile runs it.
    """
    from medfed.simulations.bench import SectionResult, Table
    from medfed.simulations.bench.support import fmt

    p = ctx.profile
    table = Table(
        title=f"One poisoning site of {p.robust_sites}: final test metrics, clean and poisoned",
        columns=["strategy", "clean accuracy", "clean AUC", "poisoned accuracy", "poisoned AUC",
                 "poisoned - clean FedAvg (accuracy)"],
    )
    result = SectionResult(tables=[table])
    rows = run_bench(strategies=p.robust_strategies, sites=p.robust_sites, rounds=p.robust_rounds,
                     samples=p.robust_samples, seed=p.seeds[0], out_dir=ctx.workdir / "runs" / "robust",
                     clean=p.robust_clean)
    reference = next((r.clean.get("accuracy") for r in rows if r.strategy == "fedavg"), None)
    no_clean = (f"not run: the {p.name} profile runs the poisoned federations only" if not p.robust_clean
                else "n/a: no value was produced")
    for r in rows:
        delta = (f"{r.poisoned['accuracy'] - reference:+.3f}" if reference is not None and "accuracy" in r.poisoned
                 else "n/a: clean FedAvg is not run in this profile")
        table.add(r.strategy, fmt(r.clean.get("accuracy"), reason=no_clean), fmt(r.clean.get("auc"), reason=no_clean),
                  fmt(r.poisoned.get("accuracy")), fmt(r.poisoned.get("auc")), delta)
    for name in [s for s in p.robust_strategies if s not in {r.strategy for r in rows}]:
        table.add_unavailable(f"not run: {p.robust_sites} sites are too few for {name} with one malicious site "
                              "(see the log)", name)
    table.notes.append(
        f"Site 0 sends global - 10 x (local - global) every round; synthetic 2-class blobs 16x16 ({p.robust_samples} "
        f"samples, not medical images), simplecnn, {p.robust_rounds} rounds x 2 local epochs, num-malicious-sites 1, "
        f"seed {p.seeds[0]}; Flower's simulation engine."
    )
    result.commands.append(ctx.reproduce("robustness"))
    result.commands.append(
        f"python -m medfed.simulations.bench.robust --strategies {' '.join(p.robust_strategies)} --sites {p.robust_sites} "
        f"--rounds {p.robust_rounds} --samples {p.robust_samples}"
    )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Print the poisoning table (Markdown, ready for BENCHMARKS.md)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES))
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--factor", type=float, default=10.0, help="the poisoning site's scale s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="keep the run directories here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    rows = run_bench(strategies=args.strategies, sites=args.sites, rounds=args.rounds, samples=args.samples,
                     factor=args.factor, seed=args.seed, out_dir=args.out_dir)
    print()
    print(f"Poisoning benchmark: {args.sites} sites, site 0 sends global - {args.factor:g} * (local - global) every "
          f"round; synthetic 2-class blobs 16x16 ({args.samples} samples), simplecnn, {args.rounds} rounds x 2 local "
          f"epochs, seed {args.seed}, num-malicious-sites 1; {os.cpu_count()} CPUs")
    print(format_table(rows))
    print("seconds per strategy (clean + poisoned): " + ", ".join(f"{r.strategy} {r.seconds:.0f}" for r in rows))


if __name__ == "__main__":
    main()
