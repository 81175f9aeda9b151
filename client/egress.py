"""Egress guard: a Flower client mod that checks every message a site sends.

A site's replies may carry numeric arrays (model state or masked vectors) and scalar metrics,
nothing else: no strings beyond Flower's own status text, no bytes, no object arrays. A reply that
breaks the rule is replaced by an error reply (it never leaves the site), and the reason is
logged without the offending content.

When the environment variable ``MEDFED_EGRESS_AUDIT`` names a file, one JSON line per reply is
appended to it: message type, array shapes and dtypes, metric names and value types, and byte
counts. Values themselves are never written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

__all__ = ["EgressViolation", "EgressReport", "inspect_message", "egress_guard", "AUDIT_ENV"]

logger = logging.getLogger(__name__)

AUDIT_ENV = "MEDFED_EGRESS_AUDIT"
EGRESS_BLOCKED = 4100
"""Error code of a reply the guard replaced."""

# Flower's legacy status records hold a code and a short text ("Success", or an error).
_STATUS_SUFFIX = ".status"
_STATUS_TEXT_KEYS = {"message"}
# Protocol records whose bytes are key material or masked shares, never data (SecAgg+). Only the
# keys Flower's secaggplus_mod replies with pass, each with its type and size checked
# (:func:`_inspect_secaggplus`); a string, an unknown key or an oversized blob is a violation.
_PROTOCOL_RECORDS = {RECORD_KEY_CONFIGS}  # "secaggplus_configs"
_SECAGG_PUBLIC_KEYS = (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2)  # PEM EC public keys (setup stage)
_SECAGG_ID_LISTS = (Key.DESTINATION_LIST, Key.NODE_ID_LIST)  # node ids (share-keys, unmask)
_SECAGG_BLOB_LISTS = (Key.CIPHERTEXT_LIST, Key.SHARE_LIST)  # encrypted / Shamir key shares
_SECAGG_MASKED = Key.MASKED_PARAMETERS  # masked integer vectors (collect-masked-vectors)
_MAX_KEY_BYTES = 1024
"""Upper bound on one PEM public key (a P-384 key is about 215 bytes)."""
_MAX_SHARE_BYTES = 4096
"""Upper bound on one encrypted share pair or Shamir share (a few hundred bytes each)."""
_SCALARS = (int, float, bool, np.integer, np.floating, np.bool_)


class EgressViolation(RuntimeError):
    """A reply carries something other than numeric arrays and scalar metrics."""


@dataclass
class EgressReport:
    """What one outgoing message carries (shapes and names, never values)."""

    message_type: str
    arrays: list[dict[str, Any]] = field(default_factory=list)
    scalars: dict[str, str] = field(default_factory=dict)
    protocol_records: list[str] = field(default_factory=list)
    array_bytes: int = 0
    protocol_bytes: int = 0
    """Bytes of SecAgg+ protocol values (keys, encrypted shares, masked vectors)."""


def _is_scalar_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value)


def inspect_message(message: Message) -> EgressReport:
    """Describe ``message``'s content; raise :class:`EgressViolation` on anything not allowed.

    Returns
    -------
    EgressReport
        Array shapes, dtypes and sizes; names and Python types of the scalar values.
    """
    report = EgressReport(message_type=message.metadata.message_type)
    if not message.has_content():
        return report
    content = message.content
    for record_name, record in content.array_records.items():
        for key, array in record.items():
            nd = array.numpy()
            if nd.dtype.kind not in "biuf":
                raise EgressViolation(
                    f"array {record_name}/{key} has non-numeric dtype {nd.dtype}; only numeric arrays may leave a site."
                )
            report.arrays.append({"record": record_name, "key": key, "shape": list(nd.shape), "dtype": str(nd.dtype)})
            report.array_bytes += int(nd.nbytes)
    for record_name, record in content.metric_records.items():
        for key, value in record.items():
            if not (isinstance(value, _SCALARS) or _is_scalar_list(value)):
                raise EgressViolation(f"metric {record_name}/{key} is not numeric.")
            report.scalars[f"{record_name}/{key}"] = type(value).__name__
    for record_name, record in content.config_records.items():
        if record_name in _PROTOCOL_RECORDS:
            report.protocol_records.append(record_name)
            report.protocol_bytes += _inspect_secaggplus(record_name, dict(record.items()))
            continue
        for key, value in record.items():
            allowed_text = record_name.endswith(_STATUS_SUFFIX) and key in _STATUS_TEXT_KEYS
            if isinstance(value, str) and allowed_text:
                report.scalars[f"{record_name}/{key}"] = "status-text"
                continue
            if not (isinstance(value, _SCALARS) or _is_scalar_list(value)):
                raise EgressViolation(
                    f"config {record_name}/{key} holds a {type(value).__name__}; only numbers may leave a site."
                )
            report.scalars[f"{record_name}/{key}"] = type(value).__name__
    return report


def _bytes_list(record_name: str, key: str, value: Any, *, limit: int) -> list[bytes]:
    if not (isinstance(value, list) and all(isinstance(v, bytes) for v in value)):
        raise EgressViolation(f"protocol value {record_name}/{key} must be a list of bytes.")
    if any(len(v) > limit for v in value):
        raise EgressViolation(f"protocol value {record_name}/{key} holds an item over {limit} bytes.")
    return value


def _inspect_secaggplus(record_name: str, record: dict[str, Any]) -> int:
    """Check a SecAgg+ reply record key by key; return its byte count.

    Raises
    ------
    EgressViolation
        On a key Flower's ``secaggplus_mod`` never sends, a value of the wrong type, an
        oversized key or share, or a masked vector that is not an integer array.
    """
    total = 0
    for key, value in record.items():
        if key in _SECAGG_PUBLIC_KEYS:
            if not isinstance(value, bytes) or len(value) > _MAX_KEY_BYTES:
                raise EgressViolation(f"protocol value {record_name}/{key} is not a public key.")
            try:
                bytes_to_public_key(value)
            except (ValueError, TypeError):
                raise EgressViolation(f"protocol value {record_name}/{key} is not a public key.") from None
            total += len(value)
        elif key in _SECAGG_ID_LISTS:
            if not (isinstance(value, list) and all(type(v) is int for v in value)):
                raise EgressViolation(f"protocol value {record_name}/{key} must be a list of node ids.")
            total += 8 * len(value)
        elif key in _SECAGG_BLOB_LISTS:
            total += sum(len(v) for v in _bytes_list(record_name, key, value, limit=_MAX_SHARE_BYTES))
        elif key == _SECAGG_MASKED:
            for blob in _bytes_list(record_name, key, value, limit=2**40):
                try:
                    array = bytes_to_ndarray(blob)
                except (ValueError, TypeError, OSError):
                    raise EgressViolation(f"protocol value {record_name}/{key} is not a numpy array.") from None
                if array.dtype.kind not in "iu":
                    raise EgressViolation(
                        f"protocol value {record_name}/{key} has dtype {array.dtype}; masked vectors are integers."
                    )
                total += len(blob)
        else:
            raise EgressViolation(f"protocol record {record_name} carries an unexpected key {key!r}.")
    return total


def egress_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: pass the reply on only if :func:`inspect_message` accepts it."""
    reply = call_next(msg, context)
    try:
        report = inspect_message(reply)
    except EgressViolation as err:
        logger.error("egress guard blocked a %s reply: %s", msg.metadata.message_type, err)
        return Message(error=Error(code=EGRESS_BLOCKED, reason=f"blocked by the site's egress guard: {err}"), reply_to=msg)
    audit = os.environ.get(AUDIT_ENV)
    if audit:
        with open(audit, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(report)) + "\n")
    return reply
