"""Off a terminal (a log file, a pipe, nohup) a run writes one plain line per round as it happens,
and the summary on lines of its own; on a terminal the live table stays."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from medfed.cli import app
from medfed.server.run_dir import RoundRecord
from medfed.simulations.progress import RunProgress, summary_lines

LINE = re.compile(
    r"^round (\d+)/(\d+)  auc \d\.\d{4}  accuracy \d\.\d{4}  balanced-accuracy \d\.\d{4}  loss \d+\.\d{4}  "
    r"sites (\d+)/(\d+)  \d+\.\d s( \(single class\))?$"
)


class FlushLog(io.StringIO):
    """A text file that notes what had been written at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def _record(n: int, *, failures: int = 0, rejected: int = 0) -> RoundRecord:
    return RoundRecord(round=n, seconds=12.4, global_metrics={"auc": 0.912, "accuracy": 0.85, "loss": 0.31},
                       num_fit_results=3 - failures, num_fit_failures=failures,
                       rejected=[{"site": "site-1"}] * rejected)


def test_each_round_is_one_line_flushed_as_it_closes() -> None:
    out = FlushLog()
    view = RunProgress(title="federated: fedavg, 3 sites", rounds=10, console=Console(file=out))
    assert not view.live  # a file is not a terminal
    hooks = view.hooks()
    with view:
        assert out.flushed[-1] == "federated: fedavg, 3 sites\n"
        hooks.on_round(RoundRecord(round=0, seconds=0.0, global_metrics={"auc": 0.5, "accuracy": 0.5, "loss": 0.69}))
        assert out.flushed[-1].endswith("round 0/10  auc 0.5000  accuracy 0.5000  loss 0.6900  (initial model)\n")
        hooks.on_round(_record(3))
        assert out.flushed[-1].endswith("round 3/10  auc 0.9120  accuracy 0.8500  loss 0.3100  sites 3/3  12.4 s\n")
        hooks.on_round(_record(4, failures=1, rejected=1))
        assert out.flushed[-1].endswith("sites 2/3  (1 rejected)  12.4 s\n")
    assert out.getvalue().count("\n") == 4 and "━" not in out.getvalue()


def test_a_terminal_keeps_the_live_table() -> None:
    out = io.StringIO()
    view = RunProgress(title="t", rounds=2, console=Console(file=out, force_terminal=True, width=120))
    assert view.live
    with view:
        view.hooks().on_round(_record(1))
    assert "round 1/2" not in out.getvalue() and "global auc" in out.getvalue()


def test_a_run_written_to_a_pipe_has_plain_rounds_and_summary_lines(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [  # CliRunner's output is not a terminal
        "simulate", "--centralized", "--model", "simplecnn", "--image-size", "16", "--batch-size", "16",
        "--rounds", "2", "--local-epochs", "1", "--set", "synthetic-samples=96", "--run-dir", str(tmp_path / "runs"),
    ])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "pooled baseline: simplecnn on synthetic (generated demo data)"
    assert lines[1].startswith("round 0/2  auc ") and lines[1].endswith("(initial model)")
    rounds = [LINE.match(line) for line in lines[2:4]]
    assert all(rounds), lines
    assert [(m.group(1), m.group(3), m.group(4)) for m in rounds] == [("1", "1", "1"), ("2", "1", "1")]
    summary = lines.index("summary")  # the title on a line of its own
    assert lines[summary + 1].startswith("  final accuracy: ")
    assert any(line.startswith("  run directory: ") for line in lines[summary:])
    assert "━" not in result.output and "┃" not in result.output


def test_a_global_model_that_predicts_one_class_is_flagged_in_the_line_and_the_table() -> None:
    out = io.StringIO()
    view = RunProgress(title="t", rounds=3, console=Console(file=out, width=200))
    constant = RoundRecord(round=2, seconds=1.0, num_fit_results=2,
                           global_metrics={"auc": 0.5, "accuracy": 0.625, "majority-rate": 0.625, "single-class": 1.0})
    fine = RoundRecord(round=3, seconds=1.0, num_fit_results=2,
                       global_metrics={"auc": 0.9, "accuracy": 0.8, "single-class": 0.0})
    sites_constant = RoundRecord(round=1, seconds=1.0, num_fit_results=2,
                                 eval_metrics={"auc": 0.5, "predicted-classes": 1.0, "predicted-classes-max": 1.0})
    assert view.line(constant).endswith("(single class)")
    assert not view.line(fine).endswith("(single class)")
    assert view.line(sites_constant).endswith("(single class)")  # deployment: the sites' validation says so
    view.records = [sites_constant, constant, fine]
    Console(file=out, width=200).print(view.table())
    rows = [line for line in out.getvalue().splitlines() if line.strip().startswith("│")]
    assert ["single class" in row for row in rows] == [True, True, False]


def test_the_summary_shows_the_selected_rounds_test_figures_beside_the_final_ones() -> None:
    summary = {
        "final_metrics": {"auc": 0.84, "accuracy": 0.625, "num_examples": 156.0, "single-class": 1.0},
        "best_round": 3,
        "best_metrics": {"auc": 0.91, "accuracy": 0.80, "val-auc": 0.95},
        "best_selected_by": "validation auc",
        "single_class": {"final": True, "selected": False},
    }
    lines = dict(summary_lines(summary))
    assert lines["final auc"] == "0.8400  (selected round 3: 0.9100)"
    assert lines["final accuracy"] == "0.6250  (selected round 3: 0.8000)"
    assert lines["best round"] == "3 (selected by validation auc)"
    assert lines["warning"].startswith("the final global model predicts a single class")
    assert "final num_examples" not in lines and "final single-class" not in lines


def test_the_site_lines_state_the_local_steps_a_round_and_the_spread_that_gives_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medfed.shared.config import RunConfig
    from medfed.simulations import cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, force_terminal=False, width=200))
    # 200 synthetic images less the validation, test and local test shares, over 4 sites: about 32 a site
    cfg = RunConfig(synthetic_samples=200, num_sites=4, num_server_rounds=20, local_epochs=1, batch_size=32)
    cli._print_site_classes(cfg)
    text = out.getvalue()
    assert text.count("site-") == 4, text
    steps = re.search(r"about (\d+) training images a site, (\d+) optimizer step\(s\) a round", text)
    assert steps is not None, text
    per_site, per_round = int(steps.group(1)), int(steps.group(2))
    assert per_round == -(-per_site // 32) < 16
    assert "the same 20 epochs as --rounds 5 --local-epochs 4" in text  # capped: at least 5 rounds
