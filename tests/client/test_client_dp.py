"""Client mods for SecAgg+ and client-level DP: order, run-config dispatch, clipping of real model state."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.client.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from medfed.client.client_app import make_client_app, privacy_mods, run_config_privacy_mod
from medfed.client.egress import egress_guard
from medfed.client.secagg_packed import packed_secaggplus_mod
from medfed.client.update_mods import CLIPPED_METRIC, SecAggWeightError, freeze_counters_mod, make_update_mod
from medfed.shared.config import RunConfig
from medfed.shared.models import build_model
from medfed.shared.weights import get_weights

CLIP = "clipping_norm"  # the key Flower's DP wrappers send the norm under


def _names(mods: list) -> list[str]:
    return [getattr(m, "__qualname__", repr(m)).split(".")[0] for m in mods]


@pytest.mark.parametrize(
    ("secagg", "client_dp", "expected"),
    [
        (False, "off", []),
        (True, "off", ["packed_secaggplus_mod", "make_update_mod"]),
        (False, "fixed", ["make_update_mod", "fixedclipping_mod", "freeze_counters_mod"]),
        (True, "adaptive", ["packed_secaggplus_mod", "make_update_mod", "adaptiveclipping_mod", "freeze_counters_mod"]),
    ],
)
def test_privacy_mods_follow_the_config_in_order(secagg: bool, client_dp: str, expected: list[str]) -> None:
    mods = privacy_mods(RunConfig(secagg=secagg, client_dp=client_dp))
    assert _names(mods) == expected
    app = make_client_app(RunConfig(secagg=secagg, client_dp=client_dp))
    assert app._mods[0] is egress_guard and len(app._mods) == len(expected) + 1  # the guard sees every reply first


def test_without_a_fixed_config_the_mods_come_from_the_run_config() -> None:
    app = make_client_app()
    assert app._mods == [egress_guard, run_config_privacy_mod]


# --------------------------------------------------------------------------- one training message
def _model_state() -> list[np.ndarray]:
    """A real medfed model's state: float weights, BatchNorm statistics and int64 step counters."""
    model = build_model("simplecnn", spatial_dims=2, in_channels=1, out_channels=2, norm="batch", image_size=(16, 16))
    return get_weights(model)


def _train_message(weights: list[np.ndarray], config: dict) -> Message:
    meta = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), config), keep_input=True)
    return Message(content=content, metadata=meta)


def _context(run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config or {})


def _trainer(update_scale: float, num_examples: int = 40, steps: int = 5):
    """A call_next that 'trains': adds a fixed update to the floats and ``steps`` to the counters."""
    def call_next(msg: Message, ctx: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        weights = parameters_to_ndarrays(fitins.parameters)
        rng = np.random.default_rng(1)
        out = [
            (w + rng.normal(0, update_scale, w.shape)).astype(w.dtype) if w.dtype.kind == "f"
            else np.rint(w).astype(np.int64) + steps  # as SiteClient: set_weights rounds, training counts
            for w in weights
        ]
        res = FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(out), num_examples, {"site-index": 0})
        return Message(content=compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
    return call_next


def _reply_weights(reply: Message) -> list[np.ndarray]:
    return parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, keep_input=True).parameters)


def _update_norm(reply: Message, state: list[np.ndarray]) -> float:
    out = _reply_weights(reply)
    return float(np.sqrt(sum(float(np.sum((o.astype(np.float64) - s.astype(np.float64)) ** 2)) for o, s in zip(out, state, strict=True))))


def test_flower_clipping_alone_lets_batchnorm_counters_escape() -> None:
    """Why medfed wraps the clipping mod: Flower scales each array in place, and a 0-d entry
    (BatchNorm's ``num_batches_tracked``) is a numpy scalar there, so it is never scaled."""
    state = _model_state()
    reply = fixedclipping_mod(_train_message(state, {CLIP: 1.0}), _context(), _trainer(0.05, steps=5))
    assert _update_norm(reply, state) > 5.0  # three counters moved by 5 each, unclipped: norm > 1


@pytest.mark.parametrize("clipping_mod", [fixedclipping_mod, adaptiveclipping_mod])
def test_medfed_mods_clip_the_float_update_and_freeze_the_counters(clipping_mod) -> None:
    state = _model_state()
    cfg = RunConfig(client_dp="fixed" if clipping_mod is fixedclipping_mod else "adaptive")
    chain = [make_update_mod(cfg), clipping_mod, freeze_counters_mod]
    from flwr.client.mod import make_ffn

    reply = make_ffn(_trainer(0.05), chain)(_train_message(state, {CLIP: 1.0}), _context())
    out = _reply_weights(reply)
    assert _update_norm(reply, state) == pytest.approx(1.0, rel=1e-3)  # norm ~8 clipped to 1 (float32 rounding)
    for o, s in zip(out, state, strict=True):
        assert o.dtype == s.dtype  # counters travel as int64 again
        if s.dtype.kind == "i":
            assert np.array_equal(o, s)  # frozen: the step count neither eats the norm nor leaks
    if clipping_mod is adaptiveclipping_mod:
        metrics = compat.recorddict_to_fitres(reply.content, keep_input=True).metrics
        assert metrics["norm_bit"] is True  # the update was clipped, and the server is told so


def test_update_mod_sends_the_update_under_secagg() -> None:
    state = _model_state()
    cfg = RunConfig(secagg=True, secagg_max_weight=100.0)
    reply = make_update_mod(cfg)(_train_message(state, {}), _context(), _trainer(0.01, num_examples=40, steps=3))
    update = _reply_weights(reply)
    for u, s in zip(update, state, strict=True):
        assert u.shape == (s.shape or (1,))  # 0-d entries as shape (1,)
        # float entries in the weights' own dtype (half the bytes of float64 for float32 models); counters float64
        assert u.dtype == (s.dtype if s.dtype.kind == "f" else np.float64)
        if s.dtype.kind == "i":
            assert float(u[0]) == 3.0
    assert 0 < max(float(np.abs(u).max()) for u, s in zip(update, state, strict=True) if s.dtype.kind == "f") < 0.1
    metrics = compat.recorddict_to_fitres(reply.content, keep_input=True).metrics
    assert metrics[CLIPPED_METRIC] == 0


def test_update_mod_counts_what_secagg_will_clip_and_refuses_oversized_sites() -> None:
    state = _model_state()
    # effective range c * W / n = 0.01 * 100 / 50 = 0.02: an update of scale 0.05 is partly clipped
    cfg = RunConfig(secagg=True, secagg_clipping_range=0.01, secagg_max_weight=100.0)
    reply = make_update_mod(cfg)(_train_message(state, {}), _context(), _trainer(0.05, num_examples=50))
    update = _reply_weights(reply)
    expected = sum(int(np.count_nonzero(np.abs(u) > 0.02)) for u in update)
    clipped = compat.recorddict_to_fitres(reply.content, keep_input=True).metrics[CLIPPED_METRIC]
    assert clipped == expected and clipped > 1000
    with pytest.raises(SecAggWeightError, match="secagg-max-weight = 100") as err:
        make_update_mod(cfg)(_train_message(state, {}), _context(), _trainer(0.05, num_examples=101))
    assert "202" in str(err.value)  # it suggests a value


def test_run_config_mod_runs_secagg_when_the_run_config_asks() -> None:
    """``flwr run`` path: the SecAgg+ setup message is answered by the SecAgg+ mod, not the client."""
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
             Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**26, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1e5}
    msg = _train_message(_model_state(), {})
    msg.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(setup)

    def client(m: Message, c: Context) -> Message:
        raise AssertionError("the setup stage must not reach the client")

    on = run_config_privacy_mod(msg, _context(RunConfig(secagg=True).to_run_config()), client)
    assert set(on.content.config_records[RECORD_KEY_CONFIGS]) == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}
    off = run_config_privacy_mod(_train_message(_model_state(), {}), _context(RunConfig().to_run_config()), _trainer(0.01))
    assert RECORD_KEY_CONFIGS not in off.content.config_records and off.content.array_records["fitres.parameters"]
    assert packed_secaggplus_mod in privacy_mods(RunConfig(secagg=True))
