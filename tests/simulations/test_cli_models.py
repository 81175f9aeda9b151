"""``medfed models`` lists every registered model with its task, description and notes."""

from __future__ import annotations

from typer.testing import CliRunner

from medfed.cli import app
from medfed.shared.models import MODELS


def test_models_lists_every_model_with_task_and_notes() -> None:
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("notes" in line for line in lines)
    for name in ("vit", "unetr", "swinunetr"):
        spec = MODELS[name]
        row = next(line for line in lines if line.strip("│┃ ").startswith(name + " "))
        assert spec.task in row
        assert spec.notes and spec.notes in row
        assert "params" in spec.notes and "img/s" in spec.notes and "DP-SGD" in spec.notes
