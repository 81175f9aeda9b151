"""A deployed site's privacy policy, and the one check of a run against it.

The policy comes from the site's ``site.toml`` (through the SuperNode's node config, which
stays on the site), never from the coordinator's run config. :func:`check_run` compares a run
config with it and lists every way the run asks for *less* privacy than the site allows. The
site's ClientApp refuses such a run before training (:meth:`medfed.client.site_client.SiteClient.fit`),
and ``medfed site check --run-config`` prints the same list as a dry run.

What the policy covers:

``require-dp``
    The run must train with DP-SGD (``dp = true``).
``dp-budget-epsilon``
    The most epsilon the site's data ever spends (over all runs: one ledger per datalist). A
    run's ``dp-target-epsilon`` above it is refused; a run's ``dp-budget-epsilon`` only ever
    lowers it.
``dp-max-delta``
    The largest ``dp-delta`` accepted.
``dp-min-noise-multiplier``
    The smallest noise multiplier accepted: the run's ``dp-noise-multiplier``, or with
    ``dp-target-epsilon > 0`` the one the site derives from it for its own data.
``dp-require-secure-noise``
    ``dp-secure-noise`` must be on (noise drawn from the OS CSPRNG, not from the run's seed).
``ledger-dir``
    The site's folder for its privacy ledgers (the run's ``ledger-dir`` and ``run-dir`` are
    ignored at a deployed site).
``cross-site-min-count``
    The smallest subgroup the site reports in cross-site evaluation (``0``: the run's
    ``cross-site-min-count``); it only ever raises the run's (:mod:`medfed.client.cross_site`).

A run with ``dp-accountant = "gdp"`` is also refused: Opacus's GDP accountant may under-estimate
epsilon and cannot compose the different noise levels of several runs in one ledger.

This module never imports Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medfed.shared.config import ConfigError, RunConfig
from medfed.shared.refusals import refusal_metrics

__all__ = ["POLICY_NODE_KEYS", "SitePolicy", "Violation", "check_run", "policy_problems", "violation_metrics"]

POLICY_NODE_KEYS: tuple[str, ...] = (
    "require-dp",
    "dp-budget-epsilon",
    "dp-max-delta",
    "dp-min-noise-multiplier",
    "dp-require-secure-noise",
    "ledger-dir",
    "cross-site-min-count",
)
"""The node-config (and ``site.toml``) keys of a site's policy."""

SAFE_ACCOUNTANTS = ("rdp", "prv")
"""Accountants a deployed site accepts."""


@dataclass(frozen=True)
class SitePolicy:
    """What a deployed site requires of every run, whatever the run config says.

    Parameters
    ----------
    require_dp
        Refuse runs without DP-SGD.
    budget_epsilon
        The site's epsilon budget over all runs (> 0, finite).
    max_delta
        Largest accepted ``dp-delta``, in (0, 1).
    min_noise_multiplier
        Smallest accepted DP-SGD noise multiplier (>= 0; 0: any noise > 0).
    require_secure_noise
        Refuse ``dp-secure-noise = false``.
    ledger_dir
        Absolute folder of the site's ledgers (``""``: none given, e.g. a dry run).
    cross_site_min_count
        The smallest subgroup the site reports in cross-site evaluation (``0``: the run's
        ``cross-site-min-count``; otherwise >= 2); the larger of the two applies.
    """

    require_dp: bool = False
    budget_epsilon: float = 8.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.0
    require_secure_noise: bool = True
    ledger_dir: str = ""
    cross_site_min_count: int = 0

    def __post_init__(self) -> None:
        problems = policy_problems(
            budget_epsilon=self.budget_epsilon, max_delta=self.max_delta, min_noise_multiplier=self.min_noise_multiplier
        )
        if self.cross_site_min_count == 1 or self.cross_site_min_count < 0:
            problems.append(("cross-site-min-count", f"{self.cross_site_min_count!r} is invalid: use 0 (the run's) or an integer >= 2."))
        if problems:
            raise ConfigError(" ".join(f"{key}: {text}" for key, text in problems))

    def to_node_config(self) -> dict[str, str]:
        """The policy as node-config items (TOML literals, see ``node_config_arg``)."""
        for char in ('"', "'"):
            if char in self.ledger_dir:
                raise ConfigError("ledger-dir must not contain quotes (Flower's node config cannot hold them).")
        items = {
            "require-dp": "true" if self.require_dp else "false",
            "dp-budget-epsilon": repr(float(self.budget_epsilon)),
            "dp-max-delta": repr(float(self.max_delta)),
            "dp-min-noise-multiplier": repr(float(self.min_noise_multiplier)),
            "dp-require-secure-noise": "true" if self.require_secure_noise else "false",
            "ledger-dir": f'"{self.ledger_dir}"',
        }
        if self.cross_site_min_count:  # 0: the run's (the key's absence says so)
            items["cross-site-min-count"] = str(int(self.cross_site_min_count))
        return items

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        """Read the policy ``medfed site start`` put in the node config (absent keys: the defaults).

        Raises
        ------
        ConfigError
            A value of the wrong type or out of range (fix it in ``site.toml``).
        """
        default = cls()

        def flag(key: str, fallback: bool) -> bool:
            value = node_config.get(key, fallback)
            if not isinstance(value, bool):
                raise ConfigError(f"node config {key} = {value!r} is invalid: expected true or false (set it in site.toml).")
            return value

        def number(key: str, fallback: float) -> float:
            value = node_config.get(key, fallback)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"node config {key} = {value!r} is invalid: expected a number (set it in site.toml).")
            return float(value)

        ledger_dir = node_config.get("ledger-dir", "")
        if not isinstance(ledger_dir, str):
            raise ConfigError(f"node config ledger-dir = {ledger_dir!r} is invalid: expected a folder path.")
        try:
            return cls(
                require_dp=flag("require-dp", default.require_dp),
                budget_epsilon=number("dp-budget-epsilon", default.budget_epsilon),
                max_delta=number("dp-max-delta", default.max_delta),
                min_noise_multiplier=number("dp-min-noise-multiplier", default.min_noise_multiplier),
                require_secure_noise=flag("dp-require-secure-noise", default.require_secure_noise),
                ledger_dir=ledger_dir,
                cross_site_min_count=int(number("cross-site-min-count", default.cross_site_min_count)),
            )
        except ConfigError as err:
            raise ConfigError(f"node config: {err} (set it in site.toml).") from None


def policy_problems(*, budget_epsilon: float, max_delta: float, min_noise_multiplier: float) -> list[tuple[str, str]]:
    """``(key, what is wrong)`` for each out-of-range policy number (empty: all valid)."""
    problems: list[tuple[str, str]] = []
    if not (math.isfinite(budget_epsilon) and budget_epsilon > 0):
        problems.append(("dp-budget-epsilon", f"{budget_epsilon!r} is invalid: it must be > 0 and finite."))
    if not 0 < max_delta < 1:
        problems.append(("dp-max-delta", f"{max_delta!r} is invalid: it must lie in (0, 1), e.g. 1e-5."))
    if not (math.isfinite(min_noise_multiplier) and min_noise_multiplier >= 0):
        problems.append(("dp-min-noise-multiplier", f"{min_noise_multiplier!r} is invalid: it must be >= 0 and finite."))
    return problems


@dataclass(frozen=True)
class Violation:
    """One way a run asks for less privacy than a site's policy allows.

    Parameters
    ----------
    key
        The run-config key (``"dp"``, ``"dp-delta"``, ``"dp-secure-noise"``, ...).
    run_value
        What the run asks for.
    limit
        The site's limit, as text (``"<= 1e-05"``).
    policy_key
        The ``site.toml`` key that sets the limit (``""``: a rule of every deployed site).
    """

    key: str
    run_value: object
    limit: str
    policy_key: str

    def __str__(self) -> str:
        value = str(self.run_value).lower() if isinstance(self.run_value, bool) else repr(self.run_value)
        source = f"{self.policy_key} in site.toml" if self.policy_key else "every deployed site's rule"
        return f"{self.key} = {value}, the site's limit is {self.key} {self.limit} ({source})"


def check_run(policy: SitePolicy, cfg: RunConfig, *, noise_multiplier: float | None = None) -> list[Violation]:
    """Every way ``cfg`` asks for less privacy than ``policy`` allows (empty: the run is accepted).

    The DP keys are checked whenever the run uses DP-SGD or the policy requires it, so a run
    with ``dp = false`` against ``require-dp = true`` also names its too-large ``dp-delta``.

    Parameters
    ----------
    policy
        The site's policy.
    cfg
        The proposed run.
    noise_multiplier
        The noise multiplier the site would train with (derived from ``dp-target-epsilon`` for
        the site's own data); ``None``: only ``dp-noise-multiplier`` is checked, and only when
        ``dp-target-epsilon = 0``.
    """
    out: list[Violation] = []
    if policy.require_dp and not cfg.dp:
        out.append(Violation("dp", False, "= true", "require-dp"))
    if not (cfg.dp or policy.require_dp):
        return out
    if cfg.dp_delta > policy.max_delta:
        out.append(Violation("dp-delta", cfg.dp_delta, f"<= {policy.max_delta:g}", "dp-max-delta"))
    if policy.require_secure_noise and not cfg.dp_secure_noise:
        out.append(Violation("dp-secure-noise", False, "= true", "dp-require-secure-noise"))
    if cfg.dp_target_epsilon > policy.budget_epsilon:
        out.append(
            Violation("dp-target-epsilon", cfg.dp_target_epsilon, f"<= {policy.budget_epsilon:g}", "dp-budget-epsilon")
        )
    if cfg.dp_accountant not in SAFE_ACCOUNTANTS:
        out.append(
            Violation("dp-accountant", cfg.dp_accountant, "in " + " or ".join(repr(a) for a in SAFE_ACCOUNTANTS), "")
        )
    limit = f">= {policy.min_noise_multiplier:g}"
    if cfg.dp_target_epsilon <= 0:
        noise = cfg.dp_noise_multiplier if noise_multiplier is None else noise_multiplier
        if noise < policy.min_noise_multiplier:
            out.append(Violation("dp-noise-multiplier", noise, limit, "dp-min-noise-multiplier"))
    elif noise_multiplier is not None and noise_multiplier < policy.min_noise_multiplier:
        out.append(
            Violation(
                "dp-target-epsilon",
                cfg.dp_target_epsilon,
                f"low enough for a noise multiplier {limit} on this site's data (it gives {noise_multiplier:.4g})",
                "dp-min-noise-multiplier",
            )
        )
    return out


def violation_metrics(violations: list[Violation]) -> dict[str, int]:
    """The metrics a refusing site sends (:func:`medfed.shared.refusals.refusal_metrics` of the keys)."""
    return refusal_metrics(v.key for v in violations)
