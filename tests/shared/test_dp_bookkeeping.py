"""Book-keeping DP-SGD (``dp-grad-sample-mode = "bookkeeping"``) against Opacus's hooks mode."""

from __future__ import annotations

import logging

import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.shared.dp_bookkeeping import BookkeepingModule, unsupported_layers
from medfed.shared.models import build_model
from medfed.shared.privacy import make_private_training
from medfed.shared.trainable import apply_trainable, trainable_parameters
from medfed.shared.training import train_epochs

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


class Tiny3d(nn.Module):
    """Every fast path: strided / dilated / padded Conv3d with bias, GroupNorm, InstanceNorm,
    a Conv1d, LayerNorm and Linear on a sequence, and a plain Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv3d(4, 6, 3, padding=2, dilation=2, bias=False)
        self.inorm = nn.InstanceNorm3d(6, affine=True)
        self.conv1d = nn.Conv1d(6, 5, 3, padding=1)
        self.ln = nn.LayerNorm(5)
        self.seq = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn(self.conv1(x)))
        x = torch.relu(self.inorm(self.conv2(x)))  # (B, 6, 3, 3, 3)
        x = torch.relu(self.conv1d(x.flatten(2)))  # (B, 5, 27)
        x = torch.relu(self.seq(self.ln(x.transpose(1, 2))))  # (B, 27, 7)
        return self.head(x.mean(dim=1))


class Scaled(nn.Module):
    """A layer with a parameter of its own that no grad sampler knows."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "tiny3d":
        return Tiny3d(), (2, 5, 5, 5)
    if name == "simplecnn":
        return build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=3, norm="group"), (1, 12, 12)
    return build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=3, norm="group", image_size=8), (1, 8, 8)


def _private(model: nn.Module, mode: str, *, seed: int = 5, batch: int = 6, sigma: float = 1.0,
             secure: bool = False, clip: float = 0.5):  # type: ignore[no-untyped-def]
    data = TensorDataset(torch.zeros(4 * batch, 1), torch.zeros(4 * batch).long())  # sets the sample rate only
    return make_private_training(
        model, torch.optim.SGD(trainable_parameters(model), lr=0.1), DataLoader(data, batch_size=batch),
        noise_multiplier=sigma, max_grad_norm=clip, generator=torch.Generator().manual_seed(seed),
        grad_sample_mode=mode, secure_noise=secure, criterion=nn.CrossEntropyLoss(),
    )


def _batch(shape: tuple[int, ...], *, n: int = 6, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g, dtype=dtype) * 3, torch.arange(n) % 3


def _clipped_sums(name: str, mode: str, *, dtype: torch.dtype = torch.float64,
                  trainable: str = "all") -> dict[str, torch.Tensor]:
    """``p.summed_grad`` (clipped, before noise) after one forward/backward pass in ``mode``."""
    model, shape = _model(name)
    model = model.to(dtype)
    if trainable != "all":
        apply_trainable(model, mode=trainable, model_name=name)
    private = _private(model, mode)
    images, targets = _batch(shape, dtype=dtype)
    nn.functional.cross_entropy(private.model(images), targets).backward()
    private.optimizer.clip_and_accumulate()
    names = {id(p): n for n, p in model.named_parameters()}
    out = {names[id(p)]: p.summed_grad.detach().clone() for p in private.optimizer.params}
    private.close()
    return out


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    return diff / sum(float(b[k].pow(2).sum()) for k in b) ** 0.5


@pytest.mark.parametrize("name", ["simplecnn", "tiny3d", "resnet18"])
def test_clipped_sums_equal_opacus_hooks_mode(name: str) -> None:
    reference = _clipped_sums(name, "hooks")
    ours = _clipped_sums(name, "bookkeeping")
    assert _relative(ours, reference) < 1e-10  # float64: the same sums up to rounding
    # Clipping is active: clip 0.5 scales the sum below the unclipped gradient sum.
    assert all(torch.isfinite(v).all() for v in ours.values())


def test_float32_clipped_sums_agree_within_1e_5() -> None:
    assert _relative(_clipped_sums("tiny3d", "bookkeeping", dtype=torch.float32),
                     _clipped_sums("tiny3d", "hooks", dtype=torch.float32)) < 1e-5


def test_ghost_norms_are_taken_where_cheaper_and_agree() -> None:
    """ResNet-18's deep convolutions (few output positions) use the ghost norm, the first ones do not."""
    model, shape = _model("resnet18")
    wrapped = BookkeepingModule(model.double())
    images, targets = _batch(shape)
    nn.functional.cross_entropy(wrapped(images), targets).backward()
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient was computed
    wrapped.clipped_sums(1.0)
    assert "layer4.0.conv2" in wrapped.ghost_layers and "conv1" not in wrapped.ghost_layers


def test_noised_update_matches_opacus_with_the_same_generator() -> None:
    """Same seeded generator, same secure sampling: the whole noised step equals hooks mode's."""
    after = {}
    for mode in ("hooks", "bookkeeping"):
        model, shape = _model("simplecnn")
        model = model.double()
        private = _private(model, mode, secure=True, seed=11)
        images, targets = _batch(shape)
        nn.functional.cross_entropy(private.model(images), targets).backward()
        private.optimizer.step()
        assert private.steps_taken == 1
        after[mode] = {n: p.detach().clone() for n, p in private.close().named_parameters()}
    assert _relative(after["bookkeeping"], after["hooks"]) < 1e-10


def test_noise_has_the_right_std_and_comes_from_the_given_generator() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 250))
    sigma, clip, batch = 1.3, 0.7, 6
    private = _private(model, "bookkeeping", sigma=sigma, clip=clip, batch=batch, secure=True, seed=21)
    assert private.optimizer.generator is not None
    before_generator = private.optimizer.generator.get_state()
    global_state = torch.get_rng_state()
    private.optimizer.zero_grad()
    private.optimizer.step()  # no backward: an empty Poisson batch, noise only
    noise = torch.cat([p.grad.flatten() for p in private.optimizer.params]) * batch
    assert noise.numel() == 100_250
    # std estimate of 100k normals: relative standard error 0.22%; 3% is > 10 standard errors.
    assert abs(float(noise.std()) / (sigma * clip) - 1) < 0.03 and abs(float(noise.mean())) < 0.03 * sigma * clip
    assert not torch.equal(private.optimizer.generator.get_state(), before_generator)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG drew nothing
    # The same generator state gives the same noise, another seed another one.
    repeat = _private(nn.Sequential(nn.Linear(400, 250)), "bookkeeping", sigma=sigma, clip=clip, batch=batch,
                      secure=True, seed=21)
    repeat.optimizer.step()
    again = torch.cat([p.grad.flatten() for p in repeat.optimizer.params]) * batch
    assert torch.equal(again, noise)


def test_frozen_parameters_get_no_work_and_stay_put() -> None:
    ours = _clipped_sums("simplecnn", "bookkeeping", trainable="last-block+head")
    reference = _clipped_sums("simplecnn", "hooks", trainable="last-block+head")
    assert _relative(ours, reference) < 1e-10
    model, _ = _model("simplecnn")
    apply_trainable(model, mode="last-block+head", model_name="simplecnn")
    wrapped = BookkeepingModule(model)
    hooked = {layer.name for layer in wrapped._layers}
    assert hooked == {"features.8", "features.9", "head"}


def test_physical_batches_add_up_to_the_logical_batch() -> None:
    """Opacus BatchMemoryManager's pattern: skip the step on all but the last physical batch."""
    sums = []
    for parts in (1, 3):
        model, shape = _model("simplecnn")
        model = model.double()
        private = _private(model, "bookkeeping")
        images, targets = _batch(shape)
        for chunk in zip(images.chunk(parts), targets.chunk(parts), strict=True):
            private.optimizer.zero_grad()
            nn.functional.cross_entropy(private.model(chunk[0]), chunk[1]).backward()  # mean over the chunk
            private.optimizer.signal_skip_step(do_skip=True)
            private.optimizer.step()
        sums.append({str(i): p.summed_grad.clone() for i, p in enumerate(private.optimizer.params)})
    assert _relative(sums[1], sums[0]) < 1e-10


def test_two_backward_passes_before_a_step_are_refused() -> None:
    model, shape = _model("simplecnn")
    private = _private(model, "bookkeeping")
    images, targets = _batch(shape, dtype=torch.float32)
    nn.functional.cross_entropy(private.model(images), targets).backward()
    with pytest.raises(RuntimeError, match="accumulation"):
        private.model(images)


def test_unsupported_layer_falls_back_to_hooks_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(4, 4), Scaled(), nn.Linear(4, 3))
    assert unsupported_layers(model) == ["1 (Scaled)"]
    with pytest.raises(ValueError, match=r"1 \(Scaled\).*dp-grad-sample-mode = 'hooks'"):
        BookkeepingModule(model)
    with caplog.at_level(logging.WARNING, logger="medfed.shared.privacy"):
        private = _private(model, "bookkeeping")
    assert isinstance(private.model, GradSampleModule)
    assert "1 (Scaled)" in caplog.text and "'hooks'" in caplog.text


def test_trains_through_train_epochs_and_closes_cleanly() -> None:
    model, shape = _model("simplecnn")
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(24, *shape, generator=g), torch.arange(24) % 3)
    before = [p.detach().clone() for p in model.parameters()]
    private = make_private_training(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=6),
        noise_multiplier=1.0, max_grad_norm=1.0, generator=torch.Generator().manual_seed(3),
        grad_sample_mode="bookkeeping",
    )
    result = train_epochs(private.model, private.loader, private.optimizer, task="classification", epochs=2,
                          device=torch.device("cpu"))
    assert private.steps_taken == result.steps == 2 * private.steps_per_epoch
    plain = private.close()
    assert plain is model and not plain._forward_hooks
    assert all(p.requires_grad for p in plain.parameters())
    assert any(not torch.equal(p.detach(), b) for p, b in zip(plain.parameters(), before, strict=True))


@pytest.mark.parametrize("secure", [True, False])
def test_noise_is_bit_identical_to_opacus_draws(secure: bool) -> None:
    from opacus.optimizers.optimizer import _generate_noise

    private = _private(nn.Sequential(nn.Linear(30, 20)), "bookkeeping", sigma=1.7, clip=0.9, secure=secure, seed=8)
    reference_rng = torch.Generator().manual_seed(8)
    expected = []
    for p in private.optimizer.params:
        p.summed_grad = torch.randn_like(p)
        expected.append(p.summed_grad + _generate_noise(1.7 * 0.9, p.summed_grad, reference_rng, secure))
    private.optimizer.add_noise()
    for p, want in zip(private.optimizer.params, expected, strict=True):
        assert torch.equal(p.grad, want)


class Shared(nn.Module):
    """The same convolution and norm on two inputs (as RetinaNet's heads on each pyramid level)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 96, 3, padding=1)  # 6x6 + 3x3 positions: ghost norm, weight-gradient kernel
        self.norm = nn.GroupNorm(4, 96)
        self.out = nn.Linear(96, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        levels = [x, nn.functional.avg_pool2d(x, 2)]
        pooled = [self.norm(self.head(level)).mean(dim=(2, 3)) for level in levels]
        return self.out(pooled[0]) + self.out(pooled[1])


def test_layers_called_twice_sum_their_per_sample_gradients() -> None:
    sums = {}
    for mode in ("hooks", "bookkeeping"):
        torch.manual_seed(0)
        model = Shared().double()
        private = _private(model, mode)
        images, targets = _batch((1, 6, 6))
        nn.functional.cross_entropy(private.model(images), targets).backward()
        private.optimizer.clip_and_accumulate()
        sums[mode] = {str(i): p.summed_grad.detach().clone() for i, p in enumerate(private.optimizer.params)}
    assert private.model.ghost_layers == {"head", "out"}  # out: 2 positions (its two calls)
    assert _relative(sums["bookkeeping"], sums["hooks"]) < 1e-10


class InPlaceAfterUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        out = self.b(h)
        h.mul_(2)  # changes b's input after b used it (autograd does not need it: b's weight is detached)
        return out


def test_an_input_changed_in_place_after_use_is_refused() -> None:
    wrapped = BookkeepingModule(InPlaceAfterUse())
    nn.functional.cross_entropy(wrapped(torch.randn(5, 4)), torch.arange(5) % 3).backward()
    with pytest.raises(RuntimeError, match=r"input of layer b \(Linear\) was modified in place"):
        wrapped.clipped_sums(1.0)


def test_a_parameter_shared_by_two_modules_is_unsupported() -> None:
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    assert unsupported_layers(nn.Sequential(first, second)) == ["1 (Linear), which shares a parameter with 0 (Linear)"]


class TwiceMaterialised(nn.Module):
    """A convolution whose per-sample gradients are materialised, called on two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.out = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x).mean(dim=(2, 3)) + self.conv(x.flip(-1) * 2).mean(dim=(2, 3)))


def test_per_sample_gradients_kept_in_chunks_give_the_same_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of one sample (the production size keeps blocks under 16 MB), one and two calls per layer."""
    from medfed.shared import dp_bookkeeping

    reference = _clipped_sums("simplecnn", "hooks")
    monkeypatch.setattr(dp_bookkeeping, "_CHUNK_BYTES", 1)
    assert _relative(_clipped_sums("simplecnn", "bookkeeping"), reference) < 1e-10
    sums = {}
    for mode in ("hooks", "bookkeeping"):
        torch.manual_seed(0)
        model = TwiceMaterialised().double()  # chunks of one sample, added over two calls
        private = _private(model, mode)
        images, targets = _batch((1, 6, 6))
        nn.functional.cross_entropy(private.model(images), targets).backward()
        private.optimizer.clip_and_accumulate()
        sums[mode] = {str(i): p.summed_grad.detach().clone() for i, p in enumerate(private.optimizer.params)}
    assert _relative(sums["bookkeeping"], sums["hooks"]) < 1e-10
