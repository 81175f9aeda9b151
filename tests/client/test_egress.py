"""The egress guard lets numeric arrays and scalar metrics out, and nothing else."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.common import Array

from medfed.client.egress import EgressViolation, egress_guard, inspect_message


def _incoming() -> Message:
    """A train instruction as a site receives it."""
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(content=RecordDict(), metadata=meta)


def _reply(content: RecordDict) -> Message:
    return Message(content=content, reply_to=_incoming())


def _ok_content() -> RecordDict:
    return RecordDict(
        {
            "fitres.parameters": ArrayRecord({"0": Array(np.zeros((2, 3), np.float32))}),
            "fitres.num_examples": MetricRecord({"num_examples": 5}),
            "fitres.metrics": ConfigRecord({"train-loss": 0.5, "site-index": 1}),
            "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
        }
    )


def test_model_arrays_and_scalars_pass() -> None:
    report = inspect_message(_reply(_ok_content()))
    assert report.arrays == [{"record": "fitres.parameters", "key": "0", "shape": [2, 3], "dtype": "float32"}]
    assert report.array_bytes == 24
    assert report.scalars["fitres.metrics/train-loss"] == "float"
    assert report.scalars["fitres.status/message"] == "status-text"


@pytest.mark.parametrize(
    ("record", "value", "fragment"),
    [
        ("fitres.metrics", {"file": "/data/patient7.nii.gz"}, "fitres.metrics/file"),
        ("fitres.metrics", {"blob": b"\x00\x01"}, "fitres.metrics/blob"),
        ("fitres.metrics", {"names": ["a", "b"]}, "fitres.metrics/names"),
        ("fitres.status", {"detail": "patient 7"}, "fitres.status/detail"),
    ],
)
def test_text_or_bytes_are_blocked(record: str, value: dict, fragment: str) -> None:
    content = _ok_content()
    content[record] = ConfigRecord(value)
    with pytest.raises(EgressViolation, match=fragment) as err:
        inspect_message(_reply(content))
    assert "patient7" not in str(err.value) and "patient 7" not in str(err.value)


def test_guard_replaces_a_bad_reply_with_an_error() -> None:
    content = _ok_content()
    content["fitres.metrics"] = ConfigRecord({"file": "/data/patient7.nii.gz"})
    out = egress_guard(_incoming(), Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                       lambda m, c: Message(content=content, reply_to=m))
    assert out.has_error() and not out.has_content()
    assert "egress guard" in out.error.reason and "patient7" not in out.error.reason
