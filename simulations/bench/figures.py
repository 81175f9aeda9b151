"""Machine-readable benchmark figures: the schema of each section of ``docs/bench/results.json``.

``medfed bench`` writes every figure it prints into ``results.json`` beside the plots, one list of
rows per section (:attr:`medfed.simulations.bench.suite.SectionResult.figures`); each row holds
at least the fields below with these types (a row may hold more: the raw seconds behind a
ratio, the load of the machine when it was measured, ...)::

    secagg      sites, params, time_ratio, upload_ratio, training
    overhead    model, sites, ratio_wall, ratio_later_rounds
    scale       sites, sites_per_round, seconds_per_round, peak_mib
    throughput  model, images_per_s, dtype, threads

:func:`check_rows` validates a section before it is written, so a benchmark cannot write a
figure the schema does not describe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SCHEMAS", "check_rows"]

SCHEMAS: dict[str, dict[str, type]] = {
    "secagg": {"sites": int, "params": int, "time_ratio": float, "upload_ratio": float, "training": bool},
    "overhead": {"model": str, "sites": int, "ratio_wall": float, "ratio_later_rounds": float},
    "scale": {"sites": int, "sites_per_round": int, "seconds_per_round": float, "peak_mib": float},
    "throughput": {"model": str, "images_per_s": float, "dtype": str, "threads": int},
}
"""Section -> required field -> type (``float`` fields accept ints; ``int`` fields refuse bools)."""


def _type_ok(value: Any, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, expected)


def check_rows(section: str, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate the rows of ``section`` against :data:`SCHEMAS`; return them as plain dicts.

    Raises
    ------
    ValueError
        Naming the section, the row and the field that is missing or of the wrong type, or an
        unknown section (listing the known ones).
    """
    if section not in SCHEMAS:
        raise ValueError(f"results.json has no section {section!r}; known sections: {', '.join(SCHEMAS)}.")
    schema = SCHEMAS[section]
    out = []
    for i, row in enumerate(rows):
        for name, expected in schema.items():
            if name not in row:
                raise ValueError(f"results.json section {section!r}, row {i}: field {name!r} is missing.")
            if not _type_ok(row[name], expected):
                raise ValueError(
                    f"results.json section {section!r}, row {i}: field {name!r} = {row[name]!r} is not a finite "
                    f"{expected.__name__}."
                )
        out.append(dict(row))
    return out
