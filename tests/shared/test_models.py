"""Tests for the model registry: shapes, Opacus compatibility and one real DP-SGD step per model."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from monai.losses import DiceCELoss
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.shared.models import (
    DP_NORM,
    MODELS,
    NORMS,
    DPResNetBlock,
    build_model,
    count_parameters,
    model_task,
    validate_for_dp,
)

BATCH = 4
IN_CHANNELS = 1
OUT_CHANNELS = 3

slow = pytest.mark.slow

# (model, spatial_dims, side): every registered model in 2D and 3D. Classifiers take
# MedMNIST's 28 (densenet121 upsamples internally); unet needs sides divisible by 16.
SHAPE_CASES = [
    ("simplecnn", 2, 28),
    ("simplecnn", 3, 28),
    ("densenet121", 2, 28),
    ("densenet121", 3, 28),
    ("resnet18", 2, 28),
    ("resnet18", 3, 16),
    ("resnet34", 2, 28),
    ("resnet34", 3, 16),
    ("unet", 2, 32),
    ("unet", 3, 32),
    ("vit", 2, 28),
    ("vit", 3, 16),
    ("unetr", 2, 16),
    ("unetr", 3, 16),
    ("swinunetr", 2, 32),
    ("swinunetr", 3, 32),
]

# The same table for the DP-SGD step. 3D ResNet-34 (63M parameters) only runs with ``-m slow``:
# 3D ResNet-18 exercises the same code. 3D UNETR / SwinUNETR DP steps (about 3-7 s each) are
# ``slow`` too: 3D ViT runs the same transformer code, and their 2D steps the same decoders.
DP_STEP_CASES = [
    ("simplecnn", 2, 28),
    ("simplecnn", 3, 28),
    ("densenet121", 2, 28),
    ("densenet121", 3, 28),
    ("resnet18", 2, 28),
    ("resnet18", 3, 16),
    ("resnet34", 2, 28),
    pytest.param("resnet34", 3, 16, marks=slow),
    ("unet", 2, 32),
    ("unet", 3, 32),
    ("vit", 2, 28),
    ("vit", 3, 16),
    ("unetr", 2, 16),
    pytest.param("unetr", 3, 16, marks=slow),
    ("swinunetr", 2, 32),
    pytest.param("swinunetr", 3, 32, marks=slow),
]

TRANSFORMERS = ("vit", "unetr", "swinunetr")
NORM_FREE = {"vit"}
"""Models with no norm layer that ``norm`` selects (LayerNorm only): any ``norm`` suits DP-SGD."""


def _batch(
    name: str, spatial_dims: int, side: int, n: int = BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images ``(n, 1, *spatial)`` and labels ``(n,)`` or masks ``(n, 1, *spatial)``."""
    generator = torch.Generator().manual_seed(0)
    spatial = (side,) * spatial_dims
    images = torch.rand((n, IN_CHANNELS, *spatial), generator=generator)
    if model_task(name) == "segmentation":
        targets = torch.randint(0, OUT_CHANNELS, (n, 1, *spatial), generator=generator)
    else:
        targets = torch.randint(0, OUT_CHANNELS, (n,), generator=generator)
    return images, targets


def _expected_shape(name: str, spatial_dims: int, side: int, n: int = BATCH) -> tuple[int, ...]:
    if model_task(name) == "segmentation":
        return (n, OUT_CHANNELS, *(side,) * spatial_dims)
    return (n, OUT_CHANNELS)


# --------------------------------------------------------------------------- registry errors
def test_registry_names_and_tasks() -> None:
    assert {"simplecnn", "densenet121", "resnet18", "unet"} <= set(MODELS)
    for name, spec in MODELS.items():
        assert spec.name == name
        assert model_task(name) == spec.task
        assert spec.description
    assert model_task("unet") == "segmentation"
    assert model_task("densenet121") == "classification"
    assert DP_NORM in NORMS


@pytest.mark.parametrize("call", ["build_model", "model_task"])
def test_unknown_name_lists_valid_names(call: str) -> None:
    with pytest.raises(ValueError) as info:
        if call == "build_model":
            build_model("vgg16", spatial_dims=2, in_channels=1, out_channels=2)
        else:
            model_task("vgg16")
    message = str(info.value)
    assert "vgg16" in message
    for name in MODELS:
        assert name in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"norm": "layer"}, "norm"),
        ({"norm": "BATCH"}, "norm"),
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": 0}, "out_channels"),
        ({"image_size": (28, 28, 28)}, "image_size"),
        ({"image_size": -4}, "image_size"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], fragment: str) -> None:
    arguments: dict[str, object] = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        build_model("simplecnn", **arguments)  # type: ignore[arg-type]


def test_bad_norm_lists_valid_norms() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=2, norm="layer")
    for norm in NORMS:
        assert norm in str(info.value)


@pytest.mark.parametrize("image_size", [28, 30, (32, 40)])
def test_unet_rejects_sides_not_divisible_by_16(image_size: int | tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        build_model("unet", spatial_dims=2, in_channels=1, out_channels=2, image_size=image_size)


@pytest.mark.parametrize("image_size", [None, 0, 32, (32, 64)])
def test_unet_accepts_valid_or_unknown_sizes(image_size: int | tuple[int, ...] | None) -> None:
    build_model("unet", spatial_dims=2, in_channels=1, out_channels=2, image_size=image_size)


def test_count_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    assert count_parameters(model) == 3 * 2 + 2 + 2 + 1
    model[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 2 + 2 + 1


# --------------------------------------------------------------------------- shapes and DP validity
@pytest.mark.parametrize(("name", "spatial_dims", "side"), SHAPE_CASES)
def test_dp_norm_builds_validates_and_has_right_output_shape(
    name: str, spatial_dims: int, side: int
) -> None:
    torch.manual_seed(0)
    model = build_model(
        name,
        spatial_dims=spatial_dims,
        in_channels=IN_CHANNELS,
        out_channels=OUT_CHANNELS,
        norm=DP_NORM,
        image_size=side,
    )
    validate_for_dp(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    images, _ = _batch(name, spatial_dims, side)
    with torch.no_grad():
        out = model.eval()(images)
    assert tuple(out.shape) == _expected_shape(name, spatial_dims, side)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "spatial_dims", "side"),
    [("simplecnn", 2, 28), ("densenet121", 2, 28), ("resnet18", 2, 28), ("unet", 2, 32)],
)
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_other_norms_build_and_run(name: str, spatial_dims: int, side: int, norm: str) -> None:
    model = build_model(
        name,
        spatial_dims=spatial_dims,
        in_channels=IN_CHANNELS,
        out_channels=OUT_CHANNELS,
        norm=norm,
        image_size=side,
    )
    images, _ = _batch(name, spatial_dims, side)
    out = model.train()(images)
    assert tuple(out.shape) == _expected_shape(name, spatial_dims, side)
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert has_batchnorm == (norm == "batch")


@pytest.mark.parametrize("side", [28, 40, 70])
def test_densenet121_takes_small_and_odd_sizes_unknown_in_advance(side: int) -> None:
    """``image_size`` not given: the model still upsamples small inputs at run time."""
    model = build_model("densenet121", spatial_dims=2, in_channels=1, out_channels=2, norm="group")
    out = model(torch.rand(1, 1, side, side))
    assert tuple(out.shape) == (1, 2)


def test_densenet121_3d_instance_norm_small_input() -> None:
    """Instance norm needs > 1 voxel in the last block, so 3D instance norm upsamples to 64."""
    model = build_model(
        "densenet121", spatial_dims=3, in_channels=1, out_channels=2, norm="instance"
    )
    out = model.train()(torch.rand(2, 1, 8, 8, 8))
    assert tuple(out.shape) == (2, 2)


# --------------------------------------------------------------------------- BatchNorm, ResNet
@pytest.mark.parametrize("name", sorted(set(MODELS) - NORM_FREE))
def test_batchnorm_model_fails_validation_naming_the_fix(name: str) -> None:
    model = build_model(
        name, spatial_dims=2, in_channels=1, out_channels=2, norm="batch", image_size=32
    )
    with pytest.raises(ValueError) as info:
        validate_for_dp(model)
    message = str(info.value)
    assert "BatchNorm" in message
    assert "norm = 'group'" in message and "--norm group" in message
    assert "instance" in message


def test_batchnorm_message_names_the_modules() -> None:
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match=r"features\.1 \(BatchNorm2d\)"):
        validate_for_dp(model)


def test_eval_mode_model_fails_validation_with_fix() -> None:
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2, norm="group")
    with pytest.raises(ValueError, match=r"model\.train\(\)"):
        validate_for_dp(model.eval())
    validate_for_dp(model.train())


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["group", "instance"])
def test_resnet_has_no_batchnorm_and_no_inplace_ops(
    name: str, spatial_dims: int, norm: str
) -> None:
    model = build_model(
        name, spatial_dims=spatial_dims, in_channels=1, out_channels=2, norm=norm, image_size=16
    )
    modules = dict(model.named_modules())
    batchnorms = [n for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    inplace = [n for n, m in modules.items() if getattr(m, "inplace", False)]
    assert batchnorms == []
    assert inplace == []
    blocks = [m for m in modules.values() if isinstance(m, DPResNetBlock)]
    assert len(blocks) == (8 if name == "resnet18" else 16)
    # The shortcut projections (built by MONAI with BatchNorm) were replaced too.
    expected = nn.GroupNorm if norm == "group" else nn.modules.instancenorm._InstanceNorm
    projections = [m.downsample[1] for m in blocks if m.downsample is not None]
    assert len(projections) == 3
    assert all(isinstance(p, expected) for p in projections)
    validate_for_dp(model)


def test_resnet_small_image_stem() -> None:
    small = build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=2, image_size=28)
    large = build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=2, image_size=224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.no_max_pool
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert not large.no_max_pool


@pytest.mark.parametrize("name", ["simplecnn", "resnet18", "unet", "densenet121"])
def test_models_pickle(name: str) -> None:
    model = build_model(name, spatial_dims=2, in_channels=1, out_channels=2, norm="group")
    clone = pickle.loads(pickle.dumps(model))
    assert clone.state_dict().keys() == model.state_dict().keys()


# --------------------------------------------------------------------------- one real DP-SGD step
def _dp_sgd_step(name: str, spatial_dims: int, side: int, norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(
        name,
        spatial_dims=spatial_dims,
        in_channels=IN_CHANNELS,
        out_channels=OUT_CHANNELS,
        norm=norm,
        image_size=side,
    )
    validate_for_dp(model)
    images, targets = _batch(name, spatial_dims, side)
    loader = DataLoader(TensorDataset(images, targets), batch_size=BATCH)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and the accountant
        private_model, private_optimizer, private_loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="hooks",
        )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if model_task(name) == "segmentation":
        loss_fn: nn.Module = DiceCELoss(to_onehot_y=True, softmax=True)
    else:
        loss_fn = nn.CrossEntropyLoss()

    # Sample rate 1.0 (dataset size == batch size): the Poisson batch holds all samples.
    batch_images, batch_targets = next(iter(private_loader))
    assert len(batch_images) == BATCH
    private_model.train()
    private_optimizer.zero_grad()
    loss = loss_fn(private_model(batch_images), batch_targets)
    assert torch.isfinite(loss)
    loss.backward()

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if getattr(p, "grad_sample", None) is None]
    assert missing == [], f"no per-sample gradients for {missing[:5]}"
    for n, p in trainable:
        assert p.grad_sample.shape == (BATCH, *p.shape), n
    private_optimizer.step()

    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    changed = [n for n, p in after.items() if not torch.equal(p.detach(), before[n])]
    # Gaussian noise is added to every trainable parameter, so every one of them moves.
    assert sorted(changed) == sorted(n for n, _ in trainable)


# Opacus's full backward hooks warn when the input images do not require gradients (harmless).
ignore_hook_warning = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@ignore_hook_warning
@pytest.mark.parametrize(("name", "spatial_dims", "side"), DP_STEP_CASES)
def test_one_real_dp_sgd_step(name: str, spatial_dims: int, side: int) -> None:
    _dp_sgd_step(name, spatial_dims, side, DP_NORM)


@ignore_hook_warning
@pytest.mark.parametrize(
    ("name", "spatial_dims", "side"), [("unet", 2, 32), ("resnet18", 2, 28), ("unetr", 2, 16)]
)
def test_one_real_dp_sgd_step_with_instance_norm(name: str, spatial_dims: int, side: int) -> None:
    _dp_sgd_step(name, spatial_dims, side, "instance")


# --------------------------------------------------------------------------- transformers
@pytest.mark.parametrize(
    ("name", "image_size", "fragment"),
    [
        ("vit", None, "needs the image size"),
        ("vit", 0, "--image-size 28"),
        ("vit", 29, "no such divisor"),
        ("vit", (28, 31), r"side\(s\) \[31\]"),
        ("unetr", None, "--image-size 32"),
        ("unetr", 24, "divisible by 16"),
        ("unetr", (32, 40), r"\(32, 48\)"),
        ("swinunetr", 48, "divisible by 32"),
        ("swinunetr", (64, 16), "--image-size 64"),
        ("swinunetr", 32, "--norm group"),  # with norm = "instance" (below)
    ],
)
def test_transformer_image_size_errors_name_the_fix(
    name: str, image_size: int | tuple[int, ...] | None, fragment: str
) -> None:
    norm = "instance" if fragment == "--norm group" else "batch"
    with pytest.raises(ValueError, match=fragment) as info:
        build_model(name, spatial_dims=2, in_channels=1, out_channels=2, norm=norm, image_size=image_size)
    assert name in str(info.value)


@pytest.mark.parametrize(
    ("image_size", "patch"),
    [((28, 28), (4, 4)), ((64, 64), (8, 8)), ((32, 48), (4, 6)), ((28, 28, 28), (7, 7, 7)), ((16, 32, 64), (4, 8, 16))],
)
def test_vit_patch_size(image_size: tuple[int, ...], patch: tuple[int, ...]) -> None:
    model = build_model("vit", spatial_dims=len(image_size), in_channels=1, out_channels=2, image_size=image_size)
    conv = model.vit.patch_embedding.patch_embeddings
    assert tuple(conv.kernel_size) == patch and tuple(conv.stride) == patch
    assert model.vit.patch_embedding.n_patches <= 64


def test_swinunetr_unknown_size_checks_at_run_time() -> None:
    model = build_model("swinunetr", spatial_dims=2, in_channels=1, out_channels=2, norm="group")
    assert tuple(model(torch.rand(1, 1, 64, 32)).shape) == (1, 2, 64, 32)
    with pytest.raises(ValueError, match="32"):
        model(torch.rand(1, 1, 48, 32))


@pytest.mark.parametrize("name", ["unetr", "swinunetr"])
@pytest.mark.parametrize("norm", NORMS)
def test_transformer_decoder_norm_follows_norm(name: str, norm: str) -> None:
    side = 64 if (name, norm) == ("swinunetr", "instance") else 32
    model = build_model(name, spatial_dims=2, in_channels=1, out_channels=2, norm=norm, image_size=side)
    kinds = {
        "batch": nn.modules.batchnorm._BatchNorm,
        "group": nn.GroupNorm,
        "instance": nn.modules.instancenorm._InstanceNorm,
    }
    feature_norms = [m for m in model.modules() if isinstance(m, tuple(kinds.values()))]
    assert feature_norms and all(isinstance(m, kinds[norm]) for m in feature_norms)
    assert all(m.affine for m in feature_norms if not isinstance(m, nn.GroupNorm))
    out = model.train()(torch.rand(2, 1, side, side))
    assert tuple(out.shape) == (2, 2, side, side)
    if norm == "batch":
        with pytest.raises(ValueError, match="BatchNorm"):
            validate_for_dp(model)
    else:
        validate_for_dp(model)


@pytest.mark.parametrize("norm", NORMS)
def test_vit_has_layernorm_only_and_validates_for_any_norm(norm: str) -> None:
    model = build_model("vit", spatial_dims=2, in_channels=1, out_channels=2, norm=norm, image_size=28)
    norms = {type(m) for m in model.modules() if "Norm" in type(m).__name__}
    assert norms == {nn.LayerNorm}
    validate_for_dp(model)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformers_have_no_inplace_ops_and_no_loose_trainable_parameters(name: str) -> None:
    """Every trainable parameter sits in a layer Opacus has a grad sampler for (transposed
    convolutions: medfed.shared.opacus_fixes), never in a container that Opacus would hand to
    functorch whole."""
    from opacus.grad_sample import GradSampleModule

    side = 28 if name == "vit" else 32
    model = build_model(name, spatial_dims=2, in_channels=1, out_channels=2, norm="group", image_size=side)
    assert [n for n, m in model.named_modules() if getattr(m, "inplace", False)] == []
    owners = {
        type(m)
        for m in model.modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    }
    assert owners <= set(GradSampleModule.GRAD_SAMPLERS), owners - set(GradSampleModule.GRAD_SAMPLERS)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformers_pickle(name: str) -> None:
    side = 28 if name == "vit" else 32
    model = build_model(name, spatial_dims=2, in_channels=1, out_channels=2, norm="group", image_size=side)
    clone = pickle.loads(pickle.dumps(model))
    images = torch.rand(1, 1, side, side)
    with torch.no_grad():
        assert torch.equal(clone.eval()(images), model.eval()(images))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize(
    ("name", "spatial_dims", "side"),
    [
        ("vit", 2, 28),
        ("unetr", 2, 16),
        ("swinunetr", 2, 32),
        pytest.param("vit", 3, 16, marks=slow),
        pytest.param("unetr", 3, 16, marks=slow),
        pytest.param("swinunetr", 3, 32, marks=slow),
    ],
)
def test_per_sample_gradients_equal_single_image_gradients(name: str, spatial_dims: int, side: int) -> None:
    """Opacus's per-sample gradients are the gradients of each image alone (clipping is per
    image, not per Swin window or token), for every trainable parameter."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = build_model(name, spatial_dims=spatial_dims, in_channels=1, out_channels=2, norm="group", image_size=side)
    images = torch.rand(3, 1, *(side,) * spatial_dims)
    wrapped = GradSampleModule(model, loss_reduction="sum")
    wrapped(images).square().sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_sample = {n: p.grad_sample.detach().clone() for n, p in trainable}
    wrapped._close()
    errors = {}
    for i in range(len(images)):
        model.zero_grad()
        model(images[i : i + 1]).square().sum().backward()
        for n, p in trainable:
            assert p.grad is not None, n
            error = (per_sample[n][i] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)
            errors[n] = max(errors.get(n, 0.0), error.item())
    # float32 rounding through the network stays ~1e-3 of the largest entry (3D SwinUNETR);
    # a per-window or wrongly unfolded gradient is off by ~1.
    assert {n: e for n, e in errors.items() if e > 1e-2} == {}
