"""Egress guard: a Flower client mod that checks every message a site sends.

A site's replies may carry numeric arrays (model state or masked vectors) and scalar metrics,
nothing else: no strings beyond Flower's own status text and the name of the SecAgg+ mask
generator (one of :data:`medfed.shared.secagg_masks.MASK_GENERATORS`), no bytes, no object arrays.

**Names.** Every record name, metric or config key and array key must be an allowed name
(:func:`allowed_name`): lower-case kebab-case (``^[a-z][a-z0-9]*(-[a-z0-9]+)*$``), at most
:data:`MAX_NAME_CHARS` characters, with no run of more than :data:`MAX_DIGIT_RUN` digits (a
date, a record or accession number looks like one), or one of the names Flower itself writes:
the legacy records (``fitres.parameters``, ``fitres.metrics``, ``fitres.num_examples``,
``fitres.status``, ``evaluateres.loss``, ...), the key ``num_examples``, the array indices
``"0"``, ``"1"``, ... of a parameters record, and SecAgg+'s ``secaggplus_configs`` (whose keys
are checked one by one). A name such as ``DOE_JOHN_19700101 MRN 123456`` is blocked; a
kebab-case name that spells out text (``doe-john``) is not: the rule stops accidental
identifiers and free text, not a ClientApp written to leak (see ``docs/threat-model.md``).

**Blocked replies and errors.** A reply that breaks a rule is replaced by an error reply (it
never leaves the site). An exception raised while handling a message is caught here too, so
that Flower's runtime never sends its text: the coordinator receives only a fixed category,
its code (:mod:`medfed.shared.error_codes`) and the exception's class name. The site's log
keeps the traceback of an exception (once per distinct failure and process) and, for a blocked
reply, which rule and which position broke it, never the offending name or value.

When the environment variable ``MEDFED_EGRESS_AUDIT`` names a file, one JSON line per reply is
appended to it: message type, array shapes and dtypes, metric names and value types, and byte
counts; for a blocked or failed reply, the category, code and rule. Values, offending names and
exception text are never written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import SType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from medfed.shared.error_codes import EGRESS_BLOCKED as BLOCKED_CATEGORY
from medfed.shared.error_codes import SITE_ERROR_CODES, category_of
from medfed.shared.secagg_masks import MASK_GENERATOR_KEY, MASK_GENERATORS
from medfed.shared.weights import npy_view

__all__ = [
    "EgressViolation",
    "EgressReport",
    "inspect_message",
    "egress_guard",
    "allowed_name",
    "error_reply_reason",
    "shown_class_name",
    "AUDIT_ENV",
    "EGRESS_BLOCKED",
    "MAX_NAME_CHARS",
    "MAX_DIGIT_RUN",
]

logger = logging.getLogger(__name__)

AUDIT_ENV = "MEDFED_EGRESS_AUDIT"
EGRESS_BLOCKED = SITE_ERROR_CODES[BLOCKED_CATEGORY]
"""Error code of a reply the guard replaced (4100)."""

NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
"""Lower-case kebab-case: what every metric, key and record name medfed writes looks like."""
MAX_NAME_CHARS = 48
"""Longest allowed name."""
MAX_DIGIT_RUN = 4
"""Most consecutive digits in a name (``dice-class-2`` passes; ``19700101`` or ``123456`` does not)."""
_LONG_DIGIT_RUN = re.compile(rf"[0-9]{{{MAX_DIGIT_RUN + 1},}}")
# Names Flower's legacy NumPyClient path writes (flwr 1.42, compat/common/recorddict_compat.py).
_FLOWER_RECORDS = frozenset(
    {
        "fitres.parameters",
        "fitres.metrics",
        "fitres.num_examples",
        "fitres.status",
        "evaluateres.loss",
        "evaluateres.num_examples",
        "evaluateres.metrics",
        "evaluateres.status",
        "getparametersres.parameters",
        "getparametersres.status",
        "getpropertiesres.properties",
        "getpropertiesres.status",
    }
)
_FLOWER_KEYS = frozenset({"num_examples"})
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]{0,5}")  # parameters_to_arrayrecord: "0", "1", ...
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9]{0,47}")
_FIXED_REASON = re.compile(
    r"(?:[A-Z][A-Za-z0-9]{0,47}: )?[a-z]+(?:-[a-z]+)* \(site error [0-9]{1,5}; the details are in the site's log\)"
)
"""An ``Error.reason`` of the form :func:`error_reply_reason` writes (passed on unchanged)."""

# Flower's legacy status records hold a code and one of Flower's own texts (flwr 1.42,
# compat/client/numpy_client.py and client.py); any other text is a violation.
_STATUS_SUFFIX = ".status"
_STATUS_TEXT_KEYS = {"message"}
_STATUS_TEXTS = re.compile(r"Success|Client does not implement `(?:get_properties|get_parameters|fit|evaluate)`")
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
    """A reply carries something other than numeric arrays and scalar metrics under allowed names.

    ``str()`` names the rule and the position, and only names that are themselves allowed.

    Parameters
    ----------
    message
        What broke the rule (never an offending name or value).
    rule
        ``"name"`` (a name outside the allow-list), ``"type"`` (a value that is not a number),
        ``"dtype"`` (a non-numeric array) or ``"protocol"`` (a SecAgg+ value).
    """

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


def allowed_name(name: str) -> bool:
    """Whether ``name`` is lower-case kebab-case, at most :data:`MAX_NAME_CHARS` long, with no
    run of more than :data:`MAX_DIGIT_RUN` digits."""
    return (
        isinstance(name, str)
        and len(name) <= MAX_NAME_CHARS
        and NAME_PATTERN.fullmatch(name) is not None
        and _LONG_DIGIT_RUN.search(name) is None
    )


def _record_name_ok(name: str) -> bool:
    return name in _FLOWER_RECORDS or allowed_name(name)


def _key_ok(name: str) -> bool:
    return name in _FLOWER_KEYS or allowed_name(name)


def _array_key_ok(name: str) -> bool:
    return _ARRAY_INDEX.fullmatch(name) is not None or allowed_name(name)


def _check_names(kind: str, record_name: str, keys: list[str], key_ok: Any) -> None:
    """Raise :class:`EgressViolation` (rule ``name``) on a record or key name outside the allow-list."""
    if not _record_name_ok(record_name):
        raise EgressViolation(
            f"a {kind} record has a name outside the allow-list (lower-case kebab-case, at most "
            f"{MAX_NAME_CHARS} characters, no run of more than {MAX_DIGIT_RUN} digits); the name is not shown.",
            rule="name",
        )
    for index, key in enumerate(keys):
        if not key_ok(key):
            raise EgressViolation(
                f"key #{index} of {kind} record {record_name} has a name outside the allow-list (lower-case "
                f"kebab-case, at most {MAX_NAME_CHARS} characters, no run of more than {MAX_DIGIT_RUN} digits); "
                "the name is not shown.",
                rule="name",
            )


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
        _check_names("array", record_name, list(record.keys()), _array_key_ok)
        for key, array in record.items():
            nd = _array_view(record_name, key, array)
            if nd.dtype.kind not in "biuf":
                raise EgressViolation(
                    f"array {record_name}/{key} has non-numeric dtype {nd.dtype}; only numeric arrays may leave a site.",
                    rule="dtype",
                )
            report.arrays.append({"record": record_name, "key": key, "shape": list(nd.shape), "dtype": str(nd.dtype)})
            report.array_bytes += int(nd.nbytes)
    for record_name, record in content.metric_records.items():
        _check_names("metric", record_name, list(record.keys()), _key_ok)
        for key, value in record.items():
            if not (isinstance(value, _SCALARS) or _is_scalar_list(value)):
                raise EgressViolation(f"metric {record_name}/{key} is not numeric.", rule="type")
            report.scalars[f"{record_name}/{key}"] = type(value).__name__
    for record_name, record in content.config_records.items():
        if record_name in _PROTOCOL_RECORDS:  # its keys: checked against Flower's in _inspect_secaggplus
            report.protocol_records.append(record_name)
            report.protocol_bytes += _inspect_secaggplus(record_name, dict(record.items()))
            continue
        _check_names("config", record_name, list(record.keys()), _key_ok)
        for key, value in record.items():
            allowed_text = record_name.endswith(_STATUS_SUFFIX) and key in _STATUS_TEXT_KEYS
            if isinstance(value, str) and allowed_text and _STATUS_TEXTS.fullmatch(value):
                report.scalars[f"{record_name}/{key}"] = "status-text"
                continue
            if not (isinstance(value, _SCALARS) or _is_scalar_list(value)):
                raise EgressViolation(
                    f"config {record_name}/{key} holds a {type(value).__name__}; only numbers may leave a site.",
                    rule="type",
                )
            report.scalars[f"{record_name}/{key}"] = type(value).__name__
    return report


def _array_view(record_name: str, key: str, array: Array) -> np.ndarray:
    """The array a record entry holds, read in place from its ``.npy`` bytes (what the server loads).

    ``Array.numpy()`` copies the whole payload (45 MB for ResNet-18) to read what the header
    says; :func:`~medfed.shared.weights.npy_view` parses the header and views the bytes.
    """
    if array.stype != SType.NUMPY:
        raise EgressViolation(f"array {record_name}/{key} is not a numpy array.", rule="dtype")
    try:
        return npy_view(array.data)
    except (ValueError, TypeError, OSError):
        raise EgressViolation(f"array {record_name}/{key} is not a readable numpy array.", rule="dtype") from None


def _bytes_list(record_name: str, key: str, value: Any, *, limit: int) -> list[bytes]:
    if not (isinstance(value, list) and all(isinstance(v, bytes) for v in value)):
        raise EgressViolation(f"protocol value {record_name}/{key} must be a list of bytes.", rule="protocol")
    if any(len(v) > limit for v in value):
        raise EgressViolation(f"protocol value {record_name}/{key} holds an item over {limit} bytes.", rule="protocol")
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
                raise EgressViolation(f"protocol value {record_name}/{key} is not a public key.", rule="protocol")
            try:
                bytes_to_public_key(value)
            except (ValueError, TypeError):
                raise EgressViolation(f"protocol value {record_name}/{key} is not a public key.", rule="protocol") from None
            total += len(value)
        elif key in _SECAGG_ID_LISTS:
            if not (isinstance(value, list) and all(type(v) is int for v in value)):
                raise EgressViolation(f"protocol value {record_name}/{key} must be a list of node ids.", rule="protocol")
            total += 8 * len(value)
        elif key in _SECAGG_BLOB_LISTS:
            total += sum(len(v) for v in _bytes_list(record_name, key, value, limit=_MAX_SHARE_BYTES))
        elif key == _SECAGG_MASKED:
            for blob in _bytes_list(record_name, key, value, limit=2**40):
                try:
                    array = npy_view(blob)  # the header, as the server's np.load reads it; no copy
                except (ValueError, TypeError, OSError):
                    raise EgressViolation(f"protocol value {record_name}/{key} is not a numpy array.", rule="protocol") from None
                if array.dtype.kind not in "iu":
                    raise EgressViolation(
                        f"protocol value {record_name}/{key} has dtype {array.dtype}; masked vectors are integers.",
                        rule="protocol",
                    )
                total += len(blob)
        elif key == MASK_GENERATOR_KEY:  # medfed's echo of the server's mask generator: a fixed vocabulary
            if value not in MASK_GENERATORS:
                raise EgressViolation(
                    f"protocol value {record_name}/{key} is not a mask generator's name.", rule="protocol"
                )
            total += len(value)
        else:
            shown = repr(key) if isinstance(key, str) and allowed_name(key) else "(its name is not shown)"
            raise EgressViolation(f"protocol record {record_name} carries an unexpected key {shown}.", rule="protocol")
    return total


def shown_class_name(error: BaseException) -> str:
    """``type(error).__name__`` when it looks like a class name (``[A-Z][A-Za-z0-9]*``, at most
    48 characters, no long digit run), else ``"Exception"``."""
    name = type(error).__name__
    return name if _CLASS_NAME.fullmatch(name) and _LONG_DIGIT_RUN.search(name) is None else "Exception"


def error_reply_reason(category: str, error: BaseException) -> str:
    """The ``Error.reason`` of a reply the guard sends instead: the exception's class name
    (:func:`shown_class_name`), the category and its code; never the exception's text.

    ``"FileNotFoundError: data-error (site error 4103; the details are in the site's log)"``.
    """
    return f"{shown_class_name(error)}: {category} (site error {SITE_ERROR_CODES[category]}; the details are in the site's log)"


_seen_lock = threading.Lock()
_seen_failures: dict[tuple[str, str, str], int] = {}


def _log_failure(message_type: str, category: str, error: Exception) -> None:
    """Log a site failure locally: its traceback the first time it occurs in this process, a count after."""
    key = (category, type(error).__qualname__, str(error))
    with _seen_lock:
        _seen_failures[key] = count = _seen_failures.get(key, 0) + 1
    code = SITE_ERROR_CODES[category]
    if count == 1:
        logger.error(
            "this site failed while handling a %s message (%s, site error %d); the coordinator is sent only "
            "the category, the code and the class name %s",
            message_type, category, code, type(error).__name__, exc_info=error,
        )
    else:
        logger.error(
            "this site failed again while handling a %s message (%s, site error %d, %s): the same failure as "
            "before (%d times in this process; its traceback was logged the first time)",
            message_type, category, code, type(error).__name__, count,
        )


def _audit(entry: dict[str, Any]) -> None:
    audit = os.environ.get(AUDIT_ENV)
    if audit:
        with open(audit, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


def _refusal(msg: Message, category: str, error: BaseException, **audit: Any) -> Message:
    code = SITE_ERROR_CODES[category]
    _audit({"message_type": msg.metadata.message_type, "blocked": True, "category": category, "code": code,
            "error": shown_class_name(error), **audit})
    return Message(error=Error(code=code, reason=error_reply_reason(category, error)), reply_to=msg)


def egress_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: pass the reply on only if :func:`inspect_message` accepts it.

    An exception raised by the mods and the ClientApp inside is turned into an error reply
    here (category and code only, see :func:`error_reply_reason`), so Flower's runtime never
    sends its text. ``KeyboardInterrupt`` and ``SystemExit`` pass through.
    """
    message_type = msg.metadata.message_type
    try:
        reply = call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - every error leaves the site as a category and a code
        category = category_of(err)
        _log_failure(message_type, category, err)
        return _refusal(msg, category, err)
    try:
        report = inspect_message(reply)
    except EgressViolation as err:
        logger.error("egress guard blocked a %s reply (rule: %s): %s", message_type, err.rule, err)
        return _refusal(msg, BLOCKED_CATEGORY, err, rule=err.rule)
    if reply.has_error() and not _FIXED_REASON.fullmatch(reply.error.reason or ""):
        # An error reply built inside (by a Flower mod, not an exception): its text stays here too.
        code = int(reply.error.code)
        logger.error("a %s error reply (code %d) leaves this site without its reason text", message_type, code)
        _audit({"message_type": message_type, "blocked": False, "error_code": code})
        return Message(error=Error(code=code, reason=f"site error {code} (the details are in the site's log)"),
                       reply_to=msg)
    if os.environ.get(AUDIT_ENV):  # the report's dict only when an audit log is kept (1 ms a message)
        _audit(asdict(report))
    return reply
