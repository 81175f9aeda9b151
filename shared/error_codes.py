"""The fixed categories and codes of a site's error replies: what leaves a site instead of exception text.

A site's egress guard (:mod:`medfed.client.egress`) replaces every error a site would send with
one of these categories, its code and the exception's class name; the text of the exception
(which can name a file, a patient folder or a value) stays in the site's own log. The
coordinator (:mod:`medfed.server.rounds`) names a failed site's reply by its category.

=====================  ======  ==============================================================
category               code    when
=====================  ======  ==============================================================
``egress-blocked``     4100    the reply broke the egress rules (a name or a value type)
``privacy-refused``    4101    the site's privacy policy or ledger refused the round
``config-error``       4102    the run or site configuration is invalid for this site
``data-error``         4103    the site's data could not be read or used
``environment-error``  4104    a module, a device or memory is missing at the site
``internal-error``     4105    anything else
=====================  ======  ==============================================================

An exception class may name its category with a class attribute ``egress_category`` (one of the
names above); otherwise :func:`category_of` decides from its type.
"""

from __future__ import annotations

from medfed.shared.config import ConfigError
from medfed.shared.data.base import DataError
from medfed.shared.privacy import LedgerError

__all__ = ["SITE_ERROR_CODES", "CATEGORY_OF_CODE", "EGRESS_BLOCKED", "INTERNAL_ERROR", "category_of"]

EGRESS_BLOCKED = "egress-blocked"
INTERNAL_ERROR = "internal-error"
SITE_ERROR_CODES: dict[str, int] = {
    EGRESS_BLOCKED: 4100,
    "privacy-refused": 4101,
    "config-error": 4102,
    "data-error": 4103,
    "environment-error": 4104,
    INTERNAL_ERROR: 4105,
}
"""Category -> the ``Error.code`` of the reply."""
CATEGORY_OF_CODE: dict[int, str] = {code: name for name, code in SITE_ERROR_CODES.items()}
"""``Error.code`` -> category (what the coordinator records)."""

# Checked in order: the first base class that matches decides.
_BY_TYPE: tuple[tuple[type[BaseException], str], ...] = (
    (LedgerError, "privacy-refused"),
    (ConfigError, "config-error"),
    (DataError, "data-error"),
    (ImportError, "environment-error"),
    (MemoryError, "environment-error"),
    (OSError, "data-error"),  # at a site, files are the data (FileNotFoundError, PermissionError, ...)
)


def category_of(error: BaseException) -> str:
    """The category of ``error`` (see the module's table).

    An ``egress_category`` attribute of the exception's class wins when it names a category;
    otherwise the first matching type of ``LedgerError``, ``ConfigError``, ``DataError``,
    ``ImportError``/``MemoryError``, ``OSError`` decides (PyTorch's ``OutOfMemoryError`` is an
    ``environment-error``); anything else is ``internal-error``.
    """
    declared = getattr(type(error), "egress_category", None)
    if isinstance(declared, str) and declared in SITE_ERROR_CODES:
        return declared
    if type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (a RuntimeError)
        return "environment-error"
    for base, category in _BY_TYPE:
        if isinstance(error, base):
            return category
    return INTERNAL_ERROR
