"""The run store's write path: what the server records of each run, round and site.

A run's config, each round's start and end (sites selected and responding, global and per-site
metrics, SecAgg+ status and dropouts, epsilon spent per site), checkpoints, warnings, errors and
the outcome go into the tables of :mod:`medfed.server.store.schema`, one write transaction each, with
an event for the dashboard's log. The server writes through :class:`medfed.server.store.sink.StoreSink`;
the dashboard reads with :class:`medfed.server.dashboard.read_models.RunReader`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medfed.server.store.database import Database
from medfed.server.store.redaction import redact_config, scrub
from medfed.server.store.schema import checkpoints, cross_site, events, rounds, runs, site_rounds
from medfed.shared.refusals import is_refusal, refused_keys

__all__ = ["RunStore"]


class RunStore(Database):
    """A run store (opened as :class:`~medfed.server.store.database.Database`: same parameters and
    errors), and the writes that record runs into it: one transaction per call."""

    def start_run(
        self,
        run_id: str,
        *,
        mode: str,
        config: Mapping[str, Any],
        versions: Mapping[str, str] | None = None,
    ) -> str:
        """Record a new run; return its id (``run_id``, suffixed ``-2``, ... if taken)."""
        now = time.time()
        cfg = redact_config(config)
        with self._write() as conn:
            taken = set(conn.execute(sa.select(runs.c.id).where(runs.c.id.like(f"{run_id}%"))).scalars())
            final_id, suffix = run_id, 1
            while final_id in taken:
                suffix += 1
                final_id = f"{run_id}-{suffix}"
            conn.execute(
                runs.insert().values(
                    id=final_id,
                    mode=mode,
                    status="running",
                    started=now,
                    config=cfg,
                    versions=dict(versions or {}),
                    planned_rounds=int(cfg.get("num-server-rounds", 0) or 0),
                    num_sites=int(cfg["num-sites"]) if mode == "federated" and "num-sites" in cfg else None,
                    current_round=0,
                    rounds_done=0,
                    last_update=now,
                )
            )
            self._event(conn, final_id, "info", "run-started", None, f"{mode} run started", now)
        return final_id

    def resume_run(self, run_id: str, *, config: Mapping[str, Any], after_round: int) -> str:
        """Continue run ``run_id`` after round ``after_round`` (its server process died).

        Rounds after ``after_round`` (a round that was running, or one finished after the saved
        resume state) are deleted with their per-site rows, since the resumed run records them
        again; the run is marked running again and a ``run-resumed`` event is added. Earlier
        events stay: they are the run's history. A run the store does not know (the store was
        replaced) is created under the same id, with a warning event.

        Returns
        -------
        str
            The run id (``run_id``).
        """
        now = time.time()
        with self._write() as conn:
            known = conn.execute(sa.select(runs.c.id).where(runs.c.id == run_id)).first() is not None
        if not known:
            final_id = self.start_run(run_id, mode="federated", config=config)
            self.add_event(
                final_id, level="warning", kind="run-resumed", server_round=after_round,
                message=f"run resumed after round {after_round}, but the run store had no record of "
                "rounds up to it (the store was replaced); the run directory has them",
            )
            return final_id
        with self._write() as conn:
            conn.execute(site_rounds.delete().where(site_rounds.c.run_id == run_id, site_rounds.c.round > after_round))
            conn.execute(rounds.delete().where(rounds.c.run_id == run_id, rounds.c.round > after_round))
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(
                    status="running", finished=None, error=None, summary=None,
                    current_round=after_round, rounds_done=after_round, last_update=now,
                )
            )
            self._event(
                conn, run_id, "warning", "run-resumed", after_round,
                f"run resumed after round {after_round}: the server process had stopped; "
                f"rounds from {after_round + 1} on run now", now,
            )
        return run_id

    def round_started(self, run_id: str, server_round: int, *, selected: int | None) -> None:
        """Round ``server_round`` began with ``selected`` sites."""
        now = time.time()
        with self._write() as conn:
            exists = conn.execute(
                sa.select(rounds.c.round).where(rounds.c.run_id == run_id, rounds.c.round == server_round)
            ).first()
            if exists:
                conn.execute(
                    rounds.update()
                    .where(rounds.c.run_id == run_id, rounds.c.round == server_round)
                    .values(selected=selected)
                )
            else:
                conn.execute(rounds.insert().values(**self._empty_round(run_id, server_round, now), selected=selected))
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(current_round=server_round, last_update=now)
            )
            sites = f" with {selected} site(s)" if selected is not None else ""
            self._event(conn, run_id, "info", "round-started", server_round, f"round {server_round} started{sites}", now)

    @staticmethod
    def _empty_round(run_id: str, server_round: int, now: float) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "round": server_round,
            "status": "running",
            "started": now,
            "responded": 0,
            "failures": 0,
            "global_metrics": {},
            "fit_metrics": {},
            "eval_metrics": {},
        }

    def round_finished(self, run_id: str, record: Mapping[str, Any]) -> None:
        """Record a finished round: ``record`` is :meth:`medfed.server.run_dir.RoundRecord.to_json`."""
        now = time.time()
        server_round = int(record["round"])
        sites: Mapping[str, Mapping[str, Any]] = record.get("sites") or {}
        secagg = record.get("secagg")
        values = {
            "status": "finished",
            "finished": now,
            "seconds": _finite(record.get("seconds")),
            "responded": int(record.get("fit_results", 0) or 0),
            "failures": int(record.get("fit_failures", 0) or 0),
            "global_metrics": _clean(record.get("global")),
            "fit_metrics": _clean(record.get("fit")),
            "eval_metrics": _clean(record.get("eval")),
            "secagg": _clean_secagg(secagg) if secagg else None,
        }
        with self._write() as conn:
            existing = conn.execute(
                sa.select(rounds.c.selected, rounds.c.started).where(
                    rounds.c.run_id == run_id, rounds.c.round == server_round
                )
            ).first()
            if existing is None:
                started = now - (values["seconds"] or 0.0)
                conn.execute(rounds.insert().values(**{**self._empty_round(run_id, server_round, started), **values}))
            else:
                conn.execute(
                    rounds.update().where(rounds.c.run_id == run_id, rounds.c.round == server_round).values(**values)
                )
            selected = existing.selected if existing is not None else None
            conn.execute(site_rounds.delete().where(site_rounds.c.run_id == run_id, site_rounds.c.round == server_round))
            declined: list[str] = []
            refused: list[str] = []
            for site in sorted(sites):
                parts = sites[site] or {}
                fit, ev = _clean(parts.get("fit")), _clean(parts.get("eval"))
                if is_refusal(fit) or is_refusal(ev):
                    keys = refused_keys(fit) or refused_keys(ev)
                    refused.append(f"{site} ({', '.join(keys) or 'no key named'})")
                is_declined = bool(fit.get("dp-declined", 0))
                if is_declined:
                    declined.append(site)
                conn.execute(
                    site_rounds.insert().values(
                        run_id=run_id,
                        round=server_round,
                        site=str(site),
                        recorded=now,
                        fit=fit or None,
                        eval=ev or None,
                        num_examples=fit.get("num_examples", ev.get("num_examples")),
                        epsilon=fit.get("dp-epsilon"),
                        budget_epsilon=fit.get("dp-budget-epsilon"),
                        declined=is_declined,
                    )
                )
            done = max(0, server_round)
            conn.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(
                    rounds_done=sa.func.max(runs.c.rounds_done, done)
                    if self.is_sqlite
                    else sa.func.greatest(runs.c.rounds_done, done),
                    last_update=now,
                )
            )
            if server_round == 0:
                self._event(conn, run_id, "info", "initial-model", 0, "initial model evaluated", now)
                return
            msg = f"round {server_round} finished: {values['responded']} site(s) responded"
            if selected is not None:
                msg += f" of {selected} selected"
            if values["seconds"] is not None:
                msg += f" in {values['seconds']:.1f} s"
            self._event(conn, run_id, "info", "round-finished", server_round, msg, now)
            if values["failures"]:
                self._event(
                    conn, run_id, "warning", "site-failures", server_round,
                    f"round {server_round}: {values['failures']} site(s) failed to train", now,
                )
            for failure in record.get("failed_sites") or []:
                self._event(
                    conn, run_id, "warning", "site-failed", server_round,
                    f"round {server_round}: {_failure_text(failure)}", now,
                )
            if declined:
                self._event(
                    conn, run_id, "warning", "dp-declined", server_round,
                    f"round {server_round}: {', '.join(declined)} declined to train "
                    "(one more round would exceed the site's privacy budget)", now,
                )
            if refused:
                self._event(
                    conn, run_id, "error", "policy-refused", server_round,
                    f"round {server_round}: {'; '.join(refused)} refused the run: it asks for less privacy "
                    "than the site's policy allows; change these run-config keys", now,
                )
            for rejection in record.get("rejected") or []:
                identity = rejection.get("reason") == "identity"  # medfed.server.identity.IDENTITY_REASON
                self._event(
                    conn, run_id, "error" if identity else "warning",
                    "identity-refused" if identity else "update-rejected", server_round,
                    f"round {server_round}: {rejection.get('site', '?')}'s update rejected "
                    f"({rejection.get('reason', '?')}: {rejection.get('detail', '')})", now,
                )
            if record.get("skipped"):
                self._event(
                    conn, run_id, "error", "round-skipped", server_round,
                    f"round {server_round}: nothing aggregated, {record['skipped']}", now,
                )
            if values["secagg"]:
                sec = values["secagg"]
                if not sec.get("completed", False):
                    stage = sec.get("failed_stage") or "unknown stage"
                    self._event(
                        conn, run_id, "error", "secagg-failed", server_round,
                        f"round {server_round}: SecAgg+ failed at {stage}; the model was not updated", now,
                    )
                elif sec.get("dropped"):
                    self._event(
                        conn, run_id, "warning", "secagg-dropouts", server_round,
                        f"round {server_round}: SecAgg+ completed with {sec['dropped']} dropout(s)", now,
                    )

    def checkpoint(self, run_id: str, kind: str, *, server_round: int, metrics: Mapping[str, float]) -> None:
        """Record that checkpoint ``kind`` (``best``, ``final``) now holds round ``server_round``."""
        now = time.time()
        values = {"round": int(server_round), "metrics": _clean(metrics), "saved": now}
        with self._write() as conn:
            where = (checkpoints.c.run_id == run_id, checkpoints.c.kind == kind)
            if conn.execute(sa.select(checkpoints.c.kind).where(*where)).first():
                conn.execute(checkpoints.update().where(*where).values(**values))
            else:
                conn.execute(checkpoints.insert().values(run_id=run_id, kind=kind, **values))
            conn.execute(runs.update().where(runs.c.id == run_id).values(last_update=now))
            self._event(conn, run_id, "info", "checkpoint", server_round, f"{kind} checkpoint: round {server_round}", now)

    def cross_site(self, run_id: str, report: Mapping[str, Any]) -> None:
        """Record a cross-site report (``cross_site.json``, :mod:`medfed.server.cross_site`).

        One row per site (``key`` and ``value`` empty) and per reported subgroup; the rows of an
        earlier report of the same checkpoint are replaced. Adds a ``cross-site`` event.
        """
        now = time.time()
        checkpoint = str(report["checkpoint"])
        common = {
            "run_id": run_id,
            "checkpoint": checkpoint,
            "round": int(report["round"]),
            "task": str(report["task"]),
            "min_count": int(report["min_count"]),
            "recorded": now,
        }
        rows: list[dict[str, Any]] = []
        for site in report.get("sites") or []:
            rows.append({**common, "site": str(site["site"]), "key": "", "value": "", "n": int(site["n"]),
                         "suppressed": int(site.get("suppressed", 0)), "metrics": _clean(site.get("metrics"))})
            for group in site.get("subgroups") or []:
                rows.append({**common, "site": str(site["site"]), "key": str(group["key"]), "value": str(group["value"]),
                             "n": int(group["n"]), "suppressed": None, "metrics": _clean(group.get("metrics"))})
        with self._write() as conn:
            conn.execute(cross_site.delete().where(cross_site.c.run_id == run_id, cross_site.c.checkpoint == checkpoint))
            if rows:
                conn.execute(cross_site.insert(), rows)
            conn.execute(runs.update().where(runs.c.id == run_id).values(last_update=now))
            sites = len(report.get("sites") or [])
            self._event(
                conn, run_id, "info", "cross-site", int(report["round"]),
                f"cross-site evaluation of the {checkpoint} model: {sites} site(s), "
                f"{len(rows) - sites} subgroup row(s)", now,
            )

    def add_event(
        self, run_id: str, *, level: str, kind: str, message: str, server_round: int | None = None
    ) -> None:
        """Append an event (``message`` is scrubbed of paths and shortened)."""
        now = time.time()
        with self._write() as conn:
            self._event(conn, run_id, level, kind, server_round, message, now)
            conn.execute(runs.update().where(runs.c.id == run_id).values(last_update=now))

    @staticmethod
    def _event(
        conn: Connection, run_id: str, level: str, kind: str, server_round: int | None, message: str, now: float
    ) -> None:
        conn.execute(
            events.insert().values(
                run_id=run_id, time=now, level=level, kind=kind, round=server_round, message=scrub(message)
            )
        )

    def finish_run(self, run_id: str, summary: Mapping[str, Any]) -> None:
        """The run ended normally with ``summary`` (see :meth:`RecordingStrategy.finish`)."""
        now = time.time()
        clean = _json_safe(summary)
        with self._write() as conn:
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(status="finished", finished=now, summary=clean, last_update=now)
            )
            stopped = clean.get("stopped_early") if isinstance(clean, dict) else None
            if stopped:
                self._event(
                    conn, run_id, "warning", "stopped-early", stopped.get("round"),
                    f"stopped early in round {stopped.get('round')}: {stopped.get('reason', '')}", now,
                )
            self._event(conn, run_id, "info", "run-finished", None, "run finished", now)

    def fail_run(self, run_id: str, error: str) -> None:
        """The run ended with ``error`` (scrubbed of paths)."""
        now = time.time()
        message = scrub(error)
        with self._write() as conn:
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(status="failed", finished=now, error=message, last_update=now)
            )
            self._event(conn, run_id, "error", "run-failed", None, f"run failed: {message}", now)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _clean(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Finite numeric metrics only (JSON has no NaN)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        number = _finite(value)
        if number is not None:
            out[str(key)] = number
    return out


def _failure_text(failure: Mapping[str, Any]) -> str:
    """One failed site, e.g. ``site-3 failed to train: FileNotFoundError (data-error)``."""
    site = failure.get("site") or f"an unidentified site (node {failure.get('node')})"
    if failure.get("code") == "TIMEOUT":
        return f"{site} did not answer within round-timeout"
    return f"{site} failed to train: {failure.get('error') or 'unknown error'} ({failure.get('code')})"


def _clean_secagg(secagg: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("sampled", "survivors", "dropped"):
        if _finite(secagg.get(key)) is not None:
            out[key] = int(secagg[key])
    if _finite(secagg.get("seconds")) is not None:
        out["seconds"] = float(secagg["seconds"])
    out["completed"] = bool(secagg.get("completed", False))
    stage = secagg.get("failed_stage")
    out["failed_stage"] = str(stage) if stage else None
    stages = secagg.get("active_after_stage") or {}
    out["active_after_stage"] = {str(k): int(v) for k, v in stages.items() if _finite(v) is not None}
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)
