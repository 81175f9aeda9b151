"""The Flower NumPyClient of one hospital site: local training and validation.

Only model-shaped arrays and scalar metrics leave the site: never an image, a label, a file
name or a path.

With ``dp = true`` every round trains with sample-level DP-SGD (Opacus, Poisson sampling) and is
charged to the site's persistent :class:`~medfed.shared.privacy.PrivacyLedger`; a round that would take
the site past ``dp-budget-epsilon`` is declined (see :meth:`SiteClient.fit`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient

from medfed.client.cross_site import site_cross_site
from medfed.client.site_data import SiteData
from medfed.client.site_policy import SitePolicy, Violation, check_run, violation_metrics
from medfed.shared.config import RunConfig
from medfed.shared.cross_site import MIN_COUNT, is_cross_site
from medfed.shared.models import validate_for_dp
from medfed.shared.precision import eval_dtype
from medfed.shared.preflight import dp_setup_problems
from medfed.shared.privacy import (
    PrivacyBudget,
    PrivacyLedger,
    make_private_training,
    planned_noise_multiplier,
    poisson_schedule,
    secure_generator,
    site_ledger_path,
)
from medfed.shared.round_config import server_round_of
from medfed.shared.scaffold import TRAIN_STEPS, path_length, site_control_update
from medfed.shared.seeding import seed_everything
from medfed.shared.site_state import SiteState, site_state_path
from medfed.shared.task import round_settings, trainable_model_for, training_criterion
from medfed.shared.trainable import trainable_parameters
from medfed.shared.training import (
    TrainSettings,
    evaluate,
    make_loss,
    make_optimizer,
    make_train_loader,
    reestimate_bn,
    select_device,
    train_epochs,
)
from medfed.shared.weights import batchnorm_entries, get_weights, set_weights, trainable_mask

__all__ = ["SiteClient", "DP_DECLINED", "SKIPPED_FILES", "TRAIN_STEPS"]

SKIPPED_FILES = "skipped-files"
"""Fit metric: unusable datalist entries the site left out (``bad-data = "skip"``); a count,
never names."""

DP_DECLINED = "dp-declined"
"""Fit metric: 1 when the site declined the round to stay within its privacy budget, else 0.
A declined round returns the received weights unchanged with ``num_examples = 0``."""

logger = logging.getLogger(__name__)


_WARNED: set[tuple[str, int]] = set()


def _first_time(topic: str, site_index: int) -> bool:
    """Whether this process has not yet warned about ``topic`` for this site (a simulated site
    is rebuilt every round; its start-up warnings need saying once)."""
    if (topic, site_index) in _WARNED:
        return False
    _WARNED.add((topic, site_index))
    return True


class SiteClient(NumPyClient):
    """Trains and evaluates the global model on one site's data.

    Parameters
    ----------
    cfg
        The run configuration (the same at every site and at the server).
    data
        This site's training and validation sets.
    site_index
        Position of this site in the federation (``partition-id`` in simulation); reported
        back so the server can order results deterministically.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda[:N]"``.
    grad_sample_mode
        Opacus per-sample gradient mode for DP-SGD; ``None``: ``cfg.dp_grad_sample_mode``.
    policy
        A deployed site's privacy policy: every round first checks ``cfg`` against it and
        refuses a run that asks for less privacy (see :meth:`fit`). ``None`` (simulation): the
        run config is the policy.
    ledger_path
        The site's ledger file (a deployed site: its one ledger per datalist); ``None``:
        :func:`~medfed.shared.privacy.site_ledger_path` of ``cfg`` (simulation).

    Raises
    ------
    ValueError
        With ``cfg.dp``: a model Opacus cannot train (``norm = "batch"``: use ``"group"``), or
        neither a noise multiplier nor a target epsilon.
    """

    def __init__(
        self,
        *,
        cfg: RunConfig,
        data: SiteData,
        site_index: int,
        device: str = "auto",
        grad_sample_mode: str | None = None,
        policy: SitePolicy | None = None,
        ledger_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.data = data
        self.site_index = site_index
        self.device = select_device(device)
        # eval-precision: the autocast dtype of this site's evaluation and BatchNorm passes (None: fp32)
        self.eval_dtype = eval_dtype(cfg.eval_precision, device=self.device, task=data.train.task)
        self.grad_sample_mode = grad_sample_mode or cfg.dp_grad_sample_mode
        seed_everything(cfg.seed)  # identical initial weights at every site and the server
        # ``trainable``: the parameters the run does not fine-tune are frozen (and, under DP-SGD,
        # get no per-sample gradients)
        self.model, self.trainable = trainable_model_for(cfg, data.train)
        if ledger_path is None and cfg.dp:
            if policy is not None:
                raise ValueError("a deployed site needs its own ledger_path (from its site.toml's ledger-dir).")
            ledger_path = site_ledger_path(cfg, site_index=site_index)
        self.ledger_path = ledger_path if cfg.dp else None
        self._noise_multiplier: float | None = None
        stats, affine = batchnorm_entries(self.model)
        self.local_entries: list[int] = {"global": [], "local-stats": stats, "fedbn": sorted(stats + affine)}[cfg.bn_mode]
        """State entries that stay at the site (``bn-mode``): the site sends back the received values."""
        needs_state = bool(self.local_entries) or cfg.strategy == "scaffold"
        self.state_path = site_state_path(cfg, site_index=site_index) if needs_state else None
        if cfg.dp:
            validate_for_dp(self.model)  # fail at start-up, not in round 1
            problems = dp_setup_problems(cfg.replace(dp_grad_sample_mode=self.grad_sample_mode), task=data.train.task)
            if problems:
                raise ValueError(" ".join(problems))
            if policy is not None:
                return  # a deployed site's policy decides (fit refuses what it forbids)
            if not cfg.dp_secure_noise and _first_time("insecure-noise", site_index):
                logger.warning(
                    "site %d: dp-secure-noise = false: DP-SGD noise and Poisson sampling come from "
                    "a generator seeded from the run's seed. Anyone who knows the seed can remove "
                    "the noise; use this for experiments only.",
                    site_index,
                )
            if cfg.dp_target_epsilon > cfg.dp_budget_epsilon and _first_time("target-over-budget", site_index):
                logger.warning(
                    "site %d: dp-target-epsilon = %g exceeds dp-budget-epsilon = %g: the site will "
                    "decline the rounds that would exceed its budget.",
                    site_index,
                    cfg.dp_target_epsilon,
                    cfg.dp_budget_epsilon,
                )

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """The current local model state."""
        return get_weights(self.model)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, float | int]]:
        """Train the global model ``parameters`` locally; return the new state.

        The metrics always carry ``site-index`` and ``skipped-files`` (unusable datalist
        entries left out under ``bad-data = "skip"``, else 0).

        A deployed site first checks the run against its privacy policy
        (:func:`~medfed.client.site_policy.check_run`, with the noise multiplier it would
        derive for its data). A run that asks for less privacy is refused before any training:
        the site logs an ERROR naming each key, the run's value and the site's limit, and
        returns ``parameters`` unchanged (the coordinator's own model: nothing trained on the
        site's data, and a zero update under SecAgg+) with ``num_examples = 0``,
        ``policy-refused = 1`` and ``policy-refused-<key> = 1`` per violated key. It is never
        silently weakened, and nothing is charged to the ledger.

        With ``cfg.dp`` the round is DP-SGD, and the site first asks its ledger whether one more
        round would exceed ``(dp-budget-epsilon, dp-delta)``. If it would, the site declines:
        it logs a warning and returns ``parameters`` unchanged with ``num_examples = 0`` and
        ``dp-declined = 1`` (a weighted average gives it no weight). Otherwise it trains,
        charges the steps to the ledger, saves it, and reports ``dp-epsilon`` (cumulative),
        ``dp-delta``, ``dp-budget-epsilon``, ``dp-noise-multiplier``, ``dp-sample-rate``,
        ``dp-steps`` and ``dp-declined = 0``. Under DP the training loss and time are not sent (they
        are not private); the number of examples is, as Opacus's sample rate treats it as public.
        """
        num_entries = len(self.model.state_dict())
        control = None
        if self.cfg.strategy == "scaffold":
            # the server sends the weights, then its control variate (none in a direct call: c = 0)
            if len(parameters) == 2 * num_entries:
                parameters, control = list(parameters[:num_entries]), list(parameters[num_entries:])
            else:
                control = [np.zeros(np.shape(p), dtype=np.float32) for p in parameters]
        server_round = server_round_of(config)
        violations = self.policy_violations(server_round=server_round)
        if violations:
            return parameters, 0, self._refuse(violations, step="training", server_round=server_round)
        set_weights(self.model, parameters)
        settings = round_settings(self.cfg, server_round=server_round, site_index=self.site_index)
        seed_everything(settings.seed)
        loader = make_train_loader(self.data.train, settings)
        if self.cfg.dp:
            return self._fit_private(parameters, loader=loader, settings=settings, server_round=server_round)
        state = SiteState(self.state_path).before(server_round) if self.state_path else {}
        self._load_local_entries(state)
        corrections = None
        site_control: list[np.ndarray] = []
        if control is not None:
            site_control = state.get("control") or [np.zeros(np.shape(c), dtype=np.float32) for c in control]
            mask = trainable_mask(self.model)
            corrections = [
                torch.as_tensor(np.asarray(c, dtype=np.float32) - ci)
                for c, ci, keep in zip(control, site_control, mask, strict=True)
                if keep
            ]
        optimizer = make_optimizer(
            trainable_parameters(self.model),
            name=settings.optimizer,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
        )
        global_params = [p.detach().clone() for p in trainable_parameters(self.model)]
        result = train_epochs(
            self.model,
            loader,
            optimizer,
            task=self.data.train.task,
            epochs=settings.epochs,
            device=self.device,
            proximal_mu=settings.proximal_mu,
            global_params=global_params,
            criterion=self._criterion(),
            gradient_correction=corrections,
            bn_dtype=self.eval_dtype,
        )
        logger.info(
            "site %d round %d: trained %d steps, loss %.4f", self.site_index, server_round, result.steps, result.loss
        )
        metrics: dict[str, float | int] = {
            "site-index": self.site_index,
            SKIPPED_FILES: self.data.skipped_files,
            "train-loss": result.loss,
            "train-seconds": result.seconds,
            "learning-rate": settings.learning_rate,
            TRAIN_STEPS: result.steps,
        }
        trained = get_weights(self.model)
        if self.state_path is not None:
            saved: dict[str, list[np.ndarray]] = {"local": [trained[i] for i in self.local_entries]}
            if control is not None:
                saved["control"] = site_control_update(
                    site_control=site_control, control=control, global_weights=parameters, local_weights=trained,
                    length=path_length(
                        optimizer=settings.optimizer, learning_rate=settings.learning_rate, steps=result.steps
                    ),
                )
            SiteState(self.state_path).save(server_round, saved)
        for i in self.local_entries:  # kept at the site: the received values go back
            trained[i] = np.asarray(parameters[i]).copy()
        return trained, result.num_examples, metrics

    def cross_site_min_count(self, config: dict[str, Any]) -> int:
        """The smallest subgroup this site reports: the largest of the run's ``cross-site-min-count``
        (config and the evaluate message) and its policy's."""
        asked = config.get(MIN_COUNT, 0)
        asked = int(asked) if isinstance(asked, (int, float)) and not isinstance(asked, bool) else 0
        policy = self.policy.cross_site_min_count if self.policy is not None else 0
        return max(self.cfg.cross_site_min_count, asked, policy)

    def _criterion(self) -> torch.nn.Module:
        """The training loss of ``loss`` (label-skew corrections use this site's class counts)."""
        return training_criterion(self.cfg, self.data.train)

    def _load_local_entries(self, state: dict[str, list[np.ndarray]]) -> bool:
        """Put this site's own values of the ``bn-mode`` local entries into the model; whether
        it had any (none before its first round)."""
        local = state.get("local")
        if not self.local_entries or not local:
            return False
        weights = get_weights(self.model)
        for i, value in zip(self.local_entries, local, strict=True):
            weights[i] = value
        set_weights(self.model, weights)
        return True

    # ------------------------------------------------------------------ DP-SGD
    def noise_multiplier(self, *, steps_per_round: int, sample_rate: float) -> float:
        """The DP-SGD noise multiplier: ``dp-noise-multiplier``, or with ``dp-target-epsilon > 0``
        the one that spends that epsilon over all ``num-server-rounds`` planned rounds
        (:func:`~medfed.shared.privacy.planned_noise_multiplier`)."""
        if self._noise_multiplier is None:
            self._noise_multiplier = planned_noise_multiplier(
                self.cfg, sample_rate=sample_rate, steps_per_round=steps_per_round
            )
            if self.cfg.dp_target_epsilon > 0:
                logger.info(
                    "site %d: noise multiplier %.4f spends dp-target-epsilon = %g over %d rounds",
                    self.site_index,
                    self._noise_multiplier,
                    self.cfg.dp_target_epsilon,
                    self.cfg.num_server_rounds,
                )
        return self._noise_multiplier

    def policy_violations(self, *, server_round: int) -> list[Violation]:
        """How the run asks for less privacy than the site's policy allows (empty: none, or no policy).

        With DP-SGD the check includes the noise multiplier the site would train with on its
        own data (derived from ``dp-target-epsilon`` when that is set).
        """
        if self.policy is None:
            return []
        noise = None
        if self.cfg.dp:
            settings = round_settings(self.cfg, server_round=server_round, site_index=self.site_index)
            schedule = poisson_schedule(make_train_loader(self.data.train, settings))
            noise = self.noise_multiplier(
                steps_per_round=settings.epochs * schedule.steps_per_epoch, sample_rate=schedule.sample_rate
            )
        return check_run(self.policy, self.cfg, noise_multiplier=noise)

    def _refuse(
        self, violations: list[Violation], *, step: str, server_round: int | None = None
    ) -> dict[str, float | int]:
        when = f" in round {server_round}" if server_round is not None else ""
        logger.error(
            "site %d refuses %s%s: the run asks for less privacy than this site's policy allows: %s. "
            "Nothing was trained or evaluated and no weights trained here are sent; the coordinator "
            "must change the run config.",
            self.site_index,
            step,
            when,
            "; ".join(str(v) for v in violations),
        )
        return {"site-index": self.site_index, **violation_metrics(violations)}

    def open_ledger(self) -> PrivacyLedger:
        """This site's ledger, read from disk (empty if the file does not exist yet)."""
        if self.ledger_path is None:
            raise RuntimeError("open_ledger() needs dp = true.")
        return PrivacyLedger.open(self.ledger_path, accountant=self.cfg.dp_accountant)

    def _fit_private(
        self,
        parameters: list[np.ndarray],
        *,
        loader: torch.utils.data.DataLoader,
        settings: TrainSettings,
        server_round: int,
    ) -> tuple[list[np.ndarray], int, dict[str, float | int]]:
        cfg = self.cfg
        budget = PrivacyBudget(epsilon=cfg.dp_budget_epsilon, delta=cfg.dp_delta)
        ledger = self.open_ledger()
        schedule = poisson_schedule(loader)
        steps = settings.epochs * schedule.steps_per_epoch
        noise = self.noise_multiplier(steps_per_round=steps, sample_rate=schedule.sample_rate)
        spent = ledger.epsilon(budget.delta)
        projected = ledger.projected_epsilon(
            delta=budget.delta, steps=steps, sample_rate=schedule.sample_rate, noise_multiplier=noise
        )
        metrics: dict[str, float | int] = {
            "site-index": self.site_index,
            SKIPPED_FILES: self.data.skipped_files,
            "dp-delta": budget.delta,
            "dp-budget-epsilon": budget.epsilon,
            "dp-noise-multiplier": noise,
            "dp-sample-rate": schedule.sample_rate,
        }
        if projected > budget.epsilon:
            logger.warning(
                "site %d declines round %d: its privacy budget would be exceeded (epsilon spent "
                "%.3f, after this round %.3f > dp-budget-epsilon = %g at dp-delta = %g). It sends "
                "the global model back unchanged with no examples.",
                self.site_index,
                server_round,
                spent,
                projected,
                budget.epsilon,
                budget.delta,
            )
            metrics.update({DP_DECLINED: 1, "dp-epsilon": spent, "dp-steps": 0})
            return parameters, 0, metrics

        optimizer = make_optimizer(
            trainable_parameters(self.model),
            name=settings.optimizer,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
        )
        if cfg.dp_secure_noise:
            generator = secure_generator(device=self.device)
            sampling = generator if self.device.type == "cpu" else secure_generator(device="cpu")
        else:
            generator = torch.Generator(device=self.device).manual_seed(settings.seed)
            sampling = generator if self.device.type == "cpu" else torch.Generator().manual_seed(settings.seed)
        global_params = [p.detach().clone() for p in trainable_parameters(self.model)]
        private = make_private_training(
            self.model,
            optimizer,
            loader,
            noise_multiplier=noise,
            max_grad_norm=cfg.dp_max_grad_norm,
            generator=generator,
            grad_sample_mode=self.grad_sample_mode,
            secure_noise=cfg.dp_secure_noise,
            criterion=make_loss(self.data.train.task),
            sampling_generator=sampling,
        )
        try:
            result = train_epochs(
                private.model,
                private.loader,
                private.optimizer,
                task=self.data.train.task,
                epochs=settings.epochs,
                device=self.device,
                proximal_mu=settings.proximal_mu,
                global_params=global_params,
                criterion=private.criterion,
            )
        finally:
            private.close()  # self.model is a plain module again (trained in place)
            # Every noisy step taken is charged, even if training failed part-way.
            entry = ledger.record_round(
                server_round=server_round,
                steps=private.steps_taken,
                sample_rate=private.sample_rate,
                noise_multiplier=private.noise_multiplier,
                delta=budget.delta,
            )
            ledger.save()
        logger.info(
            "site %d round %d: DP-SGD %d steps in %.1f s, loss %.4f, epsilon %.3f of %g (delta %g)",
            self.site_index,
            server_round,
            entry.steps,
            result.seconds,
            result.loss,
            entry.epsilon,
            budget.epsilon,
            budget.delta,
        )
        metrics.update(
            {
                DP_DECLINED: 0,
                "dp-epsilon": entry.epsilon,
                "dp-steps": entry.steps,
                # No "train-loss" (computed on the training data without noise) and no
                # "train-seconds" (it varies with the secret Poisson batch sizes): both would fall
                # outside the DP guarantee. The site logs them locally only.
                "learning-rate": settings.learning_rate,
            }
        )
        return get_weights(self.model), result.num_examples, metrics

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, float | int]]:
        """Evaluate the global model ``parameters`` on this site's validation split.

        A run the site's policy refuses is not evaluated either: loss 0, no examples, the
        refusal metrics (see :meth:`fit`).

        With ``bn-mode`` other than ``"global"`` the site evaluates with its own BatchNorm
        entries (from its site state; before it has trained, statistics re-estimated on its
        training data), as SiloBN and FedBN do.

        With ``cross-site = 1`` in ``config`` the site scores the model on its local test split
        instead, as a whole and per metadata subgroup (:mod:`medfed.client.cross_site`), with
        subgroups below the largest of the run's ``cross-site-min-count`` and the site policy's
        left out.
        """
        violations = self.policy_violations(server_round=1)  # the round changes no privacy setting
        if violations:
            return 0.0, 0, self._refuse(violations, step="evaluation")
        set_weights(self.model, parameters)
        if self.local_entries and self.state_path is not None:
            state = SiteState(self.state_path).before(10**9)
            if not self._load_local_entries(state):
                reestimate_bn(self.model, self.data.train, device=self.device, dtype=self.eval_dtype)
        if is_cross_site(config):
            loss, count, sent = site_cross_site(
                self.model, test=self.data.test, val=self.data.val, config=config,
                min_count=self.cross_site_min_count(config), device=self.device,
            )
            return loss, count, {"site-index": self.site_index, **sent}
        metrics = evaluate(
            self.model, self.data.val, device=self.device, roi_size=self.cfg.patch_size, dtype=self.eval_dtype
        )
        loss = float(metrics.pop("loss"))
        num_examples = int(metrics.pop("num_examples"))
        return loss, num_examples, {"site-index": self.site_index, **metrics}
