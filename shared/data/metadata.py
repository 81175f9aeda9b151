"""Optional per-entry metadata of a datalist (``sex``, ``age``, ``scanner``...) and its subgroups.

A datalist entry may carry any of :data:`METADATA_KEYS` beside ``"image"`` and ``"label"``::

    {"image": "img/a.png", "label": 1, "sex": "F", "age": 63, "scanner": "Siemens Skyra"}

The loader keeps them per sample (:attr:`medfed.shared.data.base.ImageSet.metadata`); other keys
of an entry are ignored, as before. They never leave the site: a site only sends metrics of
subgroups (:mod:`medfed.client.cross_site`), named by the *codes* of :func:`subgroup_code`, which
are lower-case kebab-case so that they pass the site's egress rules, and never a value that looks
like an identifier.

Subgroups: ``age`` (a number of years, or a DICOM age string such as ``"045Y"``) falls into the
bands of :data:`AGE_BANDS` (``<40``, ``40-59``, ``60+``); ``sex`` is ``F``, ``M`` or ``other``
(``"female"``, ``"f"``... are accepted); any other key's value is a category taken as written,
lower-cased (``"Siemens Skyra"`` -> ``siemens-skyra``). A value whose code is longer than
:data:`MAX_CODE_CHARS`, has a run of more than :data:`MAX_CODE_DIGIT_RUN` digits or more than
:data:`MAX_CODE_DIGITS` digits in all (a serial, accession or patient number looks like that) is
refused: such samples count in no subgroup of that key, and the site's log says how many.

This module never imports Flower.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "AGE_BANDS",
    "MAX_CODE_CHARS",
    "MAX_CODE_DIGITS",
    "MAX_CODE_DIGIT_RUN",
    "METADATA_KEYS",
    "entry_metadata",
    "subgroup_code",
    "subgroup_label",
    "subgroup_rank",
]

METADATA_KEYS: tuple[str, ...] = ("sex", "age", "scanner", "manufacturer", "ethnicity")
"""The datalist entry keys kept as metadata (all optional)."""

AGE_BANDS: tuple[tuple[float, str, str], ...] = (
    (40.0, "lt40", "<40"),
    (60.0, "40to59", "40-59"),
    (math.inf, "60plus", "60+"),
)
"""``(upper bound in years (exclusive), code, label)`` of each age band, youngest first."""

MAX_CODE_CHARS = 20
"""Longest subgroup code."""
MAX_CODE_DIGIT_RUN = 3
"""Most consecutive digits in a code (``1-5t``, ``40to59``, ``ge-750w`` pass)."""
MAX_CODE_DIGITS = 4
"""Most digits in a code in all."""

_SEX = {"f": "f", "female": "f", "w": "f", "woman": "f", "m": "m", "male": "m", "man": "m",
        "o": "other", "other": "other", "x": "other"}  # fmt: skip
_SEX_LABELS = {"f": "F", "m": "M", "other": "other"}
_AGE_TEXT = re.compile(r"\s*(\d{1,3})\s*([YMWD]?)\s*", re.IGNORECASE)
_DICOM_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
_CODE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_NOT_CODE = re.compile(r"[^a-z0-9]+")
_DIGIT_RUN = re.compile(rf"[0-9]{{{MAX_CODE_DIGIT_RUN + 1},}}")


def entry_metadata(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`METADATA_KEYS` an entry carries, with their values as written (others ignored)."""
    return {key: entry[key] for key in METADATA_KEYS if key in entry and entry[key] is not None}


def _age_years(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        years = float(value)
    elif isinstance(value, str) and (match := _AGE_TEXT.fullmatch(value)):
        years = int(match.group(1)) * _DICOM_UNIT_YEARS[match.group(2).upper()]
    else:
        return None
    return years if math.isfinite(years) and 0 <= years < 150 else None


def subgroup_code(key: str, value: Any) -> str | None:
    """The code of ``value``'s subgroup for metadata ``key``; ``None`` when it has none.

    ``None`` for a value that is not usable (an age that is not a number of years, a value that
    is neither text nor a number) or that looks like an identifier (see the module text).

    Examples
    --------
    >>> subgroup_code("sex", "F"), subgroup_code("age", 63), subgroup_code("scanner", "GE Signa 1.5T")
    ('f', '60plus', 'ge-signa-1-5t')
    >>> subgroup_code("scanner", "SN 20231117") is None
    True
    """
    if key == "age":
        years = _age_years(value)
        if years is None:
            return None
        return next(code for bound, code, _ in AGE_BANDS if years < bound)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value).strip().lower()
    if key == "sex":
        return _SEX.get(text)
    code = _NOT_CODE.sub("-", text).strip("-")
    if (
        not code
        or len(code) > MAX_CODE_CHARS
        or _CODE.fullmatch(code) is None
        or _DIGIT_RUN.search(code)
        or sum(c.isdigit() for c in code) > MAX_CODE_DIGITS
    ):
        return None
    return code


def subgroup_label(key: str, code: str) -> str:
    """How a subgroup is shown: ``F`` / ``M`` for ``sex``, ``<40`` / ``40-59`` / ``60+`` for ``age``,
    else the code itself."""
    if key == "sex":
        return _SEX_LABELS.get(code, code)
    if key == "age":
        return next((label for _, c, label in AGE_BANDS if c == code), code)
    return code


def subgroup_rank(key: str, label: str) -> tuple[int, int, str]:
    """Sort key of a shown subgroup: metadata keys in :data:`METADATA_KEYS` order, age bands
    youngest first, ``F`` before ``M`` before ``other``, other values alphabetically."""
    key_rank = METADATA_KEYS.index(key) if key in METADATA_KEYS else len(METADATA_KEYS)
    fixed = {"age": [b[2] for b in AGE_BANDS], "sex": list(_SEX_LABELS.values())}.get(key, [])
    return (key_rank, fixed.index(label) if label in fixed else len(fixed), label)
