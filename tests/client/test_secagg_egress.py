"""The egress guard passes Flower's SecAgg+ replies exactly, and nothing that only looks like them."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from medfed.client.client_app import make_client_app
from medfed.client.egress import EgressViolation, inspect_message
from medfed.server.server_app import ServerHooks, run_server
from medfed.shared.config import RunConfig
from medfed.shared.secagg_masks import MASK_GENERATOR_KEY
from medfed.simulations.bench.secagg import noise_client_fn
from tests.support.local_grid import LocalGrid, server_identity


@pytest.fixture(scope="module")
def secagg_replies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Message]:
    """One real reply of each SecAgg+ stage, produced by medfed's ClientApp on an in-process Grid."""
    tmp = tmp_path_factory.mktemp("egress")
    cfg = RunConfig(dataset="synthetic", synthetic_samples=96, model="simplecnn", image_size=16, batch_size=16,
                    num_sites=3, num_server_rounds=1, fraction_evaluate=0.0, secagg=True, run_dir=str(tmp))
    grid = LocalGrid(make_client_app(cfg, client_fn=noise_client_fn([10, 20, 30])), num_nodes=3)
    with server_identity():
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(tmp / "run"))
    by_stage = {}
    for reply in grid.received:
        keys = set(reply.content.config_records[RECORD_KEY_CONFIGS])
        stage = {frozenset({Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}): "setup",
                 frozenset({Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST}): "share-keys",
                 frozenset({Key.MASKED_PARAMETERS, MASK_GENERATOR_KEY}): "collect",
                 frozenset({Key.NODE_ID_LIST, Key.SHARE_LIST}): "unmask"}[frozenset(keys)]
        by_stage.setdefault(stage, reply)
    assert set(by_stage) == {"setup", "share-keys", "collect", "unmask"}
    return by_stage


def test_every_secagg_stage_passes_with_its_bytes_counted(secagg_replies: dict[str, Message]) -> None:
    for stage, reply in secagg_replies.items():
        report = inspect_message(reply)
        assert report.protocol_records == [RECORD_KEY_CONFIGS], stage
        assert report.protocol_bytes > 0 and report.arrays == [], stage
    collect = inspect_message(secagg_replies["collect"])
    # the masked vector of a ~24k-entry model, packed in 32 bits (client/secagg_packed.py), not int64
    assert 4 * 23_000 < collect.protocol_bytes < 8 * 23_000
    assert collect.scalars["fitres.metrics/secagg-clipped"] == "int"
    assert secagg_replies["collect"].content.config_records[RECORD_KEY_CONFIGS][MASK_GENERATOR_KEY] == "aes-256-ctr"


def _tampered(reply: Message, key: str, value: object, record: str = RECORD_KEY_CONFIGS) -> Message:
    content = RecordDict()
    for name, rec in reply.content.config_records.items():
        content[name] = ConfigRecord(dict(rec.items()))
    for name, rec in reply.content.metric_records.items():
        content[name] = rec
    content[record][key] = value
    return Message(content=content, reply_to=_incoming(reply))


def _incoming(reply: Message) -> Message:
    meta = Metadata(run_id=1, message_id=reply.metadata.reply_to_message_id or "m", src_node_id=1,
                    dst_node_id=reply.metadata.src_node_id, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=60.0, message_type="train")
    return Message(content=RecordDict(), metadata=meta)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("stage", "key", "value", "record", "fragment"),
    [
        ("setup", "note", "patient 7, /data/p7.nii.gz", RECORD_KEY_CONFIGS, "unexpected key 'note'"),
        ("setup", Key.PUBLIC_KEY_1, b"/data/patient7.nii.gz", RECORD_KEY_CONFIGS, "is not a public key"),
        ("share-keys", Key.CIPHERTEXT_LIST, [b"x" * 10_000], RECORD_KEY_CONFIGS, "over 4096 bytes"),
        ("share-keys", Key.DESTINATION_LIST, ["p7"], RECORD_KEY_CONFIGS, "list of node ids"),
        ("collect", Key.MASKED_PARAMETERS, [_npy(np.ones(4, np.float32))], RECORD_KEY_CONFIGS, "masked vectors are integers"),
        ("collect", Key.MASKED_PARAMETERS, [b"patient 7"], RECORD_KEY_CONFIGS, "not a numpy array"),
        ("collect", "file", "/data/patient7.nii.gz", "fitres.metrics", "fitres.metrics/file"),
        ("collect", MASK_GENERATOR_KEY, "patient 7", RECORD_KEY_CONFIGS, "not a mask generator's name"),
    ],
)
def test_anything_beyond_the_protocol_is_blocked(
    secagg_replies: dict[str, Message], stage: str, key: str, value: object, record: str, fragment: str
) -> None:
    bad = _tampered(secagg_replies[stage], key, value, record)
    with pytest.raises(EgressViolation, match=fragment.replace("[", r"\[")) as err:
        inspect_message(bad)
    assert "patient" not in str(err.value) and "/data" not in str(err.value)


def test_protocol_record_name_is_flowers(secagg_replies: dict[str, Message]) -> None:
    """The allowance names Flower's record (``secaggplus_configs``); another name gets the normal rules."""
    reply = secagg_replies["setup"]
    content = RecordDict({"secaggplus": ConfigRecord(dict(reply.content.config_records[RECORD_KEY_CONFIGS].items()))})
    with pytest.raises(EgressViolation, match="holds a bytes"):
        inspect_message(Message(content=content, reply_to=_incoming(reply)))
