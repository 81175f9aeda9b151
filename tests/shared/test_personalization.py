"""A site's personalized model: BatchNorm statistics re-estimated on its data, a fine-tuned head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medfed.shared.config import RunConfig
from medfed.shared.data.base import ImageSet
from medfed.shared.data.loading import load_dataset
from medfed.shared.personalization import choose_on_validation, head_of, personalization_steps, personalize
from medfed.shared.task import model_for
from medfed.shared.training import TrainSettings, evaluate

CPU = torch.device("cpu")
SETTINGS = TrainSettings(epochs=1, batch_size=16, learning_rate=0.1, optimizer="sgd", augment=False, seed=0)


def _site(brightness: np.ndarray, labels: np.ndarray) -> ImageSet:
    images = np.repeat(brightness.astype(np.float32)[:, None, None, None], 4, axis=2).repeat(4, axis=3)
    return ImageSet(images, labels.astype(np.int64), "classification", 2)


class _Tiny(nn.Module):
    """Mean intensity -> BatchNorm -> ReLU -> Linear(1 -> 2): a model whose BatchNorm statistics
    decide whether a site's images reach the head at all."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(1)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(x.flatten(1).mean(dim=1, keepdim=True))))


def _global_model(train: ImageSet) -> _Tiny:
    """BatchNorm statistics of the bright site only (as a federation dominated by it would keep)."""
    model = _Tiny()
    model.norm.momentum = None  # a cumulative average: one pass gives the batch's statistics exactly
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(train.images))
    return model.eval()


def test_local_batchnorm_statistics_recover_a_site_whose_images_the_global_statistics_silence() -> None:
    rng = np.random.default_rng(0)
    bright = rng.uniform(0.4, 0.6, 200)
    model = _global_model(_site(bright, bright > 0.5))
    dark_x = rng.uniform(0.05, 0.15, 200)  # a scanner that images darker: every value far below the global mean
    dark = _site(dark_x, dark_x > 0.1)
    before = evaluate(model, dark, device=CPU)
    personal = personalize(model, dark, mode="bn", epochs=0, settings=SETTINGS, device=CPU)
    after = evaluate(personal, dark, device=CPU)
    assert before["auc"] == pytest.approx(0.5)  # the global statistics send every dark image to 0
    assert after["auc"] > 0.9
    assert torch.equal(personal.head.weight, model.head.weight)  # only statistics changed
    assert model.norm.running_mean.item() == pytest.approx(float(bright.mean()), abs=1e-4)  # global model untouched


def test_a_fine_tuned_head_learns_a_site_whose_labels_run_the_other_way() -> None:
    rng = np.random.default_rng(1)
    bright = rng.uniform(0.4, 0.6, 200)
    model = _global_model(_site(bright, bright > 0.5))
    x = rng.uniform(0.4, 0.6, 200)
    site = _site(x, x < 0.5)  # here the darker images are the positives
    assert evaluate(model, site, device=CPU)["auc"] < 0.3
    settings = TrainSettings(epochs=1, batch_size=16, learning_rate=0.2, optimizer="sgd", augment=False, seed=0)
    personal = personalize(model, site, mode="head", epochs=30, settings=settings, device=CPU)
    assert evaluate(personal, site, device=CPU)["auc"] > 0.9
    assert torch.equal(personal.norm.running_mean, model.norm.running_mean)  # the body stayed as it was
    assert all(p.requires_grad for p in personal.parameters())  # nothing left frozen


@pytest.mark.parametrize(("mode", "weights_change", "stats_change"), [
    ("off", False, False), ("bn", False, True), ("head", True, False), ("bn+head", True, True),
])  # fmt: skip
def test_simplecnn_modes_change_what_they_say(mode: str, weights_change: bool, stats_change: bool) -> None:
    cfg = RunConfig(dataset="synthetic", model="simplecnn", image_size=16, synthetic_samples=96, store="off")
    data = load_dataset(cfg).train
    torch.manual_seed(0)
    model = model_for(cfg, data)
    personal = personalize(model, data, mode=mode, epochs=1, settings=SETTINGS, device=CPU)
    head = head_of(personal)
    assert head is personal.head
    before, after = model.state_dict(), personal.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    head_keys = [k for k in before if k.startswith("head.")]
    body = [k for k in before if k not in stats and k not in head_keys and not k.endswith("num_batches_tracked")]
    assert stats and head_keys and body
    assert any(not torch.equal(before[k], after[k]) for k in stats) == stats_change
    assert any(not torch.equal(before[k], after[k]) for k in head_keys) == weights_change
    assert all(torch.equal(before[k], after[k]) for k in body)  # convolutions never change


def test_an_unknown_mode_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'off', 'bn', 'head', 'bn\\+head'"):
        personalize(_Tiny(), _site(np.ones(4) * 0.5, np.array([0, 1, 0, 1])), mode="all", epochs=1,
                    settings=SETTINGS, device=CPU)


def test_a_site_keeps_the_personalized_model_only_where_its_validation_split_says_it_helps() -> None:
    rng = np.random.default_rng(2)
    bright = rng.uniform(0.4, 0.6, 200)
    bright_site = _site(bright, bright > 0.5)
    model = _global_model(bright_site)
    dark_x = rng.uniform(0.05, 0.15, 100)
    dark_train, dark_val = _site(dark_x[:60], dark_x[:60] > 0.1), _site(dark_x[60:], dark_x[60:] > 0.1)
    steps = personalization_steps(model, dark_train, mode="bn+head", epochs=0, settings=SETTINGS, device=CPU)
    assert [name for name, _ in steps] == ["off", "bn"]  # no head epochs: no head step
    name, kept = choose_on_validation(steps, dark_val, device=CPU)
    assert name == "bn" and kept is steps[1][1]
    # a site like the bright one: the re-estimated statistics are no better there, so it keeps the global model
    x = rng.uniform(0.4, 0.6, 100)
    steps = personalization_steps(model, _site(x[:60], x[:60] > 0.5), mode="bn", epochs=0, settings=SETTINGS,
                                  device=CPU)
    assert choose_on_validation(steps, _site(x[60:], x[60:] > 0.5), device=CPU)[0] == "off"


def _logits(p1: np.ndarray) -> torch.Tensor:
    """Binary logits whose class-1 probability is ``p1``."""
    p = torch.from_numpy(np.clip(p1, 1e-6, 1 - 1e-6))
    return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_the_auc_of_the_gain_confidence_is_the_metrics_auc(num_classes: int) -> None:
    from medfed.shared.metrics import classification_metrics
    from medfed.shared.personalization import auc_gain_confidence

    rng = np.random.default_rng(0)
    targets = torch.from_numpy(np.r_[np.arange(num_classes), rng.integers(0, num_classes, 37)])
    base, cand = (torch.from_numpy(rng.normal(size=(len(targets), num_classes))) for _ in range(2))
    cand[:4] = cand[:4].round()  # ties count one half
    sure, auc, base_auc = auc_gain_confidence(base, cand, targets, num_classes=num_classes)
    assert auc == pytest.approx(classification_metrics(cand, targets, num_classes=num_classes)["auc"], abs=1e-9)
    assert base_auc == pytest.approx(classification_metrics(base, targets, num_classes=num_classes)["auc"], abs=1e-9)
    assert 0.0 <= sure <= 1.0
    assert auc_gain_confidence(base, base, targets, num_classes=num_classes)[0] == 0.0  # no gain is never sure


def test_a_gain_a_small_validation_split_cannot_tell_from_noise_is_not_adopted() -> None:
    from medfed.shared.personalization import auc_gain_confidence

    y = np.array([0] * 14 + [1] * 6)  # a site's 20 validation images
    base = np.linspace(0.1, 0.9, 20)[np.argsort(np.argsort(y + np.random.default_rng(1).normal(0, 0.8, 20)))]
    better = base.copy()
    lo_pos = np.flatnonzero(y == 1)[np.argmin(base[y == 1])]  # one positive moves above one negative
    better[lo_pos] += 0.05
    t = torch.from_numpy(y)
    slight, auc_slight, base_auc = auc_gain_confidence(_logits(base), _logits(better), t, num_classes=2)
    assert auc_slight > base_auc and slight < 0.95  # higher on the split, not sure at all
    weak = np.random.default_rng(2).uniform(0.2, 0.8, 20)  # a global model that ranks about at chance
    perfect = y * 0.5 + 0.25
    sure, auc, weak_auc = auc_gain_confidence(_logits(weak), _logits(perfect), t, num_classes=2)
    assert auc == 1.0 and weak_auc < 0.75 and sure >= 0.95


class _Lookup(nn.Module):
    """Logits looked up by the image's (integer) intensity: a model with given validation scores."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(logits.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.flatten(1)[:, 0].round().long()]


def test_choose_on_validation_keeps_the_global_model_unless_the_gain_is_sure() -> None:
    rng = np.random.default_rng(3)
    y = np.array([0] * 14 + [1] * 6)
    val = _site(np.arange(20, dtype=np.float32), y)  # image i has intensity i: the lookup's row
    base = rng.uniform(0.2, 0.8, 20)
    noisy = np.clip(base + rng.normal(0, 0.05, 20), 0, 1)  # about as good, by chance a little better or worse
    perfect = y * 0.5 + 0.25
    models = [("off", _Lookup(_logits(base))), ("head", _Lookup(_logits(noisy)))]
    assert choose_on_validation(models, val, device=CPU)[0] == "off"
    models.append(("bn+head", _Lookup(_logits(perfect))))
    assert choose_on_validation(models, val, device=CPU)[0] == "bn+head"
    # the lowest confidence adopts any higher AUC (the rule before: strictly better on the split)
    ranked = np.r_[np.linspace(0.05, 0.65, 14), [0.30, 0.5, 0.6, 0.7, 0.8, 0.9]]  # negatives, then positives
    nudged = ranked.copy()
    nudged[14] = 0.33  # the lowest positive passes one negative (0.327): one pair of 84
    pair = [("off", _Lookup(_logits(ranked))), ("head", _Lookup(_logits(nudged)))]
    assert choose_on_validation(pair, val, device=CPU)[0] == "off"
    assert choose_on_validation(pair, val, device=CPU, confidence=0.0)[0] == "head"
    assert choose_on_validation(pair[::-1], val, device=CPU, confidence=0.0)[0] == "head"  # the global: no lower AUC


def test_a_large_validation_split_is_bootstrapped_on_a_subsample_and_still_sees_a_real_gain() -> None:
    from medfed.shared.metrics import classification_metrics
    from medfed.shared.personalization import MAX_BOOTSTRAP_SAMPLES, auc_gain_confidence

    rng = np.random.default_rng(4)
    y = (rng.random(3 * MAX_BOOTSTRAP_SAMPLES) < 0.2).astype(np.int64)
    latent = y + rng.normal(0, 0.8, len(y))
    base, better = latent + rng.normal(0, 0.8, len(y)), latent + rng.normal(0, 0.4, len(y))
    t = torch.from_numpy(y)
    sure, auc, base_auc = auc_gain_confidence(_logits(1 / (1 + np.exp(-base))), _logits(1 / (1 + np.exp(-better))),
                                              t, num_classes=2)
    assert auc == pytest.approx(classification_metrics(_logits(1 / (1 + np.exp(-better))), t, num_classes=2)["auc"])
    assert auc - base_auc > 0.02 and sure >= 0.95


@pytest.mark.parametrize(
    ("labels", "num_classes", "judged"),
    [
        ([0] * 14 + [1] * 6, 2, [1]),
        ([0] * 17 + [1] * 3, 2, []),  # 3 minority images: no judgement
        ([0] * 20, 2, []),
        ([0] * 25 + [1] * 3 + [2] * 23 + [3] * 5 + [4] * 1, 5, [0, 2, 3]),
        ([1, 2, 3, 3, 3, 3, 3, 4, 4], 5, []),  # a RetinaMNIST site's 9 validation images (seed 1, site 0)
    ],
)
def test_judged_classes_need_five_images_on_each_side(labels: list[int], num_classes: int, judged: list[int]) -> None:
    from medfed.shared.personalization import judged_classes

    assert judged_classes(np.array(labels), num_classes=num_classes) == judged


def test_a_split_too_small_to_judge_keeps_the_global_model_even_against_a_perfect_one() -> None:
    y = np.array([0] * 17 + [1] * 3)
    val = _site(np.arange(20, dtype=np.float32), y)
    weak, perfect = np.random.default_rng(5).uniform(0.2, 0.8, 20), y * 0.5 + 0.25
    models = [("off", _Lookup(_logits(weak))), ("bn+head", _Lookup(_logits(perfect)))]
    assert choose_on_validation(models, val, device=CPU)[0] == "off"
    one_class = _site(np.arange(20, dtype=np.float32), np.zeros(20, dtype=np.int64))
    assert choose_on_validation(models, one_class, device=CPU)[0] == "off"  # a lower loss there says nothing
    # five of each side: judged, and a perfect ranking against a weak one is sure
    y5 = np.array([0] * 15 + [1] * 5)
    models5 = [("off", _Lookup(_logits(weak))), ("bn+head", _Lookup(_logits(y5 * 0.5 + 0.25)))]
    assert choose_on_validation(models5, _site(np.arange(20, dtype=np.float32), y5), device=CPU)[0] == "bn+head"
