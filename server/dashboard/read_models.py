"""The dashboard's read models: runs, rounds, sites, fairness and events as the API serves them.

Read-only queries over the run store's tables (:mod:`medfed.server.store.schema`); every call is one
read transaction, which under SQLite's WAL sees the last committed round without waiting for a
writer. Rows come back as plain dicts (JSON-ready), without the ``run_id`` column.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from medfed.server.store.database import Database
from medfed.server.store.schema import checkpoints, cross_site, events, rounds, runs, site_rounds
from medfed.shared.refusals import is_refusal

__all__ = ["STALE_AFTER_S", "RunReader"]

STALE_AFTER_S = 15 * 60.0
"""A run still marked running with no write for this long is reported as ``stale``."""


class RunReader:
    """The read models over one open run store.

    Parameters
    ----------
    store
        An open store (:class:`medfed.server.store.RunStore`); only read, never closed here.
    """

    def __init__(self, store: Database) -> None:
        self.store = store

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, newest first (without config and summary)."""
        with self.store.reading() as conn:
            rows = conn.execute(sa.select(runs).order_by(runs.c.started.desc(), runs.c.id)).mappings().all()
        return [_run_row(row, full=False) for row in rows]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run with its config, versions, summary, error and checkpoints; ``None`` if unknown."""
        with self.store.reading() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).mappings().first()
            if row is None:
                return None
            cps = conn.execute(
                sa.select(checkpoints).where(checkpoints.c.run_id == run_id).order_by(checkpoints.c.kind)
            ).mappings().all()
            last_event = conn.execute(sa.select(sa.func.max(events.c.id)).where(events.c.run_id == run_id)).scalar()
        out = _run_row(row, full=True)
        out["checkpoints"] = [
            {"kind": c["kind"], "round": c["round"], "metrics": c["metrics"], "saved": c["saved"]} for c in cps
        ]
        out["last_event_id"] = int(last_event or 0)
        return out

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        """The run's rounds in order (round 0: the initial model's evaluation)."""
        with self.store.reading() as conn:
            rows = conn.execute(
                sa.select(rounds).where(rounds.c.run_id == run_id).order_by(rounds.c.round)
            ).mappings().all()
        return [{k: v for k, v in row.items() if k != "run_id"} for row in rows]

    def site_rounds(self, run_id: str) -> list[dict[str, Any]]:
        """Every (round, site) record of the run, by round then site."""
        with self.store.reading() as conn:
            rows = conn.execute(
                sa.select(site_rounds)
                .where(site_rounds.c.run_id == run_id)
                .order_by(site_rounds.c.round, site_rounds.c.site)
            ).mappings().all()
        return [{k: v for k, v in row.items() if k != "run_id"} for row in rows]

    def sites(self, run_id: str) -> list[dict[str, Any]]:
        """One summary per site: last seen, examples, latest local metrics, epsilon, dropouts.

        ``rounds_missed`` counts the finished rounds (after the site's first one) in which the
        site sent no result: a dropout or a failure the server could not attribute.
        """
        per_round = self.site_rounds(run_id)
        finished = [r["round"] for r in self.rounds(run_id) if r["status"] == "finished" and r["round"] > 0]
        by_site: dict[str, list[dict[str, Any]]] = {}
        for row in per_round:
            by_site.setdefault(row["site"], []).append(row)
        out = []
        for site in sorted(by_site, key=_site_sort_key):
            rows = by_site[site]
            fits = [r for r in rows if r["fit"] is not None]
            evals = [r for r in rows if r["eval"] is not None]
            eps = [r for r in rows if r["epsilon"] is not None]
            trained = [r for r in fits if not r["declined"]]
            first = min(r["round"] for r in fits) if fits else None
            fit_rounds = {r["round"] for r in fits}
            missed = sum(1 for rnd in finished if first is not None and rnd > first and rnd not in fit_rounds)
            last = rows[-1]
            out.append(
                {
                    "site": site,
                    "last_round": last["round"],
                    "last_seen": max(r["recorded"] for r in rows),
                    "num_examples": trained[-1]["num_examples"] if trained else last["num_examples"],
                    "local_metrics": dict(evals[-1]["eval"]) if evals else {},
                    "local_metrics_round": evals[-1]["round"] if evals else None,
                    "train_metrics": dict(fits[-1]["fit"]) if fits else {},
                    "epsilon": eps[-1]["epsilon"] if eps else None,
                    "budget_epsilon": eps[-1]["budget_epsilon"] if eps else None,
                    "rounds_participated": len(fit_rounds),
                    "rounds_declined": sum(1 for r in rows if r["declined"]),
                    "rounds_refused": sum(1 for r in fits if is_refusal(r["fit"])),
                    "rounds_missed": missed,
                }
            )
        return out

    def fairness(self, run_id: str) -> dict[str, Any]:
        """Per round, the best and worst site on the primary local metric and the gap between them.

        The metric is the sites' ``dice``, else ``auc``, else ``accuracy`` (higher is better),
        else ``loss`` (lower is better), from their validation (``eval``) results.
        """
        evals = [r for r in self.site_rounds(run_id) if r["eval"]]
        metric, higher = _fairness_metric(evals)
        points = []
        by_round: dict[int, list[tuple[str, float]]] = {}
        for row in evals:
            if metric in row["eval"]:
                by_round.setdefault(row["round"], []).append((row["site"], float(row["eval"][metric])))
        for rnd in sorted(by_round):
            values = sorted(by_round[rnd], key=lambda sv: sv[1], reverse=higher)
            (best_site, best), (worst_site, worst) = values[0], values[-1]
            points.append(
                {
                    "round": rnd,
                    "best": best,
                    "worst": worst,
                    "gap": abs(best - worst),
                    "best_site": best_site,
                    "worst_site": worst_site,
                    "sites": len(values),
                }
            )
        return {"metric": metric, "higher_is_better": higher, "rounds": points}

    def cross_site(self, run_id: str, *, checkpoint: str = "final") -> dict[str, Any] | None:
        """The cross-site report of ``checkpoint`` as ``cross_site.json`` holds it (gaps recomputed
        from the stored subgroup rows); ``None`` when there is none."""
        from medfed.server.cross_site import subgroup_gaps, subgroup_order  # the one place for both

        with self.store.reading() as conn:
            rows = conn.execute(
                sa.select(cross_site).where(cross_site.c.run_id == run_id, cross_site.c.checkpoint == checkpoint)
            ).mappings().all()
        if not rows:
            return None
        sites: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row["key"] == "":
                sites[row["site"]] = {"site": row["site"], "n": row["n"], "metrics": dict(row["metrics"]),
                                      "subgroups": [], "suppressed": int(row["suppressed"] or 0)}
        for row in sorted((r for r in rows if r["key"] != ""), key=subgroup_order):
            if row["site"] in sites:
                sites[row["site"]]["subgroups"].append(
                    {"key": row["key"], "value": row["value"], "n": row["n"], "metrics": dict(row["metrics"])}
                )
        ordered = [sites[name] for name in sorted(sites, key=_site_sort_key)]
        first = rows[0]
        return {"checkpoint": checkpoint, "round": first["round"], "task": first["task"],
                "min_count": first["min_count"], "sites": ordered, "gaps": subgroup_gaps(ordered)}

    def events(self, run_id: str, *, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """The run's events with ``id > after``, oldest first, at most ``limit``."""
        with self.store.reading() as conn:
            rows = conn.execute(
                sa.select(events)
                .where(events.c.run_id == run_id, events.c.id > after)
                .order_by(events.c.id)
                .limit(limit)
            ).mappings().all()
        return [{k: v for k, v in row.items() if k != "run_id"} for row in rows]


def _site_sort_key(site: str) -> tuple[str, int]:
    head, _, tail = site.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (site, -1)


def _fairness_metric(evals: list[dict[str, Any]]) -> tuple[str | None, bool]:
    keys: set[str] = set()
    for row in evals:
        keys.update(row["eval"])
    for metric in ("dice", "auc", "accuracy"):
        if metric in keys:
            return metric, True
    return ("loss", False) if "loss" in keys else (None, True)


def _run_row(row: Mapping[str, Any], *, full: bool) -> dict[str, Any]:
    status = row["status"]
    last = row["last_update"] or row["started"]
    stale = status == "running" and time.time() - last > STALE_AFTER_S
    out = {
        "id": row["id"],
        "mode": row["mode"],
        "status": "stale" if stale else status,
        "started": row["started"],
        "finished": row["finished"],
        "last_update": last,
        "planned_rounds": row["planned_rounds"],
        "num_sites": row["num_sites"],
        "current_round": row["current_round"],
        "rounds_done": row["rounds_done"],
        "model": row["config"].get("model"),
        "strategy": row["config"].get("strategy"),
        "dataset": row["config"].get("dataset"),
        "error": row["error"],
    }
    if full:
        out.update(config=row["config"], versions=row["versions"], summary=row["summary"])
    return out
