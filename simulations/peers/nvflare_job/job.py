"""Build and run the FLARE job of the common task; print its figures on one line.

``python -m medfed.simulations.peers.nvflare_job.job --data breastmnist.npz --sites 4 --rounds 5
--workspace /tmp/ws`` (inside the FLARE environment) prints ``MEDFED-PEER-RESULT {json}`` with
the wall time, seconds per round (between site-1's receipts of successive global models) and
the final global model's test AUC and accuracy, computed with the quickstart peer's ``test``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe.sim_env import SimEnv

from medfed.simulations.peers.flower_quickstart.task import Settings, load_test, test
from medfed.simulations.peers.nvflare_job.net import PeerNet

RESULT_PREFIX = "MEDFED-PEER-RESULT "


def main() -> None:
    """Run the job (see the module docstring)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workspace", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.workspace.mkdir(parents=True, exist_ok=True)
    stamps = args.workspace / "round-stamps.jsonl"
    stamps.unlink(missing_ok=True)
    settings = Settings(data=args.data, num_sites=args.sites, rounds=args.rounds, local_epochs=args.local_epochs,
                        seed=args.seed)
    testloader = load_test(settings)
    image_size = int(next(iter(testloader))[0].shape[-1])
    net_args = {"model": settings.model, "in_channels": 1, "num_classes": 2, "image_size": image_size, "seed": args.seed}
    recipe = FedAvgRecipe(
        name="medfed_peer",
        model={"class_path": "simulations.peers.nvflare_job.net.PeerNet", "args": net_args},
        min_clients=args.sites,
        num_rounds=args.rounds,
        train_script=str(Path(__file__).with_name("client.py")),
        train_args=(
            f"--data {args.data} --sites {args.sites} --local-epochs {args.local_epochs} --seed {args.seed} "
            f"--image-size {image_size} --stamps {stamps}"
        ),
    )
    start = time.time()
    recipe.execute(SimEnv(num_clients=args.sites, num_threads=args.sites, workspace_root=str(args.workspace / "sim")))
    wall = time.time() - start
    models = sorted((args.workspace / "sim").rglob("FL_global_model.pt"))
    if not models:
        raise SystemExit(f"no FL_global_model.pt under {args.workspace / 'sim'}: the job saved no global model.")
    saved = torch.load(models[-1], map_location="cpu", weights_only=False)
    state = saved.get("model", saved) if isinstance(saved, dict) else saved
    net = PeerNet(**net_args)
    net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    _, metrics = test(net, testloader)
    times = [json.loads(line)["t"] for line in stamps.read_text().splitlines()] if stamps.exists() else []
    rounds = [b - a for a, b in zip(times, times[1:], strict=False)]
    print(RESULT_PREFIX + json.dumps({"wall_seconds": wall, "round_seconds": rounds, **metrics}), flush=True)


if __name__ == "__main__":
    main()
