"""Flower strategies by name (the legacy ``flwr.server.strategy`` family, which SecAgg+ needs)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.common import (
    FitIns,
    FitRes,
    Metrics,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from flwr.server.strategy.aggregate import aggregate, aggregate_krum
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.differential_privacy import add_gaussian_noise_to_params

from medfed.server.resume import state_arrays, state_tensors
from medfed.shared.config import SERVER_OPTIMIZERS, STRATEGIES, RunConfig
from medfed.shared.round_config import evaluate_config, fit_config
from medfed.shared.scaffold import TRAIN_STEPS, control_delta, path_length, server_control_update
from medfed.shared.training import cosine_lr

__all__ = [
    "build_strategy",
    "MultiKrum",
    "Scaffold",
    "TRAIN_STEPS",
    "server_optimizer",
    "weighted_average",
    "SUMMED_METRICS",
    "with_client_dp",
    "ClientLevelLedger",
    "AccountedFixedClipping",
    "AccountedAdaptiveClipping",
    "STRATEGIES",
]

logger = logging.getLogger(__name__)

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


SUMMED_METRICS: frozenset[str] = frozenset({"skipped-files"})
"""Site metrics that are counts: the federation's figure is their sum, not a mean."""


def weighted_average(results: list[tuple[int, Metrics]]) -> Metrics:
    """Example-weighted mean of every numeric metric the sites report.

    Counts (:data:`SUMMED_METRICS`, e.g. ``skipped-files``) are summed over the sites instead.
    Also adds ``<name>-min`` and ``<name>-max`` across sites, so a spread between the best and
    the worst site is visible; ``site-index`` is dropped.
    """
    names = sorted({k for _, m in results for k in m if k != "site-index"})
    out: dict[str, Scalar] = {}
    for name in names:
        pairs = [(n, float(m[name])) for n, m in results if name in m]
        total = sum(n for n, _ in pairs)
        if name in SUMMED_METRICS:
            out[name] = sum(v for _, v in pairs)
        elif total > 0:
            out[name] = sum(n * v for n, v in pairs) / total
        out[f"{name}-min"] = min(v for _, v in pairs)
        out[f"{name}-max"] = max(v for _, v in pairs)
    return out


def build_strategy(
    cfg: RunConfig,
    *,
    initial_weights: NDArrays,
    evaluate_fn: EvaluateFn | None,
    min_available_clients: int,
    trainable: list[bool] | None = None,
) -> Strategy:
    """The strategy ``cfg.strategy`` with medfed's round configs and metric aggregation.

    With ``client-dp`` on, it comes wrapped in Flower's client-side-clipping DP wrapper (see
    :func:`with_client_dp`).

    Flower's own: ``fedavg`` (``FedAvg``), ``fedprox`` (``FedAvg``'s aggregation; each
    site adds the proximal term ``proximal-mu`` from the run config), the server optimizers
    ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad`` (:func:`server_optimizer`: Flower's, with
    the buffers averaged), and the robust
    rules ``fedmedian`` (``FedMedian``: coordinate-wise median), ``fedtrimmedavg``
    (``FedTrimmedAvg(beta=trim-beta)``), ``krum`` (``Krum(num_malicious_clients=f)``: the one
    update closest to its ``n - f - 2`` nearest), ``multikrum`` (:class:`MultiKrum`: Flower's
    ``Krum`` with ``num_clients_to_keep``) and ``bulyan`` (``Bulyan`` over Krum). The robust
    rules ignore example counts (a weighted rule would let a site win by claiming many
    examples). medfed's own: ``scaffold`` (:class:`Scaffold`, SCAFFOLD with Option II).

    Parameters
    ----------
    cfg
        Uses ``strategy``, ``fraction_*``, ``min_fit_clients``, ``server_learning_rate``,
        ``trim_beta``, ``num_malicious_sites`` and ``num_sites_to_keep``. The per-round fit
        config is :func:`medfed.shared.round_config.fit_config` (the round number only).
    initial_weights
        The global model at round 0 (built by the server from the run's seed).
    evaluate_fn
        Server-side evaluation on held-out data (``None`` where the server has none).
    min_available_clients
        How many sites must be connected before a round starts.
    trainable
        Per entry of ``initial_weights``: whether it is a trainable parameter
        (:func:`medfed.shared.weights.trainable_mask`). The server optimizers (``fedavgm``,
        ``fedadam``, ``fedyogi``, ``fedadagrad``) step on those only and average the rest
        (BatchNorm statistics, counters) as FedAvg does: an adaptive step of size ``eta`` on a
        running variance would move it by about ``eta`` whatever the sites measured. Default:
        the floating-point entries.
    """

    min_fit = min(cfg.min_fit_clients, min_available_clients)
    common: dict[str, Any] = {
        "fraction_fit": cfg.fraction_fit,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_fit_clients": min_fit,
        "min_evaluate_clients": min_fit if cfg.fraction_evaluate > 0 else 0,
        "min_available_clients": min_available_clients,
        "evaluate_fn": evaluate_fn,
        "on_fit_config_fn": fit_config,
        "on_evaluate_config_fn": evaluate_config,
        "initial_parameters": ndarrays_to_parameters(initial_weights),
        "fit_metrics_aggregation_fn": weighted_average,
        "evaluate_metrics_aggregation_fn": weighted_average,
    }
    base: Strategy
    if cfg.strategy == "fedavg":
        base = FedAvg(**common)
    elif cfg.strategy == "fedprox":
        # FedProx aggregates as FedAvg; its proximal term is local training, which every site
        # adds from the run config's proximal-mu (shared.task.round_settings). Flower's FedProx
        # would also send "proximal_mu" each round, which the sites do not read (shared.round_config).
        base = FedAvg(**common)
    elif cfg.strategy in SERVER_OPTIMIZERS:
        mask = trainable if trainable is not None else [np.issubdtype(w.dtype, np.floating) for w in initial_weights]
        base = server_optimizer(cfg, trainable=mask, **common)
    elif cfg.strategy == "scaffold":
        base = Scaffold(cfg, num_sites=min_available_clients, **common)
    elif cfg.strategy == "fedmedian":
        base = FedMedian(**common)
    elif cfg.strategy == "fedtrimmedavg":
        base = FedTrimmedAvg(beta=cfg.trim_beta, **common)
    elif cfg.strategy == "krum":
        base = Krum(num_malicious_clients=cfg.num_malicious_sites, num_clients_to_keep=0, **common)
    elif cfg.strategy == "multikrum":
        base = MultiKrum(num_malicious_clients=cfg.num_malicious_sites, keep=cfg.num_sites_to_keep, **common)
    elif cfg.strategy == "bulyan":
        # Flower's Bulyan passes its extra keyword arguments to the first rule (aggregate_krum).
        base = Bulyan(
            num_malicious_clients=cfg.num_malicious_sites, first_aggregation_rule=aggregate_krum, to_keep=0, **common
        )
    else:
        valid = ", ".join(STRATEGIES)
        raise ValueError(f"strategy = {cfg.strategy!r} is invalid. Valid choices: {valid}.")
    return with_client_dp(cfg, base, num_sites=min_available_clients)


# --------------------------------------------------------------------------- server optimizers
def server_optimizer(cfg: RunConfig, *, trainable: list[bool], **common: Any) -> Strategy:
    """Flower's ``FedAvgM`` / ``FedAdam`` / ``FedYogi`` / ``FedAdagrad`` with ``cfg``'s server keys,
    stepping on the ``trainable`` entries and averaging the others (:class:`_AveragedBuffers`)."""
    eta, tau = cfg.server_step, cfg.server_tau
    if cfg.strategy == "fedavgm":
        return _FedAvgM(trainable, server_learning_rate=eta, server_momentum=cfg.server_momentum, **common)
    if cfg.strategy == "fedadam":
        return _FedAdam(
            trainable, eta=eta, eta_l=cfg.learning_rate, beta_1=cfg.server_beta_1, beta_2=cfg.server_beta_2,
            tau=tau, **common,
        )
    if cfg.strategy == "fedyogi":
        return _FedYogi(
            trainable, eta=eta, eta_l=cfg.learning_rate, beta_1=cfg.server_beta_1, beta_2=cfg.server_beta_2,
            tau=tau, **common,
        )
    if cfg.strategy == "fedadagrad":
        return _FedAdagrad(trainable, eta=eta, eta_l=cfg.learning_rate, tau=tau, **common)
    raise ValueError(f"strategy = {cfg.strategy!r} is no server optimizer. Valid choices: {', '.join(SERVER_OPTIMIZERS)}.")


class _AveragedBuffers:
    """Mixin: after the server optimizer's step, the non-trainable entries take the example-
    weighted mean of the sites' values (FedAvg), in the result and in the optimizer's own
    current weights."""

    trainable: list[bool]

    def __init__(self, trainable: list[bool], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trainable = list(trainable)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The optimizer's step on the parameters; FedAvg on the buffers."""
        params, metrics = super().aggregate_fit(server_round, results, failures)  # type: ignore[misc]
        if params is None or all(self.trainable):
            return params, metrics
        sites = [(parameters_to_ndarrays(res.parameters), res.num_examples) for _, res in results]
        mean = aggregate(sites)
        stepped = parameters_to_ndarrays(params)
        merged = [
            s if keep else _like(m, reference=ref)
            for s, m, ref, keep in zip(stepped, mean, sites[0][0], self.trainable, strict=True)
        ]
        self._set_current(merged)
        return ndarrays_to_parameters(merged), metrics

    def _set_current(self, weights: NDArrays) -> None:
        self.current_weights = weights  # type: ignore[attr-defined]


class _FedAdam(_AveragedBuffers, FedAdam):
    """Flower's ``FedAdam`` stepping on the trainable entries only."""


class _FedYogi(_AveragedBuffers, FedYogi):
    """Flower's ``FedYogi`` stepping on the trainable entries only."""


class _FedAdagrad(_AveragedBuffers, FedAdagrad):
    """Flower's ``FedAdagrad`` stepping on the trainable entries only."""


class _FedAvgM(_AveragedBuffers, FedAvgM):
    """Flower's ``FedAvgM`` (Hsu et al. 2019) with averaged buffers and resumable state."""

    def _set_current(self, weights: NDArrays) -> None:
        self.initial_parameters = ndarrays_to_parameters(weights)

    def resume_state(self) -> dict[str, object]:
        """The current weights and the momentum (see ``medfed.server.resume``)."""
        current = parameters_to_ndarrays(self.initial_parameters) if self.initial_parameters else None
        return {
            "current_weights": state_tensors(current) if current is not None else None,
            "momentum": state_tensors(self.momentum_vector) if self.momentum_vector else None,
        }

    def load_resume_state(self, state: dict[str, object]) -> None:
        """Continue from :meth:`resume_state`."""
        if state["current_weights"] is not None:
            self.initial_parameters = ndarrays_to_parameters(state_arrays(state["current_weights"]))  # type: ignore[arg-type]
        self.momentum_vector = state_arrays(state["momentum"]) if state["momentum"] is not None else None  # type: ignore[arg-type]


def _like(value: np.ndarray, *, reference: np.ndarray) -> np.ndarray:
    """``value`` in ``reference``'s dtype (an integer counter's mean rounded)."""
    value = np.asarray(value)
    if not np.issubdtype(reference.dtype, np.floating):
        value = np.rint(value)
    return value.astype(reference.dtype)


# --------------------------------------------------------------------------- SCAFFOLD
class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020) with Option II control variates.

    Each round the sites receive the global weights followed by the server control variate
    ``c`` (one array per state entry, so twice as many arrays as the model has entries); they
    return their weights and their step count (fit metric :data:`TRAIN_STEPS`). The global model
    moves by ``server-learning-rate`` (default 1) times the example-weighted mean update, and
    ``c`` by ``(1 / N) * sum_i (c_i+ - c_i)``, computed from each site's weights and steps by
    :func:`medfed.shared.scaffold.control_delta` (the same formula the site applies to its own
    ``c_i``, which it keeps in its site state).

    Parameters
    ----------
    cfg
        Uses ``learning-rate`` (the round's cosine step), ``num-server-rounds``, ``optimizer``
        and ``server-learning-rate``.
    num_sites
        ``N``, the sites in the federation.
    **kwargs
        Flower's ``FedAvg`` arguments (``initial_parameters`` is required).
    """

    def __init__(self, cfg: RunConfig, *, num_sites: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.initial_parameters is None:
            raise ValueError("Scaffold needs initial_parameters (the round-0 model shapes its control variate).")
        path_length(optimizer=cfg.optimizer, learning_rate=cfg.learning_rate, steps=1)  # refuses Adam early
        self.cfg = cfg
        self.num_sites = num_sites
        self.server_step = cfg.server_step
        self.control: NDArrays = [
            np.zeros(w.shape, dtype=np.float32) for w in parameters_to_ndarrays(self.initial_parameters)
        ]
        self._sent: dict[int, NDArrays] = {}

    def __repr__(self) -> str:
        return f"Scaffold(server_step={self.server_step:g}, sites={self.num_sites})"

    def fit_parameters(self, server_round: int, weights: NDArrays) -> NDArrays:
        """What a site receives in round ``server_round``: ``weights`` then the control variate."""
        self._sent[server_round] = [np.asarray(w) for w in weights]
        return [*weights, *self.control]

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's site sampling, with the control variate appended to the parameters."""
        instructions = super().configure_fit(server_round, parameters, client_manager)
        sent = ndarrays_to_parameters(self.fit_parameters(server_round, parameters_to_ndarrays(parameters)))
        return [(proxy, FitIns(sent, ins.config)) for proxy, ins in instructions]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Move the model and ``c`` by the round's updates (see the class docstring)."""
        sent = self._sent.pop(server_round, None)
        mean, metrics = super().aggregate_fit(server_round, results, failures)
        if mean is None or not results:
            return mean, metrics
        if sent is None:
            raise RuntimeError(f"round {server_round}: SCAFFOLD aggregates results of a round it did not configure.")
        lr = cosine_lr(self.cfg.learning_rate, step=server_round, total=self.cfg.num_server_rounds)
        deltas = []
        for _, res in results:
            steps = int(res.metrics.get(TRAIN_STEPS, 0))
            if res.num_examples == 0 or steps == 0:
                continue
            deltas.append(
                control_delta(
                    control=self.control, global_weights=sent, local_weights=parameters_to_ndarrays(res.parameters),
                    length=path_length(optimizer=self.cfg.optimizer, learning_rate=lr, steps=steps),
                )
            )
        self.control = server_control_update(control=self.control, deltas=deltas, num_sites=self.num_sites)
        averaged = parameters_to_ndarrays(mean)
        moved = [
            (x + self.server_step * (m - x)).astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else np.asarray(m)
            for x, m in zip(sent, averaged, strict=True)
        ]
        return ndarrays_to_parameters(moved), metrics

    def resume_state(self) -> dict[str, object]:
        """The server control variate (see ``medfed.server.resume``)."""
        return {"control": state_tensors(self.control)}

    def load_resume_state(self, state: dict[str, object]) -> None:
        """Continue from :meth:`resume_state`."""
        self.control = state_arrays(state["control"])  # type: ignore[arg-type]


class MultiKrum(Krum):
    """Flower's ``Krum`` with ``num_clients_to_keep``: average the ``keep`` best-scored updates.

    Parameters
    ----------
    num_malicious_clients
        ``f``: each update is scored by its distance to its ``n - f - 2`` nearest.
    keep
        Updates averaged; ``0`` keeps all but ``f`` of each round's (validated) updates, so a
        round with fewer updates than planned still averages ``n - f``.
    **kwargs
        Flower's ``Krum`` arguments.
    """

    def __init__(self, *, num_malicious_clients: int, keep: int, **kwargs: Any) -> None:
        super().__init__(num_malicious_clients=num_malicious_clients, num_clients_to_keep=max(keep, 1), **kwargs)
        self.keep = keep

    def __repr__(self) -> str:
        return f"MultiKrum(f={self.num_malicious_clients}, keep={self.keep or 'n - f'})"

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's Krum aggregation with this round's number of updates to keep."""
        keep = self.keep or len(results) - self.num_malicious_clients
        if not 1 <= keep <= len(results):
            raise ValueError(
                f"round {server_round}: multikrum cannot keep {keep} of {len(results)} updates "
                "(num-sites-to-keep, num-malicious-sites)."
            )
        self.num_clients_to_keep = keep
        return super().aggregate_fit(server_round, results, failures)


# --------------------------------------------------------------------------- client-level DP
def with_client_dp(cfg: RunConfig, strategy: Strategy, *, num_sites: int) -> Strategy:
    """Wrap ``strategy`` in Flower's client-side-clipping DP wrapper ``cfg.client_dp`` asks for.

    ``"fixed"``: :class:`AccountedFixedClipping` (Flower's
    ``DifferentialPrivacyClientSideFixedClipping``); ``"adaptive"``:
    :class:`AccountedAdaptiveClipping` (``DifferentialPrivacyClientSideAdaptiveClipping``). The
    sites clip their update with ``fixedclipping_mod`` / ``adaptiveclipping_mod`` (see
    :func:`medfed.client.client_app.privacy_mods`); the server adds Gaussian noise of standard
    deviation ``noise_multiplier * clipping_norm / sites_per_round`` to the aggregate and a
    Flower ``RdpAccountant`` reports the cumulative client-level epsilon at ``dp-delta`` after
    every round (fit metrics ``client-dp-*`` in ``metrics.jsonl``).

    Parameters
    ----------
    cfg
        Uses ``client-dp``, ``client-dp-noise-multiplier``, ``client-dp-clipping-norm`` (the
        initial norm when adaptive), ``dp-delta`` and the site sampling keys.
    strategy
        The aggregation strategy (FedAvg, FedProx, FedAdam).
    num_sites
        Sites in the federation (the accountant's population).
    """
    if cfg.client_dp == "off":
        return strategy
    sampled = max(int(num_sites * cfg.fraction_fit), min(cfg.min_fit_clients, num_sites))
    z = cfg.client_dp_noise_multiplier
    ledger = ClientLevelLedger(delta=cfg.dp_delta, population=num_sites) if z > 0 else None
    if ledger is None:
        logger.warning("client-dp-noise-multiplier = 0: updates are clipped but no noise is added (no DP guarantee).")
    if cfg.client_dp == "fixed":
        return AccountedFixedClipping(
            strategy, noise_multiplier=z, clipping_norm=cfg.client_dp_clipping_norm,
            num_sampled_clients=sampled, ledger=ledger,
        )
    # Flower's default count noise (sites/20, Andrew et al.'s choice for thousands of clients)
    # needs noise_multiplier < sites/10: with a few hospitals that is almost never true. Then
    # the count noise is set to the noise multiplier (the update noise grows by 2/sqrt(3)).
    count_stddev = None if z < sampled / 10 else z
    return AccountedAdaptiveClipping(
        strategy, noise_multiplier=z, num_sampled_clients=sampled,
        initial_clipping_norm=cfg.client_dp_clipping_norm, clipped_count_stddev=count_stddev, ledger=ledger,
    )


class ClientLevelLedger:
    """Cumulative client-level privacy of the released global models (Flower's ``RdpAccountant``).

    Each round that releases a noised aggregate composes one Gaussian event. Flower's own
    accounted DP wrappers require equal client weights; medfed keeps FedAvg's example
    weighting and accounts for it: with weights ``w_i = n_i / sum n`` the sensitivity of the
    weighted mean to one site's clipped update is ``C max_i w_i`` instead of ``C / m``, so the
    effective noise multiplier is ``z / (m max_i w_i)`` (``z`` when the sites are equal; the
    weights are treated as public, as the server sees every site's example count). Sampling is
    accounted without amplification (``SamplingMethod.NO_AMPLIFICATION``, as Flower's wrappers
    require), under add-or-remove-one-site neighbouring.

    Parameters
    ----------
    delta
        The delta epsilon is reported at (``dp-delta``).
    population
        Number of sites in the federation.
    """

    def __init__(self, *, delta: float, population: int) -> None:
        from flwr.serverapp import RdpAccountant  # lazy: needs the optional dp-accounting package

        self.population = population
        self.accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=delta,
                population_size=population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )

    def state_dict(self) -> dict[str, object]:
        """The accountant's JSON-serialisable state (Flower's ``RdpAccountant.state_dict``)."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Continue from :meth:`state_dict` (same delta and population, or Flower raises)."""
        self.accountant.load_state_dict(state)

    def release(
        self,
        *,
        results: list[tuple[ClientProxy, FitRes]],
        update_noise_multiplier: float,
        num_sampled: int,
        count_stddev: float | None = None,
    ) -> dict[str, Scalar]:
        """Compose one round's release; return the ``client-dp-*`` metrics to record.

        Parameters
        ----------
        results
            The aggregated sites (their ``num_examples`` are the FedAvg weights).
        update_noise_multiplier
            Noise standard deviation over ``clipping_norm / num_sampled`` added to the aggregate.
        num_sampled
            The ``num_sampled_clients`` the noise was calibrated with.
        count_stddev
            Adaptive clipping: standard deviation of the noise on the count of unclipped updates.
        """
        weights = [float(res.num_examples) for _, res in results]
        max_share = max(weights) / sum(weights) if sum(weights) > 0 else 1.0
        z = update_noise_multiplier / (num_sampled * max_share)
        if count_stddev:
            z = (z**-2 + (2.0 * count_stddev) ** -2) ** -0.5
        self.accountant.compose(
            GaussianPrivacyEvent(
                noise_multiplier=z, sample_size=min(len(results), self.population), population_size=self.population
            )
        )
        spent = self.accountant.get_privacy_spent()
        logger.info("client-level privacy: epsilon %.4g at delta %g after %d releases", spent.epsilon, spent.delta, spent.num_releases)
        return {
            "client-dp-epsilon": spent.epsilon,
            "client-dp-delta": spent.delta,
            "client-dp-noise-multiplier": z,
            "client-dp-releases": spent.num_releases,
        }


class AccountedFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper that records the client-level epsilon.

    Parameters
    ----------
    ledger
        Where each noised release is composed (``None``: no accounting, e.g. zero noise).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        ledger: ClientLevelLedger | None,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.ledger = ledger

    def resume_state(self) -> dict[str, object]:
        """The client-level accountant's state (see ``medfed.server.resume``)."""
        return {"ledger": self.ledger.state_dict() if self.ledger is not None else None}

    def load_resume_state(self, state: dict[str, object]) -> None:
        """Continue from :meth:`resume_state`."""
        if self.ledger is not None and state["ledger"] is not None:
            self.ledger.load_state_dict(state["ledger"])  # type: ignore[arg-type]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's aggregation and noise; then account for the release."""
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is None:
            return params, metrics
        metrics = {**metrics, "client-dp-clipping-norm": self.clipping_norm}
        if self.ledger is not None:
            metrics.update(
                self.ledger.release(
                    results=results, update_noise_multiplier=self.noise_multiplier, num_sampled=self.num_sampled_clients
                )
            )
        return params, metrics


class AccountedAdaptiveClipping(DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive-clipping DP wrapper, noise fixed, epsilon recorded.

    Flower 1.42's ``aggregate_fit`` updates the clipping norm from this round's norm bits
    *before* adding the noise, so the noise is calibrated to the next round's norm; when the
    norm shrinks, the round gets less noise than its sites' updates were clipped for. This
    subclass adds the noise with the norm the sites clipped with, then updates the norm.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        num_sampled_clients: int,
        initial_clipping_norm: float,
        clipped_count_stddev: float | None,
        ledger: ClientLevelLedger | None,
    ) -> None:
        super().__init__(
            strategy,
            noise_multiplier,
            num_sampled_clients,
            initial_clipping_norm=initial_clipping_norm,
            clipped_count_stddev=clipped_count_stddev,
        )
        self.ledger = ledger

    def resume_state(self) -> dict[str, object]:
        """The adapted clipping norm and the client-level accountant's state (see ``medfed.server.resume``)."""
        return {
            "clipping_norm": float(self.clipping_norm),
            "ledger": self.ledger.state_dict() if self.ledger is not None else None,
        }

    def load_resume_state(self, state: dict[str, object]) -> None:
        """Continue from :meth:`resume_state`."""
        self.clipping_norm = float(state["clipping_norm"])  # type: ignore[arg-type]
        if self.ledger is not None and state["ledger"] is not None:
            self.ledger.load_state_dict(state["ledger"])  # type: ignore[arg-type]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate, add noise for this round's norm, update the norm, account."""
        if failures:
            logger.warning("round %d: %d site(s) failed; no DP release this round.", server_round, len(failures))
            return None, {}
        if len(results) != self.num_sampled_clients:
            logger.warning(
                "round %d: %d sites returned updates but the noise is calibrated for %d.",
                server_round, len(results), self.num_sampled_clients,
            )
        round_norm = self.clipping_norm
        params, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        self._update_clip_norm(results)
        if not params:
            return params, metrics
        params = add_gaussian_noise_to_params(params, self.noise_multiplier, round_norm, self.num_sampled_clients)
        metrics = {**metrics, "client-dp-clipping-norm": round_norm, "client-dp-next-clipping-norm": self.clipping_norm}
        if self.ledger is not None:
            metrics.update(
                self.ledger.release(
                    results=results,
                    update_noise_multiplier=self.noise_multiplier,
                    num_sampled=self.num_sampled_clients,
                    count_stddev=self.clipped_count_stddev,
                )
            )
        return params, metrics

