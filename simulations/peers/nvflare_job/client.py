"""FLARE's training script for one site (Client API): receive the global model, train, send it back.

The same data partition, loop and optimiser as the Flower quickstart peer
(:mod:`medfed.simulations.peers.flower_quickstart.task`). Site ``site-K`` trains partition ``K - 1``;
site-1 appends the time it receives each round's model to ``--stamps`` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import time

import nvflare.client as flare
import torch

from medfed.simulations.peers.flower_quickstart.task import Settings, load_partition, train
from medfed.simulations.peers.nvflare_job.net import PeerNet


def main() -> None:
    """Run the site until the server stops."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--sites", type=int, required=True)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--model", default="simplecnn")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stamps", required=True)
    args = parser.parse_args()
    settings = Settings(data=args.data, num_sites=args.sites, local_epochs=args.local_epochs,
                        batch_size=args.batch_size, learning_rate=args.lr, model=args.model, seed=args.seed)
    flare.init()
    partition = int(flare.get_site_name().rsplit("-", 1)[-1]) - 1
    net = PeerNet(model=args.model, num_classes=args.num_classes, image_size=args.image_size, seed=args.seed)
    trainloader, _ = load_partition(settings, partition)
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        if partition == 0:
            with open(args.stamps, "a") as f:
                f.write(json.dumps({"round": received.current_round, "t": time.time()}) + "\n")
        net.load_state_dict({k: torch.as_tensor(v) for k, v in received.params.items()})
        loss = train(net, trainloader, epochs=args.local_epochs, learning_rate=args.lr)
        flare.send(
            flare.FLModel(
                params={k: v.detach().cpu() for k, v in net.state_dict().items()},
                metrics={"train_loss": loss},
                meta={"NUM_STEPS_CURRENT_ROUND": len(trainloader) * args.local_epochs},
            )
        )


if __name__ == "__main__":
    main()
