"""Probe of DP-SGD's clipping on an imbalanced set: pooled training in seconds, per-class gradient norms.

``python -m medfed.simulations.bench.dp_clipping --epsilon 3 --max-grad-norm 1`` trains simplecnn
(GroupNorm) on all of BreastMNIST's training split as one site with the sites' DP-SGD path
(:func:`medfed.shared.privacy.make_private_training`, :func:`medfed.shared.training.train_epochs`;
seeded noise, not the secure generator) and prints, before and after training, each class's mean
per-example gradient norm, the share of its examples that are clipped and their mean clip factor,
and the mean class-1 probability on the training images; then the test AUC, the accuracy at the
argmax, the share of test images predicted class 1 and the training loss. ``--noise-multiplier``
overrides the epsilon's noise (e.g. ``1e-6``: clipping without noise; with ``--max-grad-norm 1000``
neither). This is the measurement behind :data:`medfed.shared.config.DP_MAX_GRAD_NORM`.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from pathlib import Path

import torch
from opacus import GradSampleModule
from torch import nn

from medfed.shared.data.base import ImageSet
from medfed.shared.data.npz import load_npz
from medfed.shared.metrics import classification_metrics
from medfed.shared.models import build_model
from medfed.shared.privacy import make_private_training, noise_for_target, poisson_schedule
from medfed.shared.trainable import apply_trainable
from medfed.shared.training import TrainSettings, make_optimizer, make_train_loader, predict, train_epochs

__all__ = ["class_gradient_norms", "main"]

DEFAULT_DATA = Path(os.environ.get("MEDFED_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist"))


def class_gradient_norms(model: nn.Module, data: ImageSet, *, max_grad_norm: float) -> dict[str, float]:
    """Per class ``c``: mean per-example gradient norm ``norm-c`` (trainable parameters, summed
    loss), share of examples above ``max_grad_norm`` ``clipped-c``, mean clip factor
    ``factor-c``; and ``mean-p1``, the mean class-1 probability over ``data`` ``(N, 1, H, W)``."""
    wrapped = GradSampleModule(copy.deepcopy(model).train(), loss_reduction="sum")
    x = torch.as_tensor(data.images)
    y = torch.as_tensor(data.targets).long().flatten()
    logits = wrapped(x)
    nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    squares = sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in wrapped.parameters()
                  if p.requires_grad and p.grad_sample is not None)
    norms = squares.sqrt()
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    out = {"mean-p1": float(torch.softmax(logits.detach(), 1)[:, 1].mean())}
    for c in range(int(y.max()) + 1):
        out[f"norm-{c}"] = float(norms[y == c].mean())
        out[f"clipped-{c}"] = float((norms[y == c] > max_grad_norm).float().mean())
        out[f"factor-{c}"] = float(factor[y == c].mean())
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, train once, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m medfed.simulations.bench.dp_clipping", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA / "breastmnist.npz"))
    parser.add_argument("--epsilon", type=float, default=3.0, help="target epsilon over the run (delta 1e-5)")
    parser.add_argument("--noise-multiplier", type=float, default=0.0, help="> 0: use this instead of --epsilon's")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--trainable", default="all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    splits = load_npz(args.data)
    model = build_model("simplecnn", spatial_dims=2, in_channels=splits.train.in_channels, out_channels=2,
                        norm="group", image_size=28)
    apply_trainable(model, mode=args.trainable, model_name="simplecnn")
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                             optimizer=args.optimizer, augment=False, seed=args.seed)
    loader = make_train_loader(splits.train, settings)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], name=args.optimizer,
                               learning_rate=args.lr, weight_decay=0.0)
    schedule = poisson_schedule(loader)
    sigma = args.noise_multiplier or noise_for_target(
        target_epsilon=args.epsilon, delta=1e-5, sample_rate=schedule.sample_rate,
        steps=schedule.steps_per_epoch * args.epochs)

    def show(label: str, figures: dict[str, float]) -> None:
        cells = ", ".join(f"class {c}: norm {figures[f'norm-{c}']:.2f}, clipped {figures[f'clipped-{c}']:.2f}, "
                          f"factor {figures[f'factor-{c}']:.3f}" for c in (0, 1))
        print(f"{label}: {cells}; mean p1 {figures['mean-p1']:.3f}")

    print(f"simplecnn GN, {len(splits.train)} images, {args.optimizer} {args.lr}, batch {args.batch_size}, "
          f"{args.epochs} epochs, trainable {args.trainable}, max grad norm {args.max_grad_norm:g}, noise multiplier "
          f"{sigma:.3g}, seed {args.seed}")
    show("start", class_gradient_norms(model, splits.train, max_grad_norm=args.max_grad_norm))
    start = time.perf_counter()
    private = make_private_training(model, optimizer, loader, noise_multiplier=sigma, max_grad_norm=args.max_grad_norm,
                                    generator=torch.Generator().manual_seed(args.seed))
    result = train_epochs(private.model, private.loader, private.optimizer, task="classification",
                          epochs=args.epochs, device=torch.device("cpu"))
    model = private.close()
    show("end", class_gradient_norms(model, splits.train, max_grad_norm=args.max_grad_norm))
    logits, targets, _ = predict(model, splits.test, device=torch.device("cpu"))
    m = classification_metrics(logits, targets, num_classes=2)
    print(f"test AUC {m['auc']:.3f}, accuracy {m['accuracy']:.3f}, predicted class 1 "
          f"{float((logits.argmax(1) == 1).float().mean()):.3f}; training loss {result.loss:.3f}; "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
