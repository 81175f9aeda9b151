"""``python -m medfed.simulations.bench.dp --set key=value``: run-config keys for the auc part's runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.shared.config import ConfigError
from medfed.simulations.bench.dp import auc_base_config, build_parser, main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"trainable": "all", "init_weights": "", "model": "simplecnn", "num_server_rounds": 10,
              "dp_max_grad_norm": 5.0}),  # the run-config's DP default unless --max-grad-norm
        (["--max-grad-norm", "1"], {"dp_max_grad_norm": 1.0}),
        (["--set", "trainable=head"], {"trainable": "head", "model": "simplecnn"}),
        (
            ["--model", "resnet18", "--set", "trainable=norm+head", "--set", "init-weights=w.pt"],
            {"trainable": "norm+head", "init_weights": "w.pt", "model": "resnet18"},
        ),
        # --set wins over the flag it overlaps; a later --set wins over an earlier one
        (["--rounds", "3", "--set", "num-server-rounds=2", "--set", "num-server-rounds=4"], {"num_server_rounds": 4}),
    ],
)
def test_set_reaches_the_run_config(argv: list[str], expected: dict[str, object], tmp_path: Path) -> None:
    args = build_parser().parse_args(["--part", "auc", *argv])
    cfg = auc_base_config(args, dataset=tmp_path / "breastmnist.npz")
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.dataset == str(tmp_path / "breastmnist.npz")
    assert cfg.norm == "group" and cfg.dp_delta == 1e-5  # the bench's own settings stay


@pytest.mark.parametrize(
    ("item", "named"),
    [("trainable=everything", "trainable"), ("no-such-key=1", "no-such-key"), ("trainable", "--set")],
)
def test_bad_set_is_rejected_naming_it(item: str, named: str, tmp_path: Path) -> None:
    args = build_parser().parse_args(["--part", "auc", "--set", item])
    with pytest.raises(ConfigError, match=named):
        auc_base_config(args, dataset=tmp_path / "breastmnist.npz")


def test_bad_set_exits_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--part", "auc", "--data-dir", str(tmp_path), "--set", "trainable=everything"])
    assert exit_info.value.code == 2
    assert "trainable" in capsys.readouterr().err


def test_missing_data_dir_skips_the_auc_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--part", "auc", "--data-dir", str(tmp_path)])
    assert "breastmnist.npz is not in" in capsys.readouterr().out
