"""Finding the command-line programs installed with medfed (Flower's ``flwr``, ``medfed-clientapp``, ...)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["installed_executable"]


def installed_executable(
    name: str,
    *,
    error: Callable[[str], BaseException] = FileNotFoundError,
    fix: str = "install medfed with its pinned flwr version",
) -> str:
    """The path of the program ``name`` (``flwr``, ``flower-supernode``, ``medfed-clientapp``, ...).

    The one beside the running interpreter (the virtual environment medfed is installed in) comes
    first, then the first on ``PATH``. Never imports Flower.

    Parameters
    ----------
    name
        The program's file name.
    error
        Builds the exception raised when the program is found nowhere (the caller's own error
        type, so its command-line handler reports it); given the message.
    fix
        What the message tells the user to do.

    Raises
    ------
    BaseException
        ``error(message)`` if ``name`` is not installed.
    """
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise error(f"{name} is not installed: {fix}.")
    return found
