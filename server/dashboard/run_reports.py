"""The dashboard's model cards: find a run's directory, write its report when missing or stale.

The run store names a run by its run directory's name; the directory itself is found under the
run's ``run-dir`` (as its config recorded it) or under the dashboard's runs folder (by default the
folder of an SQLite store, where ``medfed simulate`` writes both). The report is the page
``medfed report RUN`` writes (``<run>/report.html``); it is rewritten when the run has changed
since (a new round, the cross-site evaluation, shared explanation maps), else served as it is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medfed.server.model_card import APP_BUNDLE_FILE, CROSS_SITE_FILE, EXPLANATIONS_DIR, gather_model_card
from medfed.server.report import REPORT_FILE, render_html, write_report

__all__ = ["RunReports", "report_inputs"]

logger = logging.getLogger(__name__)


def report_inputs(run_dir: Path) -> list[Path]:
    """The files a run's report is made from (those that exist)."""
    names = ("config.json", "metrics.jsonl", "summary.json", CROSS_SITE_FILE, APP_BUNDLE_FILE,
             "checkpoints/final.pt", "checkpoints/best.pt", f"{EXPLANATIONS_DIR}/index.json")
    return [run_dir / name for name in names if (run_dir / name).exists()]


class RunReports:
    """Model cards of the runs a dashboard shows.

    Parameters
    ----------
    runs_roots
        Folders that hold run directories, tried after each run's recorded ``run-dir``.
    """

    def __init__(self, runs_roots: Iterable[str | Path] = ()) -> None:
        self.roots = [Path(root) for root in runs_roots]
        self._lock = threading.Lock()

    def locate(self, run_id: str, config: Mapping[str, Any]) -> Path | None:
        """The run directory of ``run_id`` on this machine, or ``None``."""
        if not run_id or Path(run_id).name != run_id or run_id in (".", ".."):
            return None
        roots = [Path(str(config["run-dir"]))] if config.get("run-dir") else []
        for root in [*roots, *self.roots]:
            candidate = root / run_id
            if (candidate / "config.json").is_file():
                return candidate
        return None

    def html(self, run_dir: Path) -> str:
        """The report of ``run_dir``: ``report.html`` as it is if newer than every input, else written anew.

        A run directory the dashboard cannot write to gets its report rendered in memory.

        Raises
        ------
        medfed.server.model_card.ReportError
            The run directory cannot be reported on.
        """
        target = run_dir / REPORT_FILE
        with self._lock:  # one report at a time: each may evaluate a model
            if target.is_file():
                written = target.stat().st_mtime
                if all(path.stat().st_mtime <= written for path in report_inputs(run_dir)):
                    return target.read_text(encoding="utf-8")
            try:
                write_report(run_dir, out=target)
            except OSError as err:
                logger.warning("cannot write %s (%s): the report is served without being saved.", REPORT_FILE, err)
                return render_html(gather_model_card(run_dir))
            return target.read_text(encoding="utf-8")
