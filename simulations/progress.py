"""The view of a run as it goes: a live rich table on a terminal, one plain line per round elsewhere.

On a terminal the rounds table is redrawn as rounds finish (rich ``Live``). When the output is a
file or a pipe (``> run.log``, ``nohup``, CI), a live view would only be written when the run
ends; there each round is one plain line, written and flushed as the round closes::

    round 3/10  auc 0.9120  accuracy 0.8500  loss 0.3100  sites 3/3  12.4 s
"""

from __future__ import annotations

import threading
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medfed.server.run_dir import RoundRecord, RunDirectory
from medfed.server.server_app import ServerHooks
from medfed.shared.metrics import predicts_single_class

__all__ = ["RunProgress", "SINGLE_CLASS", "flagged", "summary_lines", "site_class_lines"]

_GLOBAL_COLUMNS = ("auc", "accuracy", "balanced-accuracy", "dice", "map50", "map50-95", "loss")
SINGLE_CLASS = "single class"
"""The flag of a round whose global model predicts one class for every test or validation sample."""
_FLAG_KEYS = ("single-class", "predicted-classes", "validation-predicted-classes")
"""Metrics shown as the flag, not as numbers, in the summary."""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def flagged(record: RoundRecord) -> bool:
    """Whether the round's global model predicts a single class on the test or validation data
    (not said of the initial model, round 0, which is untrained)."""
    return record.round > 0 and predicts_single_class(record.global_metrics, record.eval_metrics)


class RunProgress:
    """Renders rounds as they finish (thread-safe: callbacks arrive on the server thread).

    Parameters
    ----------
    title
        Heading of the table (e.g. "federated: fedavg, 4 sites").
    rounds
        Planned number of rounds.
    console
        Where to draw (default: a new stdout console).
    live
        Redraw a live table (default: when ``console`` is a terminal); otherwise one plain line
        per round.
    """

    def __init__(
        self, *, title: str, rounds: int, console: Console | None = None, live: bool | None = None
    ) -> None:
        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self.title = title
        self.rounds = rounds
        self.records: list[RoundRecord] = []
        self.run_dir: Path | None = None
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task("rounds", total=rounds)
        self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)

    def hooks(self) -> ServerHooks:
        """Server hooks that feed this view."""
        return ServerHooks(on_start=self._on_start, on_round=self._on_round)

    def __enter__(self) -> RunProgress:
        if self.live:
            self._live.__enter__()
        else:
            self._write(self.title)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._live.update(self._render())
            self._live.__exit__(*exc)

    def _on_start(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir.path

    def _on_round(self, record: RoundRecord) -> None:
        with self._lock:
            self.records.append(record)
            if not self.live:
                self._write(self.line(record))
                return
            if record.round > 0:
                self._progress.update(self._task, completed=record.round)
            self._live.update(self._render())

    def line(self, record: RoundRecord) -> str:
        """One round as plain text: ``round 3/10  auc 0.9120  ...  sites 3/3  12.4 s``."""
        source = record.global_metrics or record.eval_metrics
        parts = [f"round {record.round}/{self.rounds}"]
        parts += [f"{name} {source[name]:.4f}" for name in _GLOBAL_COLUMNS if name in source]
        if record.round == 0:
            parts.append("(initial model)")
        else:
            answered = record.num_fit_results
            parts.append(f"sites {answered}/{answered + record.num_fit_failures}")
            if record.rejected:
                parts.append(f"({len(record.rejected)} rejected)")
            if record.skipped:
                parts.append("(not aggregated)")
            parts.append(f"{record.seconds or 0:.1f} s")
        if flagged(record):
            parts.append(f"({SINGLE_CLASS})")
        return "  ".join(parts)

    def _write(self, text: str) -> None:
        """A plain line, flushed at once (a log file shows it while the run goes on)."""
        self.console.file.write(text + "\n")
        self.console.file.flush()

    def _metric_names(self) -> list[str]:
        present = {k for r in self.records for k in r.global_metrics} | {
            k for r in self.records for k in r.eval_metrics
        }
        return [m for m in _GLOBAL_COLUMNS if m in present]

    def table(self) -> Table:
        """The rounds table: global metrics, site min/max of the validation metric, sites (with
        rejected updates), seconds."""
        table = Table(title=self.title, expand=False)
        table.add_column("round", justify="right")
        names = self._metric_names()
        for name in names:
            table.add_column(f"global {name}", justify="right")
        site_metric = next((m for m in ("auc", "dice", "map50", "accuracy") if m in names), None)
        if site_metric:
            table.add_column(f"site {site_metric} min", justify="right")
            table.add_column(f"site {site_metric} max", justify="right")
        table.add_column("sites", justify="right")
        table.add_column("s", justify="right")
        table.add_column("flag")
        for r in self.records:
            source = r.global_metrics or r.eval_metrics
            row = [str(r.round), *(_fmt(source.get(n)) for n in names)]
            if site_metric:
                row += [
                    _fmt(r.eval_metrics.get(f"{site_metric}-min")),
                    _fmt(r.eval_metrics.get(f"{site_metric}-max")),
                ]
            sites = str(r.num_fit_results or "-")
            if r.rejected:
                sites += f" ({len(r.rejected)} rejected)"
            if r.skipped:
                sites += " (not aggregated)"
            row += [sites, f"{r.seconds or 0:.1f}", f"[bold red]{SINGLE_CLASS}[/]" if flagged(r) else ""]
            table.add_row(*row)
        return table

    def _render(self) -> Group:
        return Group(self.table(), self._progress)


def summary_lines(summary: dict[str, object]) -> list[tuple[str, str]]:
    """The summary's figures as ``(label, value)`` pairs, for a table or plain lines.

    Each final test metric with, beside it, the validation-selected round's
    (``final auc: 0.8800  (selected round 7: 0.8900)``); the single-class flags of the final
    and selected models; the sites' local test figures (personalization), one line per site;
    the cross-site evaluation's row counts (:mod:`medfed.server.cross_site`).
    """
    final = dict(summary.get("final_metrics") or {})  # type: ignore[call-overload]
    best = dict(summary.get("best_metrics") or {})  # type: ignore[call-overload]
    best_round = summary.get("best_round")
    rows: list[tuple[str, str]] = []
    for key, value in sorted(final.items()):
        if key == "num_examples" or key in _FLAG_KEYS:
            continue
        text = f"{value:.4f}"
        if best_round is not None and key in best:
            text += f"  (selected round {best_round}: {best[key]:.4f})"
        rows.append((f"final {key}", text))
    if best_round is not None:
        rows.append(("best round", f"{best_round} (selected by {summary.get('best_selected_by')})"))
    flags = dict(summary.get("single_class") or {})  # type: ignore[call-overload]
    which = [name for name in ("final", "selected") if flags.get(name)]
    if which:
        rows.append(
            ("warning", f"the {' and the '.join(which)} global model predict{'s' if len(which) == 1 else ''} a "
             "single class on the test or validation data (accuracy = majority-rate)")
        )  # fmt: skip
    report = dict(summary.get("personalization") or {})  # type: ignore[call-overload]
    kept = dict(report.get("kept") or {})
    for site, row in dict(report.get("sites") or {}).items():
        text = _local_test_text(row)
        if site in kept:  # which model the site's validation split chose to keep
            text += f"  (kept: {'global' if kept[site] == 'off' else kept[site]})"
        rows.append((f"{site} local test", text))
    if report.get("mean"):
        counted = dict(report.get("mean_over_sites") or {})
        sites = f" (AUC over {counted['local-test-auc-global']} sites)" if "local-test-auc-global" in counted else ""
        rows.append((f"mean local test{sites}", _local_test_text(report["mean"])))
    cross = dict(summary.get("cross_site") or {})  # type: ignore[call-overload]
    if cross:
        rows.append(("cross-site", f"{cross.get('sites', 0)} site(s), {cross.get('subgroups', 0)} subgroup row(s), "
                     f"{cross.get('suppressed', 0)} below {cross.get('min_count')} images not reported: "
                     f"{cross.get('file')}"))
    return rows


def _local_test_text(row: dict[str, float]) -> str:
    """``n 14  auc global 0.80 | personalized 0.86 | local-only 0.75`` (what the row has)."""
    parts = [f"n {int(row['local-test-examples'])}"] if "local-test-examples" in row else []
    for metric in ("auc", "balanced-accuracy", "dice", "map50"):
        values = [
            f"{model} {row[key]:.4f}"
            for model in ("global", "personalized", "local-only")
            if (key := f"local-test-{metric}-{model}") in row
        ]
        if values:
            parts.append(f"{metric} " + " | ".join(values))
    if len(parts) <= 1 and row.get("local-test-examples"):
        parts.append("(one class in the local test split: no AUC)")
    return "  ".join(parts) or "no local test split"


def site_class_lines(sites: list[tuple[str, dict[str, list[int]]]]) -> list[str]:
    """One line per site: its class counts in each split (``site-0  train 120/30  val 17/4  test 12/3``)."""
    return [
        f"{site}  " + "  ".join(f"{split} {'/'.join(map(str, counts))}" for split, counts in splits.items())
        for site, splits in sites
    ]
