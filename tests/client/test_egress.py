"""The egress guard lets numeric arrays and scalar metrics under allowed names out, and nothing else;
exceptions leave a site as a category and a code."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common import Array

from medfed.client.egress import (
    AUDIT_ENV,
    EGRESS_BLOCKED,
    EgressViolation,
    allowed_name,
    egress_guard,
    error_reply_reason,
    inspect_message,
)
from medfed.client.site_config import SiteConfigError
from medfed.shared.config import ConfigError
from medfed.shared.data.base import DataError
from medfed.shared.privacy import LedgerError

ATTACK = "DOE_JOHN_19700101 MRN 123456"
"""The metric key of the security review: a patient's name, birth date and record number."""
LEAKED = ("DOE", "JOHN", "19700101", "123456", "MRN")


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


def _npy_array(payload: bytes) -> Array:
    return Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=payload)  # metadata that lies


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (Array(np.array(["DOE JOHN"])), "non-numeric dtype <U8"),
        (_npy_array(b"patient 7, /data/p7.nii.gz"), "not a readable numpy array"),
        (Array(dtype="float32", shape=(1,), stype="torch.tensor", data=b"x"), "not a numpy array"),
    ],
    ids=["text-array", "not-npy-bytes", "other-stype"],
)
def test_arrays_that_are_not_numeric_npy_are_blocked(array: Array, fragment: str) -> None:
    """The guard reads each array's ``.npy`` header (what the server's ``np.load`` sees), not the metadata."""
    content = _ok_content()
    content["fitres.parameters"] = ArrayRecord({"0": array})
    with pytest.raises(EgressViolation, match=fragment) as err:
        inspect_message(_reply(content))
    assert "DOE" not in str(err.value) and "/data" not in str(err.value)


def test_an_object_array_is_blocked_without_unpickling() -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"patient": 7}], dtype=object), allow_pickle=True)
    content = _ok_content()
    content["fitres.parameters"] = ArrayRecord({"0": _npy_array(buf.getvalue())})
    with pytest.raises(EgressViolation, match="not a readable numpy array"):
        inspect_message(_reply(content))


@pytest.mark.parametrize(
    ("record", "value", "fragment"),
    [
        ("fitres.metrics", {"file": "/data/patient7.nii.gz"}, "fitres.metrics/file"),
        ("fitres.metrics", {"blob": b"\x00\x01"}, "fitres.metrics/blob"),
        ("fitres.metrics", {"names": ["a", "b"]}, "fitres.metrics/names"),
        ("fitres.status", {"detail": "patient 7"}, "fitres.status/detail"),
        ("fitres.status", {"code": 0, "message": "patient 7"}, "fitres.status/message"),  # not Flower's text
    ],
)
def test_text_or_bytes_are_blocked(record: str, value: dict, fragment: str) -> None:
    content = _ok_content()
    content[record] = ConfigRecord(value)
    with pytest.raises(EgressViolation, match=fragment) as err:
        inspect_message(_reply(content))
    assert "patient7" not in str(err.value) and "patient 7" not in str(err.value)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_guard_replaces_a_bad_reply_with_an_error() -> None:
    content = _ok_content()
    content["fitres.metrics"] = ConfigRecord({"file": "/data/patient7.nii.gz"})
    out = egress_guard(_incoming(), _context(), lambda m, c: Message(content=content, reply_to=m))
    assert out.has_error() and not out.has_content()
    assert out.error.code == EGRESS_BLOCKED
    assert out.error.reason == "EgressViolation: egress-blocked (site error 4100; the details are in the site's log)"


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("train-loss", True),
        ("dp-epsilon", True),
        ("balanced-accuracy", True),  # issue 14's names are kebab-case too
        ("dice-class-2", True),
        ("auc", True),
        ("f1", True),
        ("x" * 48, True),
        ("round-2026", True),  # four digits in a row are fine
        (ATTACK, False),
        ("Train-Loss", False),  # upper case
        ("train loss", False),  # a space
        ("train_loss", False),  # snake_case is not medfed's style (Flower's num_examples is listed)
        ("mrn-123456", False),  # a run of 6 digits: an identifier
        ("dob-19700101", False),
        ("x" * 49, False),  # too long
        ("-loss", False),
        ("loss-", False),
        ("a--b", False),
        ("2-loss", False),
        ("patient/7", False),
        ("", False),
    ],
)
def test_the_name_rule(name: str, allowed: bool) -> None:
    assert allowed_name(name) is allowed


def _with(place: str, name: str) -> RecordDict:
    """``_ok_content()`` with ``name`` at ``place``: a metric key, a record name or an array key."""
    content = _ok_content()
    if place == "config-key":
        content["fitres.metrics"] = ConfigRecord({"train-loss": 0.5, name: 1.0})
    elif place == "metric-key":
        content["fitres.num_examples"] = MetricRecord({"num_examples": 5, name: 1})
    elif place == "array-key":
        content["fitres.parameters"] = ArrayRecord({"0": Array(np.zeros(2, np.float32)),
                                                    name: Array(np.zeros(2, np.float32))})
    elif place == "array-record":
        content[name] = ArrayRecord({"0": Array(np.zeros(2, np.float32))})
    elif place == "metric-record":
        content[name] = MetricRecord({"auc": 0.5})
    elif place == "config-record":
        content[name] = ConfigRecord({"auc": 0.5})
    return content


PLACES = ["config-key", "metric-key", "array-key", "array-record", "metric-record", "config-record"]


@pytest.mark.parametrize("place", PLACES)
def test_flowers_own_names_and_kebab_case_names_pass(place: str) -> None:
    inspect_message(_reply(_with(place, "sensitivity")))
    inspect_message(_reply(_ok_content()))  # fitres.*, num_examples, "0": Flower's legacy names


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("name", [ATTACK, "scan_0042.nii.gz", "mrn-123456", "Patient Seven"])
def test_a_name_with_text_is_blocked_and_not_repeated(place: str, name: str) -> None:
    with pytest.raises(EgressViolation, match="outside the allow-list") as err:
        inspect_message(_reply(_with(place, name)))
    assert err.value.rule == "name" and name not in str(err.value)


@pytest.mark.parametrize("place", ["config-key", "array-key", "array-record"])
def test_the_attack_never_leaves_the_site_and_leaves_no_trace(
    place: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15: a metric key ``DOE_JOHN_19700101 MRN 123456`` passed and was stored. Now the reply is
    replaced; the audit log records the category, the code and the rule; neither it, the error
    reply nor the site's log holds the name."""
    audit = tmp_path / "egress.jsonl"
    monkeypatch.setenv(AUDIT_ENV, str(audit))
    content = _with(place, ATTACK)
    with caplog.at_level(logging.DEBUG):
        out = egress_guard(_incoming(), _context(), lambda m, c: Message(content=content, reply_to=m))
    assert out.has_error() and not out.has_content() and out.error.code == EGRESS_BLOCKED
    [entry] = _audit_lines(audit)
    assert entry == {"message_type": "train", "blocked": True, "category": "egress-blocked", "code": 4100,
                     "error": "EgressViolation", "rule": "name"}
    assert "egress guard blocked a train reply (rule: name)" in caplog.text
    for text in (out.error.reason, audit.read_text(), caplog.text):
        assert not any(fragment in text for fragment in LEAKED), text


def test_an_accepted_reply_is_audited_by_names_and_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    audit = tmp_path / "egress.jsonl"
    monkeypatch.setenv(AUDIT_ENV, str(audit))
    out = egress_guard(_incoming(), _context(), lambda m, c: Message(content=_ok_content(), reply_to=m))
    assert out.has_content()
    [entry] = _audit_lines(audit)
    assert entry["message_type"] == "train" and entry["array_bytes"] == 24
    assert entry["scalars"]["fitres.metrics/train-loss"] == "float" and "0.5" not in audit.read_text()


class _PolicyRefusal(RuntimeError):
    egress_category = "privacy-refused"


class _BadData(OSError):
    pass


SECRET = "/data/DOE_JOHN_19700101/scan.nii.gz"


@pytest.mark.parametrize(
    ("error", "category", "code"),
    [
        (FileNotFoundError(2, "No such file", SECRET), "data-error", 4103),
        (_BadData(f"cannot read {SECRET}"), "data-error", 4103),
        (DataError(f"{SECRET} is unreadable"), "data-error", 4103),
        (ConfigError(f"image-size does not fit {SECRET}"), "config-error", 4102),
        (SiteConfigError(f"site.toml: datalist {SECRET} is missing"), "config-error", 4102),
        (LedgerError(f"ledger for {SECRET} is inconsistent"), "privacy-refused", 4101),
        (_PolicyRefusal(f"dp-delta above the policy of {SECRET}"), "privacy-refused", 4101),
        (ImportError(f"No module named 'x' ({SECRET})"), "environment-error", 4104),
        (MemoryError(SECRET), "environment-error", 4104),
        (RuntimeError(f"patient {SECRET}"), "internal-error", 4105),
        (ZeroDivisionError(SECRET), "internal-error", 4105),
        (type("Mrn123456Error", (RuntimeError,), {})(SECRET), "internal-error", 4105),  # not shown either
    ],
)
def test_an_exception_leaves_the_site_as_a_category_and_a_code(
    error: Exception, category: str, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit = tmp_path / "egress.jsonl"
    monkeypatch.setenv(AUDIT_ENV, str(audit))

    def raising(msg: Message, context: Context) -> Message:
        raise error

    with caplog.at_level(logging.ERROR, logger="medfed.client.egress"):
        out = egress_guard(_incoming(), _context(), raising)
    name = "Exception" if type(error).__name__.startswith(("_", "Mrn")) else type(error).__name__
    assert out.has_error() and out.error.code == code
    assert out.error.reason == f"{name}: {category} (site error {code}; the details are in the site's log)"
    assert out.error.reason == error_reply_reason(category, error)
    assert "DOE" not in out.error.reason and "DOE" not in audit.read_text()
    [entry] = _audit_lines(audit)
    assert entry == {"message_type": "train", "blocked": True, "category": category, "code": code, "error": name}
    assert f"({category}, site error {code})" in caplog.text  # the site's own log: the category and ...
    assert caplog.records[-1].exc_info is not None  # ... its traceback (with the text: it stays at the site)


def test_a_repeated_failure_logs_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    def raising(msg: Message, context: Context) -> Message:
        raise KeyError("test: the same failure, twice (a unique message for this test)")

    with caplog.at_level(logging.ERROR, logger="medfed.client.egress"):
        for _ in range(3):
            assert egress_guard(_incoming(), _context(), raising).error.code == 4105
    assert [r.exc_info is not None for r in caplog.records] == [True, False, False]
    assert "3 times in this process" in caplog.records[-1].getMessage()


def test_interrupts_pass_through() -> None:
    def interrupted(msg: Message, context: Context) -> Message:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        egress_guard(_incoming(), _context(), interrupted)


def test_an_error_reply_built_inside_loses_its_text_unless_it_is_the_fixed_form() -> None:
    free = Error(code=6, reason=f"precondition failed for {SECRET}")
    out = egress_guard(_incoming(), _context(), lambda m, c: Message(error=free, reply_to=m))
    assert out.error.code == 6 and out.error.reason == "site error 6 (the details are in the site's log)"
    fixed = Error(code=4101, reason=error_reply_reason("privacy-refused", _PolicyRefusal("x")))
    out = egress_guard(_incoming(), _context(), lambda m, c: Message(error=fixed, reply_to=m))
    assert (out.error.code, out.error.reason) == (4101, fixed.reason)


def _leak_at_site_0(msg: Message, context: Context, call_next) -> Message:
    """Inside the guard: site 0 adds the review's metric key to its training reply in round 2."""
    from tests.support.fault_sites import fit_round

    reply = call_next(msg, context)
    if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 0 and fit_round(msg) == 2:
        reply.content["fitres.metrics"][ATTACK] = 1.0
    return reply


@pytest.mark.usefixtures("one_torch_thread")
def test_the_attack_replayed_the_coordinator_records_a_blocked_reply_and_no_name(tmp_path: Path) -> None:
    """medfed's ClientApp and ServerApp on the in-process grid: site 0's round-2 reply is replaced by
    the guard; the coordinator records ``egress-blocked`` for site 0 and the round completes with
    the others; no file the coordinator writes (run directory, run store) holds the name."""
    from flwr.client import ClientApp

    from medfed.client.client_app import privacy_mods, site_client_fn
    from medfed.server.dashboard.read_models import RunReader
    from medfed.server.run_dir import read_metrics
    from medfed.server.server_app import ServerHooks, run_server
    from medfed.server.store import RunStore
    from medfed.shared.config import RunConfig
    from tests.support.local_grid import LocalGrid, server_identity

    cfg = RunConfig(dataset="synthetic", synthetic_samples=48, model="simplecnn", image_size=12, batch_size=8,
                    num_sites=3, num_server_rounds=2, fraction_evaluate=0.0, run_dir=str(tmp_path / "runs"))
    app = ClientApp(client_fn=site_client_fn(cfg), mods=[egress_guard, _leak_at_site_0, *privacy_mods(cfg)])
    grid = LocalGrid(app, num_nodes=cfg.num_sites)
    with server_identity():
        run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                   cfg, ServerHooks(), str(tmp_path / "run"))
    records = {r["round"]: r for r in read_metrics(tmp_path / "run")}
    assert [records[1]["fit_results"], records[2]["fit_results"]] == [3, 2]
    record = records[2]
    assert record["failed_sites"] == [{"site": "site-0", "node": 101, "code": "egress-blocked", "error": "EgressViolation"}]
    with RunStore(cfg.store_url) as store:
        [run] = RunReader(store).list_runs()
        events = [e["message"] for e in RunReader(store).events(run["id"]) if e["kind"] == "site-failed"]
    assert events == ["round 2: site-0 failed to train: EgressViolation (egress-blocked)"]
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert b"DOE_JOHN" not in data and b"123456" not in data, path
