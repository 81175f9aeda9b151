"""Sample-level DP pieces: the privacy ledger, secure noise, and Opacus DP-SGD wrapping."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.shared.models import build_model
from medfed.shared.privacy import (
    EpsilonError,
    LedgerError,
    PrivacyBudget,
    PrivacyLedger,
    deployment_ledger_path,
    make_private_training,
    noise_for_target,
    poisson_schedule,
    poisson_schedule_for,
    secure_generator,
)
from medfed.shared.training import train_epochs

DELTA = 1e-5


def _reference_epsilon(rounds: list[tuple[int, float, float]], *, mechanism: str = "rdp") -> float:
    """Opacus's own accountant, stepped once per optimizer step (independent of the ledger)."""
    accountant = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    for steps, q, sigma in rounds:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=DELTA))


# --------------------------------------------------------------------------- ledger
@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_ledger_epsilon_matches_an_independent_opacus_accountant(mechanism: str) -> None:
    rounds = [(40, 0.02, 1.1), (40, 0.02, 1.1), (25, 0.05, 1.3), (40, 0.02, 1.1)]
    ledger = PrivacyLedger(accountant=mechanism)
    for k, (steps, q, sigma) in enumerate(rounds, start=1):
        entry = ledger.record_round(server_round=k, steps=steps, sample_rate=q, noise_multiplier=sigma, delta=DELTA)
        expected = _reference_epsilon(rounds[:k], mechanism=mechanism)
        assert entry.epsilon == pytest.approx(expected, rel=1e-6)
        assert ledger.epsilon(DELTA) == pytest.approx(expected, rel=1e-6)
    assert ledger.total_steps == sum(s for s, _, _ in rounds)
    epsilons = [e.epsilon for e in ledger.entries]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0  # privacy loss only grows


def test_a_negative_or_undefined_epsilon_is_an_error_not_a_number_to_report() -> None:
    """Issue 15: with dp-delta = 0.5 Opacus's RDP conversion reports a negative epsilon."""
    steps, q, sigma = 3, 1 / 3, 1.1
    opacus = RDPAccountant()
    for _ in range(steps):
        opacus.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert opacus.get_epsilon(delta=0.5) < 0  # what the site used to report
    ledger = PrivacyLedger()
    with pytest.raises(EpsilonError, match=r"epsilon = -0\.\d+ at dp-delta = 0\.5.*e\.g\. 1e-5"):
        ledger.record_round(server_round=1, steps=steps, sample_rate=q, noise_multiplier=sigma, delta=0.5)
    with pytest.raises(EpsilonError, match="epsilon = "):
        ledger.projected_epsilon(delta=0.5, steps=steps, sample_rate=q, noise_multiplier=sigma)
    for delta in (0.0, 1.0, float("nan")):
        with pytest.raises(EpsilonError, match="dp-delta = .* must lie in \\(0, 1\\)"):
            ledger.epsilon(delta)
    assert ledger.epsilon(DELTA) > 0  # the same history at a sane delta is fine


def test_a_deployed_ledger_path_depends_on_the_datalist_only(tmp_path) -> None:
    datalist = tmp_path / "patient-records" / "datalist.json"
    path = deployment_ledger_path(tmp_path / "ledgers", datalist=datalist)
    assert path.parent == tmp_path / "ledgers" and path.name.startswith("datalist-") and path.suffix == ".json"
    assert deployment_ledger_path(tmp_path / "ledgers", datalist=tmp_path / "patient-records" / ".." / "patient-records" / "datalist.json") == path
    assert deployment_ledger_path(tmp_path / "ledgers", datalist=tmp_path / "other.json") != path
    assert "patient" not in str(path)  # the datalist's path is hashed, never written out


@pytest.mark.parametrize(("n", "batch"), [(12, 4), (13, 4), (3, 8), (100, 16), (1, 1)])
def test_the_schedule_without_data_matches_the_loaders(n: int, batch: int) -> None:
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=min(batch, n), drop_last=False)
    assert poisson_schedule_for(num_samples=n, batch_size=batch) == poisson_schedule(loader)


def test_ledger_with_budget_one_stops_at_the_right_round() -> None:
    steps, q, sigma = 50, 0.02, 1.5
    budget = PrivacyBudget(epsilon=1.0, delta=DELTA)
    # Independent answer: the first round after which Opacus's accountant exceeds epsilon 1.
    accountant, first_over = RDPAccountant(), None
    for r in range(1, 50):
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
        if accountant.get_epsilon(delta=DELTA) > budget.epsilon:
            first_over = r
            break
    assert first_over is not None and first_over > 2  # a setting where the stop is not trivial

    ledger = PrivacyLedger()
    trained = 0
    for r in range(1, 50):
        if ledger.would_exceed(budget=budget, steps=steps, sample_rate=q, noise_multiplier=sigma):
            break
        ledger.record_round(server_round=r, steps=steps, sample_rate=q, noise_multiplier=sigma, delta=DELTA)
        trained += 1
    assert trained == first_over - 1
    assert ledger.epsilon(DELTA) <= budget.epsilon
    assert ledger.projected_epsilon(delta=DELTA, steps=steps, sample_rate=q, noise_multiplier=sigma) > 1.0
    assert len(ledger.entries) == trained  # would_exceed did not change the ledger


def test_ledger_saved_and_reloaded_continues_the_count(tmp_path) -> None:
    path = tmp_path / "ledgers" / "site-0.json"
    rounds = [(30, 0.03, 1.2)] * 5
    first = PrivacyLedger(path=path)
    for r, (s, q, sigma) in enumerate(rounds[:3], start=1):
        first.record_round(server_round=r, steps=s, sample_rate=q, noise_multiplier=sigma, delta=DELTA)
    first.save()
    assert [p.name for p in path.parent.iterdir()] == ["site-0.json"]  # no temporary file left
    stored = json.loads(path.read_text())
    assert stored["accountant"]["mechanism"] == "rdp"
    assert stored["accountant"]["history"] == [[1.2, 0.03, 90]]

    restarted = PrivacyLedger.open(path)  # as a restarted site process does
    assert restarted.epsilon(DELTA) == pytest.approx(first.epsilon(DELTA), rel=1e-12)
    for r, (s, q, sigma) in enumerate(rounds[3:], start=4):
        restarted.record_round(server_round=r, steps=s, sample_rate=q, noise_multiplier=sigma, delta=DELTA)
    restarted.save()
    assert [e.round for e in PrivacyLedger.load(path).entries] == [1, 2, 3, 4, 5]
    assert PrivacyLedger.load(path).epsilon(DELTA) == pytest.approx(_reference_epsilon(rounds), rel=1e-6)

    copy = PrivacyLedger()
    copy.load_state_dict(restarted.state_dict())
    assert copy.epsilon(DELTA) == pytest.approx(restarted.epsilon(DELTA), rel=1e-12)


def test_open_starts_an_empty_ledger_when_the_file_is_absent(tmp_path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "new.json")
    assert ledger.epsilon(DELTA) == 0.0 and ledger.entries == ()
    assert not (tmp_path / "new.json").exists()


def test_broken_ledgers_are_rejected_with_the_file_named(tmp_path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(LedgerError, match="bad.json.*not valid JSON"):
        PrivacyLedger.load(bad_json)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(LedgerError, match="other.json.*not a medfed privacy ledger"):
        PrivacyLedger.load(other)
    ledger = PrivacyLedger()
    ledger.record_round(server_round=1, steps=10, sample_rate=0.1, noise_multiplier=1.0, delta=DELTA)
    state = ledger.state_dict()
    state["accountant"]["history"] = [[1.0, 0.1, 3]]  # tampered: fewer steps than the entries
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(state))
    with pytest.raises(LedgerError, match="tampered.json is inconsistent"):
        PrivacyLedger.load(tampered)


def test_a_ledger_kept_with_another_accountant_is_recomposed(tmp_path) -> None:
    path = tmp_path / "site.json"
    rdp = PrivacyLedger(accountant="rdp", path=path)
    rdp.record_round(server_round=1, steps=40, sample_rate=0.02, noise_multiplier=1.1, delta=DELTA)
    rdp.save()
    prv = PrivacyLedger.load(path, accountant="prv")
    assert prv.mechanism == "prv"
    assert prv.epsilon(DELTA) == pytest.approx(_reference_epsilon([(40, 0.02, 1.1)], mechanism="prv"), rel=1e-6)


def test_gdp_refuses_to_compose_different_noise() -> None:
    ledger = PrivacyLedger(accountant="gdp")
    ledger.record_round(server_round=1, steps=10, sample_rate=0.1, noise_multiplier=1.0, delta=DELTA)
    ledger.record_round(server_round=2, steps=10, sample_rate=0.1, noise_multiplier=1.0, delta=DELTA)
    assert ledger.total_steps == 20
    with pytest.raises(ValueError, match="use dp-accountant = 'rdp' or 'prv'"):
        ledger.record_round(server_round=3, steps=10, sample_rate=0.1, noise_multiplier=2.0, delta=DELTA)


def test_noise_for_target_spends_at_most_the_target() -> None:
    q, steps = 0.02, 500
    sigma = noise_for_target(target_epsilon=2.0, delta=DELTA, sample_rate=q, steps=steps)
    spent = _reference_epsilon([(steps, q, sigma)])
    assert 1.95 <= spent <= 2.0
    with pytest.raises(ValueError, match="dp-target-epsilon = 0 must be > 0"):
        noise_for_target(target_epsilon=0, delta=DELTA, sample_rate=q, steps=steps)


def test_budget_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match="dp-budget-epsilon"):
        PrivacyBudget(epsilon=0.0, delta=DELTA)
    with pytest.raises(ValueError, match="dp-delta"):
        PrivacyBudget(epsilon=1.0, delta=1.5)


# --------------------------------------------------------------------------- secure noise
def test_secure_generator_fills_the_whole_mersenne_twister_state_from_the_os() -> None:
    a, b = secure_generator(), secure_generator()
    words_a = struct.unpack_from("<624Q", a.get_state().numpy().tobytes(), 24)
    words_b = struct.unpack_from("<624Q", b.get_state().numpy().tobytes(), 24)
    assert words_a != words_b
    assert all(w < 2**32 for w in words_a) and len(set(words_a)) > 600
    # Not reachable by manual_seed: a seeded state is a fixed function of its first word.
    seeded = torch.Generator().manual_seed(words_a[0])
    assert struct.unpack_from("<624Q", seeded.get_state().numpy().tobytes(), 24) != words_a
    x, y = torch.randn(50_000, generator=a), torch.randn(50_000, generator=b)
    assert not torch.equal(x, y)
    assert abs(float(x.mean())) < 0.03 and abs(float(x.std()) - 1.0) < 0.03


# --------------------------------------------------------------------------- DP-SGD wrapping
def _toy_data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g))


def _toy_model(norm: str = "group") -> nn.Module:
    torch.manual_seed(0)
    return build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2, norm=norm)


def _train(seed: int, *, mode: str = "hooks", epochs: int = 1, secure: bool = False) -> tuple[nn.Module, int]:
    model = _toy_model()
    loader = DataLoader(_toy_data(), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private_training(
        model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(seed), grad_sample_mode=mode, secure_noise=secure,
        criterion=nn.CrossEntropyLoss(),
    )
    train_epochs(private.model, private.loader, private.optimizer, task="classification", epochs=epochs,
                 device=torch.device("cpu"), criterion=private.criterion)
    assert private.steps_taken == epochs * private.steps_per_epoch
    return private.close(), private.steps_taken


def test_make_private_training_rejects_batchnorm_with_the_fix() -> None:
    model = _toy_model(norm="batch")
    loader = DataLoader(_toy_data(), batch_size=8)
    with pytest.raises(ValueError, match=r"norm = 'group'.*--norm group"):
        make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                              noise_multiplier=1.0, max_grad_norm=1.0, generator=torch.Generator())


def test_make_private_training_uses_poisson_sampling_from_the_given_generator() -> None:
    model = _toy_model()
    loader = DataLoader(_toy_data(), batch_size=8)
    private = make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                    noise_multiplier=1.0, max_grad_norm=1.0,
                                    generator=torch.Generator().manual_seed(3))
    schedule = poisson_schedule(loader)
    assert private.sample_rate == schedule.sample_rate == pytest.approx(1 / 4)
    assert private.steps_per_epoch == schedule.steps_per_epoch == len(private.loader)
    generator = private.loader.batch_sampler.generator

    def sizes(seed: int) -> list[int]:
        generator.manual_seed(seed)
        return [len(x) for x, _ in private.loader]

    assert len(set(sizes(3))) > 1  # Poisson batches vary in size
    assert sizes(3) == sizes(3) and sizes(3) != sizes(4)  # drawn from the given generator
    assert private.close() is model and not hasattr(next(model.parameters()), "grad_sample")

    sampling = torch.Generator().manual_seed(9)
    second = _toy_model()
    other = make_private_training(second, torch.optim.SGD(second.parameters(), lr=0.1), loader,
                                  noise_multiplier=1.0, max_grad_norm=1.0, generator=torch.Generator(),
                                  sampling_generator=sampling)
    assert other.loader.batch_sampler.generator is sampling and other.optimizer.generator is not sampling


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_training_is_reproducible_with_a_seeded_generator_and_noisy(mode: str) -> None:
    a, steps = _train(1, mode=mode)
    b, _ = _train(1, mode=mode)
    c, _ = _train(2, mode=mode)
    start = _toy_model()
    for pa, pb, pc, p0 in zip(a.parameters(), b.parameters(), c.parameters(), start.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))
    assert any(not torch.equal(pa, p0) for pa, p0 in zip(a.parameters(), start.parameters(), strict=True))
    assert steps > 0


def test_secure_noise_changes_how_the_noise_is_drawn() -> None:
    plain, _ = _train(5, secure=False)
    hardened, _ = _train(5, secure=True)  # same generator, 4 normals per coordinate
    assert any(not torch.equal(p, h) for p, h in zip(plain.parameters(), hardened.parameters(), strict=True))


def test_an_empty_poisson_batch_still_takes_a_noisy_step() -> None:
    model = _toy_model()
    data = _toy_data(n=2)
    loader = DataLoader(data, batch_size=1)  # sample rate 1/2: a batch is empty 1 time in 4
    private = make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                    noise_multiplier=1.0, max_grad_norm=1.0,
                                    generator=torch.Generator().manual_seed(0))
    sizes: list[int] = []

    class Counting:
        dataset = data

        def __iter__(self):
            for x, y in private.loader:
                sizes.append(len(x))
                yield x, y

    before = [p.detach().clone() for p in model.parameters()]
    train_epochs(private.model, Counting(), private.optimizer, task="classification", epochs=10,  # type: ignore[arg-type]
                 device=torch.device("cpu"))
    assert 0 in sizes  # this seed draws empty batches
    assert private.steps_taken == len(sizes) == 10 * private.steps_per_epoch
    private.close()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_dp_fedprox_pulls_towards_the_global_model() -> None:
    def run(mu: float) -> float:
        model = _toy_model()
        anchor = [p.detach().clone() for p in model.parameters()]
        loader = DataLoader(_toy_data(), batch_size=8)
        private = make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                        noise_multiplier=1.0, max_grad_norm=1.0,
                                        generator=torch.Generator().manual_seed(4))
        train_epochs(private.model, private.loader, private.optimizer, task="classification", epochs=2,
                     device=torch.device("cpu"), proximal_mu=mu, global_params=anchor)
        private.close()
        return float(sum(((p.detach() - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)))

    assert run(5.0) < 0.8 * run(0.0)


def test_noise_multiplier_zero_is_refused() -> None:
    model = _toy_model()
    with pytest.raises(ValueError, match="no privacy"):
        make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              DataLoader(_toy_data(), batch_size=8), noise_multiplier=0.0,
                              max_grad_norm=1.0, generator=torch.Generator())
