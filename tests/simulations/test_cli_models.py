"""``medfed models`` lists every registered model with its task, description and notes."""

from __future__ import annotations

from typer.testing import CliRunner

from medfed.cli import app
from medfed.shared.models import MODELS


def test_models_lists_every_model_with_task_and_notes() -> None:
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("notes" in line for line in lines)
    for name, spec in MODELS.items():
        row = next(line for line in lines if line.strip("│┃ ").startswith(name + " "))
        assert spec.task in row
    for name in ("vit", "unetr", "swinunetr"):
        notes = MODELS[name].notes
        assert "params" in notes and "img/s" in notes and "DP-SGD: yes" in notes
        # The table wraps long cells: the notes' first words open the row.
        row = next(line for line in lines if line.strip("│┃ ").startswith(name + " "))
        assert notes.split()[0] in row
