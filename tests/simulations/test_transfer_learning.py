"""``init-weights`` + ``trainable`` end to end: the pooled baseline and an in-process federation
under DP-SGD start from the weights file and update only the trainable parameters (issue 16)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.shared.config import RunConfig
from medfed.shared.data.loading import load_dataset
from medfed.shared.task import model_for
from medfed.shared.weights import weight_names

SIDE = 12


def _cfg(tmp_path: Path, **changes: object) -> RunConfig:
    return RunConfig(dataset="synthetic", synthetic_samples=96, image_size=SIDE, model="simplecnn", norm="group",
                     num_sites=2, num_server_rounds=1, local_epochs=1, batch_size=16, run_dir=str(tmp_path / "runs"),
                     store="off", cross_site=False, personalize="off", augment=False, **changes)  # type: ignore[arg-type]


def _pretrained(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A weights file for the run's model (another seed than the run's own initialisation)."""
    cfg = _cfg(tmp_path)
    torch.manual_seed(123)
    state = {k: v.clone() for k, v in model_for(cfg, load_dataset(cfg).train).state_dict().items()}
    path = tmp_path / "pretrained.pt"
    torch.save(state, path)
    return path, state


def _check_only_head_moved(final: dict[str, torch.Tensor], start: dict[str, torch.Tensor], *, exact: bool) -> None:
    """The head trained; everything else is the weights file's (bit for bit, or, after the server's
    weighted average of the sites' identical values, to float32 rounding)."""
    for name, value in start.items():
        if name.startswith("head."):
            assert (final[name] - value).abs().max() > 1e-3, f"{name} should have trained"
        elif exact:
            assert torch.equal(final[name], value), f"{name} is frozen (trainable = head) but changed"
        else:
            torch.testing.assert_close(final[name], value, rtol=1e-6, atol=1e-7, msg=f"{name} is frozen but changed")


def test_pooled_baseline_starts_from_init_weights_and_trains_only_the_head(tmp_path: Path) -> None:
    from medfed.simulations.pooled import run_pooled

    path, start = _pretrained(tmp_path)
    cfg = _cfg(tmp_path, init_weights=str(path), trainable="head")
    result = run_pooled(cfg)
    final = torch.load(result.run_dir / "checkpoints" / "final.pt", weights_only=True)["state_dict"]
    _check_only_head_moved(final, start, exact=True)
    recorded = json.loads((result.run_dir / "init_weights.json").read_text())
    assert recorded["path"] == str(path.resolve()) and recorded["kind"] == "state dict"
    assert recorded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and recorded["loaded"] == len(start)
    # the model card names the file (not its folder), its hash and the mode
    from medfed.server.model_card import gather_model_card
    from medfed.server.report import render_html

    card = gather_model_card(result.run_dir, calibrate=False)
    assert card.init_weights["file"] == "pretrained.pt" and card.init_weights["sha256"] == recorded["sha256"]
    assert dict(card.recipe)["init-weights"] == "pretrained.pt" and dict(card.recipe)["trainable"] == "head"
    assert f"sha256:{recorded['sha256']}" in render_html(card) and str(tmp_path) not in render_html(card)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize(
    "recipe",
    [{"dp": True, "dp_noise_multiplier": 1.0, "dp_secure_noise": False}, {"strategy": "fedprox", "proximal_mu": 0.1}],
    ids=["dp-sgd", "fedprox"],
)
def test_a_federation_starts_from_init_weights_and_trains_only_the_head(recipe: dict, tmp_path: Path) -> None:
    from medfed.simulations.bench.quality import federate_in_process

    path, start = _pretrained(tmp_path)
    cfg = _cfg(tmp_path, init_weights=str(path), trainable="head", **recipe)
    curve = federate_in_process(cfg)
    names = weight_names(model_for(cfg, load_dataset(cfg).train))
    final = {n: torch.as_tensor(np.asarray(w)) for n, w in zip(names, curve.final_weights, strict=True)}
    _check_only_head_moved(final, start, exact=False)
