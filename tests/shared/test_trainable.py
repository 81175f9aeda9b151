"""``trainable`` fine-tuning modes: which parameters train, with a real Opacus DP-SGD step showing
that frozen parameters get no per-sample gradients and stay bit-identical (issue 16)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.shared.config import TRAINABLE_MODES, ConfigError
from medfed.shared.models import MODELS, build_model
from medfed.shared.privacy import make_private_training
from medfed.shared.trainable import apply_trainable, check_trainable, trainable_parameters
from medfed.shared.training import train_epochs

SIDE = 12
BATCH = 6

# model -> mode -> the parameter names that must train (prefix match), every other one frozen
EXPECTED: dict[str, dict[str, tuple[str, ...]]] = {
    "simplecnn": {
        "head": ("head.",),
        "last-block+head": ("head.", "features.8.", "features.9."),
        "norm+head": ("head.", "features.1.", "features.5.", "features.9."),
    },
    "resnet18": {
        "head": ("fc.",),
        "last-block+head": ("fc.", "layer4."),
    },
}


def _model(name: str, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, spatial_dims=2, in_channels=1, out_channels=3, norm="group", image_size=SIDE)


def _expected(name: str, mode: str, model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(EXPECTED[name][mode])}


CASES = [("simplecnn", mode) for mode in TRAINABLE_MODES] + [("resnet18", "head"), ("resnet18", "last-block+head")]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize(("name", "mode"), CASES)
def test_a_real_dp_sgd_step_moves_only_the_trainable_parameters(name: str, mode: str) -> None:
    model = _model(name)
    report = apply_trainable(model, mode=mode, model_name=name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "all":
        assert trainable == {n for n, _ in model.named_parameters()}
    else:
        assert trainable == _expected(name, mode, model)
    assert report.tensors == tuple(n for n, _ in model.named_parameters() if n in trainable)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = torch.randn(BATCH, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    targets = torch.arange(BATCH) % 3
    loader = DataLoader(TensorDataset(images, targets), batch_size=BATCH)  # sample rate 1: every image
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.5)
    private = make_private_training(
        model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0, generator=torch.Generator().manual_seed(2),
        grad_sample_mode="hooks",  # Opacus's hooks and grad_sample (bookkeeping: tests/shared/test_dp_bookkeeping.py)
    )
    # the accounting does not depend on the mode: same sample rate, steps and noise
    assert (private.sample_rate, private.steps_per_epoch, private.noise_multiplier) == (1.0, 1, 1.0)
    assert {id(p) for p in private.optimizer.params} == {id(p) for n, p in model.named_parameters() if n in trainable}
    # Opacus hooks (a forward and a backward hook each) only the modules with trainable parameters
    hooked = {m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    assert len(private.model.autograd_grad_sample_hooks) == 2 * len(hooked)
    batch_images, batch_targets = next(iter(private.loader))
    nn.CrossEntropyLoss()(private.model(batch_images), batch_targets).backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad_sample.shape == (len(batch_images), *p.shape), n
        else:
            assert getattr(p, "grad_sample", None) is None and p.grad is None, n
    private.optimizer.step()
    assert private.steps_taken == 1
    private.close()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p.detach(), before[n]), f"{n} should have moved"
        else:
            assert torch.equal(p.detach(), before[n]), f"{n} is frozen but changed"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost", "functorch", "bookkeeping"])
def test_every_dp_mode_trains_only_the_trainable_parameters(grad_sample_mode: str) -> None:
    model = _model("simplecnn")
    apply_trainable(model, mode="last-block+head", model_name="simplecnn")
    trainable = _expected("simplecnn", "last-block+head", model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(16, 1, SIDE, SIDE, generator=g), torch.arange(16) % 3)
    private = make_private_training(
        model, torch.optim.SGD(trainable_parameters(model), lr=0.5), DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, generator=torch.Generator().manual_seed(4),
        grad_sample_mode=grad_sample_mode, criterion=nn.CrossEntropyLoss(),
    )
    train_epochs(private.model, private.loader, private.optimizer, task="classification", epochs=1,
                 device=torch.device("cpu"), criterion=private.criterion)
    private.close()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == trainable


def test_every_defined_model_selects_existing_modules() -> None:
    for name in ("densenet121", "resnet34", "vit"):
        spec = MODELS[name]
        model = _model(name) if name != "densenet121" else build_model(
            name, spatial_dims=2, in_channels=1, out_channels=3, norm="group", image_size=SIDE
        )
        names = [n for n, _ in model.named_parameters()]
        for prefixes in (spec.head, spec.last_block):
            for prefix in prefixes:
                assert any(n.startswith(prefix + ".") for n in names), (name, prefix)
        head = apply_trainable(model, mode="head", model_name=name)
        assert head.tensors and all(n.startswith(spec.head[0] + ".") for n in head.tensors)


def test_norm_head_trains_every_norm_layer_and_the_head_of_a_vit() -> None:
    model = _model("vit")
    frozen_by_builder = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert apply_trainable(_model("vit"), mode="all", model_name="vit").tensors == tuple(
        n for n, _ in model.named_parameters() if n not in frozen_by_builder
    )  # "all" never unfreezes what the builder froze
    report = apply_trainable(model, mode="norm+head", model_name="vit")
    assert report.tensors and all(".norm" in n or n.startswith("head.") for n in report.tensors)
    assert "vit.norm.weight" in report.tensors and "head.weight" in report.tensors


@pytest.mark.parametrize("mode", ["head", "last-block+head", "norm+head"])
def test_a_model_without_a_definition_is_refused_naming_the_model_and_the_key(mode: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_trainable(mode=mode, model_name="unet")
    message = str(err.value)
    for fragment in (f"trainable = {mode!r}", "model = 'unet'", "trainable = 'all'", "resnet18"):
        assert fragment in message, message
    check_trainable(mode="all", model_name="unet")  # every model trains whole


def test_an_unknown_mode_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"trainable = 'backbone' is invalid.*'all', 'head', 'last-block\+head'"):
        check_trainable(mode="backbone", model_name="resnet18")
