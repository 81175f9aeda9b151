"""A deployed site's privacy policy: the coordinator's attacks of issue 15, replayed in process.

Each site here is configured as ``medfed site start`` configures it: a ``site.toml`` read by
:func:`load_site_config`, turned into the SuperNode's node config by :func:`node_config_arg` and
parsed back with Flower's own parser; the site is medfed's ClientApp called with a Flower
``Message`` and ``Context`` (the fast twin of a deployed SuperNode).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.config import parse_config_args
from flwr.compat.common import recorddict_compat as compat
from opacus.accountants import RDPAccountant
from torch import nn
from typer.testing import CliRunner

from medfed.client.cli import site_app
from medfed.client.client_app import _client_fn_for, make_client_app
from medfed.client.site_check import check_run_policy
from medfed.client.site_config import SiteConfigError, load_kit, load_site_config, node_config_arg
from medfed.client.site_policy import SitePolicy, check_run
from medfed.server.dashboard.read_models import RunReader
from medfed.server.provision import provision
from medfed.server.recording import RecordingStrategy
from medfed.server.run_dir import RunDirectory
from medfed.server.store import RunStore, StoreSink
from medfed.shared.config import RunConfig
from medfed.shared.privacy import PrivacyLedger, poisson_schedule_for
from medfed.shared.seeding import seed_everything
from medfed.shared.task import deployment_model
from medfed.shared.weights import get_weights
from tests.support.deploy_support import write_nifti_datalist

RUN = RunConfig(
    dataset="deployment", image_size=16, model="simplecnn", norm="group", num_sites=1, batch_size=4,
    local_epochs=1, num_server_rounds=2, augment=False, dp=True, dp_noise_multiplier=1.1,
)
"""A compliant deployed DP run (dp-delta 1e-5, secure noise)."""

POLICY = 'require-dp = true\ndp-max-delta = 1e-5\ndp-min-noise-multiplier = 1.0\ndp-require-secure-noise = true\n'


@pytest.fixture(scope="module")
def kit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed")
    return provision(root / "fed", sites=["st-mary"], superlink_address="127.0.0.1:9000").federation.sites[0].kit


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nifti_datalist(tmp_path_factory.mktemp("site-data"), seed=3, n_train=12, n_val=4)


def _site_toml(folder: Path, datalist: Path, extra: str = POLICY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.toml"
    path.write_text(f'site-name = "st-mary"\ndatalist = "{datalist}"\ndevice = "cpu"\nledger-dir = "ledgers"\n{extra}')
    return path


def _node_config(kit_dir: Path, site_toml: Path) -> dict:
    """The node config exactly as the SuperNode receives it from ``medfed site start``."""
    return parse_config_args([node_config_arg(load_kit(kit_dir), load_site_config(site_toml))])


def _meta(kind: str) -> Metadata:
    return Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type=kind)


def _weights(cfg: RunConfig) -> list[np.ndarray]:
    """The global model the coordinator sends (as the ServerApp builds it)."""
    seed_everything(cfg.seed)
    return get_weights(deployment_model(cfg))


def _train(node: dict, cfg: RunConfig, server_round: int = 1):
    """One training message through medfed's ClientApp (egress guard and all); the FitRes back."""
    content = compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(_weights(cfg)), {"server-round": server_round}), keep_input=True
    )
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    reply = make_client_app()(Message(content=content, metadata=_meta("train")), context)
    assert not reply.has_error(), reply.error
    return compat.recorddict_to_fitres(reply.content, keep_input=True)


def _evaluate(node: dict, cfg: RunConfig):
    content = compat.evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(_weights(cfg)), {}), keep_input=True)
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    reply = make_client_app()(Message(content=content, metadata=_meta("evaluate")), context)
    assert not reply.has_error(), reply.error
    return compat.recorddict_to_evaluateres(reply.content)


# --------------------------------------------------------------------------- attacks
ATTACKS = [
    # (run-config changes, refused key, the run's value and the site's limit as the log says them)
    ({"dp_delta": 0.5}, "dp-delta", ["dp-delta = 0.5", "dp-delta <= 1e-05", "dp-max-delta"]),
    ({"dp_secure_noise": False}, "dp-secure-noise", ["dp-secure-noise = false", "= true", "dp-require-secure-noise"]),
    ({"dp": False}, "dp", ["dp = false", "dp = true", "require-dp"]),
    ({"dp_noise_multiplier": 0.3}, "dp-noise-multiplier", ["dp-noise-multiplier = 0.3", ">= 1", "dp-min-noise-multiplier"]),
    ({"dp_target_epsilon": 20.0}, "dp-target-epsilon", ["dp-target-epsilon = 20.0", "<= 8", "dp-budget-epsilon"]),
    # within the budget, but the noise the site derives for its 12 images (0.769) is below 1
    ({"dp_target_epsilon": 7.9, "num_server_rounds": 1}, "dp-target-epsilon", ["dp-target-epsilon = 7.9", ">= 1 on this site's data (it gives 0.769", "dp-min-noise-multiplier"]),
    ({"dp_accountant": "gdp"}, "dp-accountant", ["dp-accountant = 'gdp'", "'rdp' or 'prv'"]),
]


@pytest.mark.parametrize(("changes", "key", "said"), ATTACKS, ids=[a[1] + str(i) for i, a in enumerate(ATTACKS)])
def test_a_run_asking_for_less_privacy_is_refused_before_training(
    kit_dir: Path, datalist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, changes: dict, key: str, said: list
) -> None:
    node = _node_config(kit_dir, _site_toml(tmp_path / "site", datalist))
    cfg = RUN.replace(**changes)
    with caplog.at_level(logging.ERROR, logger="medfed.client.site_client"):
        res = _train(node, cfg)
    assert res.num_examples == 0
    assert res.metrics["policy-refused"] == 1 and res.metrics[f"policy-refused-{key}"] == 1
    assert [k for k in res.metrics if k.startswith("policy-refused-")] == [f"policy-refused-{key}"]
    sent = _weights(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(parameters_to_ndarrays(res.parameters), sent, strict=True))
    line = next(r.getMessage() for r in caplog.records if "refuses training" in r.getMessage())
    for text in said:
        assert text in line, line
    assert not (tmp_path / "site" / "ledgers").exists()  # nothing trained, nothing charged
    evaluation = _evaluate(node, cfg)  # nor is the site's validation data used for this run
    assert evaluation.num_examples == 0 and evaluation.metrics["policy-refused"] == 1


def test_the_coordinator_records_the_refusal_as_an_event_and_in_the_summary(
    kit_dir: Path, datalist: Path, tmp_path: Path
) -> None:
    node = _node_config(kit_dir, _site_toml(tmp_path / "site", datalist))
    attack = RUN.replace(dp_delta=0.5)
    refused = _train(node, attack)
    url = f"sqlite:///{tmp_path / 'runs' / 'medfed.db'}"
    run_dir = RunDirectory(tmp_path / "runs" / "run-x", config=attack.to_run_config(), mode="federated",
                           sink=StoreSink(RunStore(url)))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 1)

    from flwr.server.strategy import FedAvg

    strategy = RecordingStrategy(FedAvg(), run_dir=run_dir, model=Model(), primary_metric="auc")
    params, _ = strategy.aggregate_fit(1, [(None, refused)], [])  # type: ignore[list-item]
    assert params is None and strategy.stopped_round == 1  # nothing trained anywhere: the run stops
    summary = strategy.finish()
    assert summary["policy_refused"] == {"site-0": {"round": 1, "keys": ["dp-delta"]}}
    assert "dp-delta" in summary["stopped_early"]["reason"]
    with RunStore(url) as store:
        events = [e for e in RunReader(store).events("run-x") if e["kind"] == "policy-refused"]
        assert len(events) == 1 and "site-0 (dp-delta) refused the run" in events[0]["message"]
        (site,) = RunReader(store).sites("run-x")
        assert site["rounds_refused"] == 1 and site["rounds_declined"] == 0


def test_a_compliant_run_trains_and_charges_the_sites_own_ledger(kit_dir: Path, datalist: Path, tmp_path: Path) -> None:
    node = _node_config(kit_dir, _site_toml(tmp_path / "site", datalist))
    res = _train(node, RUN)
    assert res.num_examples == 12 and "policy-refused" not in res.metrics and res.metrics["dp-declined"] == 0
    (ledger,) = (tmp_path / "site" / "ledgers").iterdir()
    assert ledger.name.startswith("datalist-")
    assert PrivacyLedger.load(ledger).epsilon(RUN.dp_delta) == pytest.approx(res.metrics["dp-epsilon"], rel=1e-9)


def test_secure_noise_is_only_optional_where_the_site_says_so(kit_dir: Path, datalist: Path, tmp_path: Path) -> None:
    relaxed = _site_toml(tmp_path / "site", datalist, POLICY.replace("dp-require-secure-noise = true", "dp-require-secure-noise = false"))
    res = _train(_node_config(kit_dir, relaxed), RUN.replace(dp_secure_noise=False))
    assert res.num_examples == 12 and "policy-refused" not in res.metrics


# --------------------------------------------------------------------------- one ledger per datalist
def _independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def test_one_ledger_per_site_and_datalist_across_runs_seeds_sizes_and_ledger_settings(
    kit_dir: Path, datalist: Path, tmp_path: Path
) -> None:
    """The ledger-path attack: runs with other seeds, image sizes, ledger-dir and run-dir all
    charge the site's one ledger, whose epsilon is one Opacus accountant over all of them."""
    policy = POLICY.replace("dp-min-noise-multiplier = 1.0", "dp-min-noise-multiplier = 0.0")
    site_toml = _site_toml(tmp_path / "site", datalist, policy + "dp-budget-epsilon = 1000.0\n")
    node = _node_config(kit_dir, site_toml)
    base = RUN.replace(dp_budget_epsilon=1000.0)  # a run's budget only ever lowers the site's
    runs = [
        base,
        base.replace(seed=7, ledger_dir=str(tmp_path / "coordinator-says-here"), run_dir=str(tmp_path / "run-b")),
        base.replace(seed=11, image_size=20, batch_size=6, ledger_dir=str(tmp_path / "elsewhere")),
        base.replace(seed=3, dp_target_epsilon=50.0, num_server_rounds=2, run_dir=str(tmp_path / "run-d")),
    ]
    history: list[tuple[float, float, int]] = []
    reported: list[float] = []
    for cfg in runs:
        site = _client_fn_for(None)(Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                                            run_config=cfg.to_run_config())).numpy_client
        weights = site.get_parameters({})
        for server_round in (1, 2):
            weights, n, metrics = site.fit(weights, {"server-round": server_round})
            assert n == 12 and metrics["dp-declined"] == 0
            history.append((metrics["dp-noise-multiplier"], metrics["dp-sample-rate"], int(metrics["dp-steps"])))
            reported.append(metrics["dp-epsilon"])
    assert len({(s, q) for s, q, _ in history}) >= 3  # different noise and sample rates were composed
    assert reported == sorted(reported) and len(set(reported)) == len(reported)  # no run restarts at 0
    ledgers = list((tmp_path / "site" / "ledgers").iterdir())
    assert len(ledgers) == 1
    for folder in ("coordinator-says-here", "elsewhere", "run-b", "run-d"):
        assert not (tmp_path / folder).exists(), folder  # the coordinator made the site create nothing
    expected = _independent_epsilon(history, RUN.dp_delta)
    assert PrivacyLedger.load(ledgers[0]).epsilon(RUN.dp_delta) == pytest.approx(expected, rel=1e-6)
    assert reported[-1] == pytest.approx(expected, rel=1e-6)

    # With its budget now spent, a fresh run (new seed, new ledger-dir) is declined from round 1.
    spent = _site_toml(tmp_path / "site", datalist, policy + f"dp-budget-epsilon = {reported[-1] * 1.001}\n")
    fresh = base.replace(seed=99, ledger_dir=str(tmp_path / "fresh"))
    site = _client_fn_for(None)(Context(run_id=2, node_id=7, node_config=_node_config(kit_dir, spent),
                                        state=RecordDict(), run_config=fresh.to_run_config())).numpy_client
    _, n, metrics = site.fit(site.get_parameters({}), {"server-round": 1})
    assert n == 0 and metrics["dp-declined"] == 1


# --------------------------------------------------------------------------- policy rules
@pytest.mark.parametrize(
    ("policy", "changes", "keys"),
    [
        (SitePolicy(), {}, []),
        (SitePolicy(), {"dp": False}, []),  # no DP required, none used
        (SitePolicy(require_dp=True), {"dp": False}, ["dp"]),
        (SitePolicy(require_dp=True), {"dp": False, "dp_delta": 0.5, "dp_secure_noise": False},
         ["dp", "dp-delta", "dp-secure-noise"]),  # every violation, not the first
        (SitePolicy(max_delta=1e-3), {"dp_delta": 1e-3}, []),  # the limit itself is allowed
        (SitePolicy(max_delta=1e-3), {"dp_delta": 2e-3}, ["dp-delta"]),
        (SitePolicy(require_secure_noise=False), {"dp_secure_noise": False}, []),
        (SitePolicy(min_noise_multiplier=1.1), {"dp_noise_multiplier": 1.1}, []),
        (SitePolicy(min_noise_multiplier=1.2), {"dp_noise_multiplier": 1.1}, ["dp-noise-multiplier"]),
        (SitePolicy(budget_epsilon=3.0), {"dp_target_epsilon": 3.0}, []),
        (SitePolicy(budget_epsilon=3.0), {"dp_target_epsilon": 3.5}, ["dp-target-epsilon"]),
        (SitePolicy(budget_epsilon=3.0), {"dp_budget_epsilon": 50.0}, []),  # the site's own budget applies
        (SitePolicy(), {"dp_accountant": "prv"}, []),
        (SitePolicy(), {"dp_accountant": "gdp"}, ["dp-accountant"]),
    ],
)
def test_check_run_case_table(policy: SitePolicy, changes: dict, keys: list[str]) -> None:
    assert [v.key for v in check_run(policy, RUN.replace(**changes))] == keys


def test_the_derived_noise_is_checked_only_when_known() -> None:
    cfg = RUN.replace(dp_target_epsilon=4.0)
    policy = SitePolicy(min_noise_multiplier=1.0)
    assert check_run(policy, cfg) == []  # the site derives it from its data before training
    assert [v.key for v in check_run(policy, cfg, noise_multiplier=0.8)] == ["dp-target-epsilon"]
    assert check_run(policy, cfg, noise_multiplier=1.0) == []


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("dp-max-delta = 0.0", "dp-max-delta = 0.0 is invalid: it must lie in \\(0, 1\\)"),
        ("dp-max-delta = 1.0", "dp-max-delta = 1.0 is invalid"),
        ("dp-max-delta = -1e-5", "dp-max-delta = -1e-05 is invalid"),
        ("dp-max-delta = nan", "dp-max-delta = nan is invalid"),
        ('dp-max-delta = "1e-5"', "dp-max-delta = '1e-5' is invalid: expected a number"),
        ("dp-min-noise-multiplier = -0.5", "dp-min-noise-multiplier = -0.5 is invalid"),
        ("dp-min-noise-multiplier = inf", "dp-min-noise-multiplier = inf is invalid"),
        ("dp-budget-epsilon = inf", "dp-budget-epsilon = inf is invalid"),
        ("dp-budget-epsilon = -1", "dp-budget-epsilon = -1.0 is invalid: it must be > 0"),
        ('require-dp = "yes"', "require-dp = 'yes' is invalid: expected true or false"),
        ("require-dp = 1", "require-dp = 1 is invalid: expected true or false"),
        ("dp-require-secure-noise = 0", "dp-require-secure-noise = 0 is invalid"),
        ("ledger-dir = 3", "ledger-dir = 3 is invalid: expected a folder path"),
    ],
)
def test_invalid_policy_values_name_the_file_and_key(datalist: Path, tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(f'site-name = "a"\ndatalist = "{datalist}"\n{line}\n')
    with pytest.raises(SiteConfigError, match=match) as err:
        load_site_config(path)
    assert str(path) in str(err.value)


def test_policy_defaults_and_the_kit_template(kit_dir: Path, datalist: Path, tmp_path: Path) -> None:
    bare = _site_toml(tmp_path / "bare", datalist, "")
    site = load_site_config(bare)
    assert site.policy() == SitePolicy(ledger_dir="")  # secure noise and delta <= 1e-5 by default
    template = (kit_dir / "site.toml").read_text().replace("/path/to/datalist.json", str(datalist))
    (tmp_path / "kit-site.toml").write_text(template)
    policy = load_site_config(tmp_path / "kit-site.toml").policy(load_kit(kit_dir))
    assert policy.require_dp and policy.require_secure_noise and policy.max_delta == 1e-5
    assert policy.ledger_dir == str(kit_dir / "state" / "ledgers")


# --------------------------------------------------------------------------- medfed site check --run-config
def _run_toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text('model = "simplecnn"\nimage-size = 16\nnorm = "group"\nbatch-size = 4\n' + body)
    return path


def test_site_check_names_every_violated_key_and_the_limit(datalist: Path, tmp_path: Path) -> None:
    site_toml = _site_toml(tmp_path / "site", datalist)
    bad = _run_toml(tmp_path, "dp = false\ndp-delta = 0.5\ndp-secure-noise = false\n")
    result = CliRunner().invoke(site_app, ["check", "--config", str(site_toml), "--run-config", str(bad)])
    assert result.exit_code == 1, result.output
    violations = [ln.strip() for ln in result.output.splitlines() if ln.strip().startswith("VIOLATION")]
    assert [v.split()[1] for v in violations] == ["dp", "dp-delta", "dp-secure-noise"]
    assert "dp-delta <= 1e-05 (dp-max-delta in site.toml)" in result.output
    assert "require-dp in site.toml" in result.output and "dp-require-secure-noise in site.toml" in result.output
    assert "REFUSED: 3 policy violation(s)" in result.output

    good = _run_toml(tmp_path, "dp = true\ndp-noise-multiplier = 1.1\n")
    result = CliRunner().invoke(site_app, ["check", "--config", str(site_toml), "--run-config", str(good)])
    assert result.exit_code == 0, result.output
    assert "ACCEPTED" in result.output and "VIOLATION" not in result.output

    typo = _run_toml(tmp_path, "dp-delt = 0.5\n")
    result = CliRunner().invoke(site_app, ["check", "--config", str(site_toml), "--run-config", str(typo)])
    assert result.exit_code == 2 and "dp-delt" in result.output and "dp-delta" in result.output


def test_site_check_derives_the_same_noise_as_the_site(kit_dir: Path, datalist: Path, tmp_path: Path) -> None:
    cfg = RUN.replace(dp_target_epsilon=6.0)
    node = _node_config(kit_dir, _site_toml(tmp_path / "site", datalist))
    site = _client_fn_for(None)(Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                                        run_config=cfg.to_run_config())).numpy_client
    assert site.policy_violations(server_round=1) == []
    dry = check_run_policy(SitePolicy.from_node_config(node), cfg, training_examples=12)
    schedule = poisson_schedule_for(num_samples=12, batch_size=cfg.batch_size)
    noise = site.noise_multiplier(steps_per_round=schedule.steps_per_epoch, sample_rate=schedule.sample_rate)
    assert dry.accepted and dry.noise_multiplier == noise
    strict = check_run_policy(SitePolicy(min_noise_multiplier=dry.noise_multiplier + 0.1), cfg, training_examples=12)
    assert [v.key for v in strict.violations] == ["dp-target-epsilon"]
