"""``medfed run --dry-run`` shows what ``init-weights`` loads into the deployment-shaped model and
what ``trainable`` trains (issue 16)."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from medfed.cli import app
from medfed.shared.models import build_model


def test_run_dry_run_reads_the_weights_file_for_the_deployment_shape(tmp_path: Path) -> None:
    from medfed.server.provision import provision

    fed = tmp_path / "fed"
    provision(fed, sites=["a", "b"], superlink_address="localhost:9092", hosts=[], name="t", force=False)
    torch.manual_seed(0)
    weights = tmp_path / "pretrained.pt"
    torch.save(build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=4, norm="group").state_dict(), weights)
    args = ["run", "-f", str(fed), "--set", "model=simplecnn", "--set", "norm=group", "--set", "image-size=16",
            "--set", f"init-weights={weights}", "--set", "trainable=norm+head", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"# init-weights: {weights} (state dict" in result.output
    assert "head.weight [4, 64] -> [2, 64]" in result.output  # num-classes = 2 (the deployment default)
    assert "# trainable = norm+head: " in result.output
    assert not (fed / "runs").exists()
    missing = CliRunner().invoke(app, [*args[:-3], "--set", "init-weights=nope.pt", "--dry-run"])
    assert missing.exit_code == 2 and "init-weights = 'nope.pt': no such file" in " ".join(missing.output.split())
