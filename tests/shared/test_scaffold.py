"""SCAFFOLD's Option II on a tiny linear model: with a constant local gradient ``g`` the corrected
local SGD steps move by ``K * eta * (g + c - c_i)``, and ``c_i+ = c_i - c + (x - y) / (K eta)``
recovers ``g`` exactly, with and without momentum (whose buffer starts at zero each round);
the server's ``c`` moves by the mean of the sites' changes over ``N``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.shared.scaffold import SGD_MOMENTUM, control_delta, path_length, server_control_update, site_control_update
from medfed.shared.training import train_epochs

INPUTS = torch.tensor([[1.0, 2.0], [0.5, -1.0], [-2.0, 0.25]])


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(2, 1)


def _state(model: nn.Module) -> list[np.ndarray]:
    return [t.detach().numpy().copy() for t in model.state_dict().values()]


def test_option_two_recovers_the_local_gradient_and_the_correction_is_applied() -> None:
    model = _linear()
    x = _state(model)
    loader = DataLoader(TensorDataset(INPUTS, torch.zeros(3, dtype=torch.long)), batch_size=3)
    gradient = [np.ones((1, 2)) * INPUTS.sum(0).numpy(), np.array([3.0])]  # d/dw sum(w.x + b): constant
    control = [np.array([[0.2, -0.1]], dtype=np.float32), np.array([0.3], dtype=np.float32)]
    site_control = [np.array([[-0.4, 0.0]], dtype=np.float32), np.array([0.1], dtype=np.float32)]
    lr, steps = 0.01, 4
    result = train_epochs(
        model, loader, torch.optim.SGD(model.parameters(), lr=lr), task="classification", epochs=steps,
        device=torch.device("cpu"), criterion=lambda logits, _: logits.sum(),
        gradient_correction=[torch.as_tensor(c - ci) for c, ci in zip(control, site_control, strict=True)],
    )
    y = _state(model)
    assert result.steps == steps
    for xi, yi, g, c, ci in zip(x, y, gradient, control, site_control, strict=True):
        np.testing.assert_allclose(yi, xi - steps * lr * (g + c - ci), rtol=1e-5, atol=1e-6)
    updated = site_control_update(
        site_control=site_control, control=control, global_weights=x, local_weights=y, length=steps * lr
    )
    for new, g in zip(updated, gradient, strict=True):
        np.testing.assert_allclose(new, g, rtol=1e-4, atol=1e-5)
    delta = control_delta(control=control, global_weights=x, local_weights=y, length=steps * lr)
    for d, new, ci in zip(delta, updated, site_control, strict=True):
        np.testing.assert_allclose(d, new - ci, atol=1e-6)  # what the server adds up is c_i+ - c_i


def test_the_server_control_moves_by_the_mean_change_over_all_sites() -> None:
    c = [np.array([1.0, 2.0], dtype=np.float32)]
    deltas = [[np.array([0.4, -0.8])], [np.array([0.2, 0.2])]]
    new = server_control_update(control=c, deltas=deltas, num_sites=4)  # 2 of 4 sites this round
    np.testing.assert_allclose(new[0], [1.0 + 0.6 / 4, 2.0 - 0.6 / 4], rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 16, 200])
def test_with_momentum_sgd_the_path_length_recovers_the_gradient_on_short_and_long_rounds(steps: int) -> None:
    model = _linear()
    x = _state(model)
    loader = DataLoader(TensorDataset(INPUTS, torch.zeros(3, dtype=torch.long)), batch_size=3)
    gradient = [np.ones((1, 2)) * INPUTS.sum(0).numpy(), np.array([3.0])]
    lr = 0.001
    train_epochs(  # the SGD of make_optimizer: momentum 0.9, a fresh buffer
        model, loader, torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM), task="classification",
        epochs=steps, device=torch.device("cpu"), criterion=lambda logits, _: logits.sum(),
    )
    y = _state(model)
    length = path_length(optimizer="sgd", learning_rate=lr, steps=steps)
    zeros = [np.zeros_like(g, dtype=np.float32) for g in gradient]
    recovered = site_control_update(site_control=zeros, control=zeros, global_weights=x, local_weights=y, length=length)
    for new, g in zip(recovered, gradient, strict=True):
        np.testing.assert_allclose(new, g, rtol=2e-3)
    # K * lr / (1 - beta), the long-run rate, is wrong on short rounds: 4 steps move 0.9 lr, not 40 lr
    naive = steps * lr / (1 - SGD_MOMENTUM)
    assert (length < 0.5 * naive) == (steps <= 4)


def test_path_length_without_a_step_and_adam_is_refused() -> None:
    assert path_length(optimizer="sgd", learning_rate=0.05, steps=1) == pytest.approx(0.05)
    assert path_length(optimizer="sgd", learning_rate=0.05, steps=0) == 0.0
    with pytest.raises(ValueError, match="optimizer = 'sgd'"):
        path_length(optimizer="adam", learning_rate=0.001, steps=4)
