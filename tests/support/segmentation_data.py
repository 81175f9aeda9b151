"""Where the tests find the real segmentation sets (``../shared/data/segmentation``), and why they skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = "MEDFED_SEGMENTATION_DIR"


def segmentation_dir() -> Path:
    """``$MEDFED_SEGMENTATION_DIR``, else ``../shared/data/segmentation`` beside the repository."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data" / "segmentation"


def needs(folder: str) -> pytest.MarkDecorator:
    """Skip, saying why, unless ``folder`` (e.g. ``isbi2012-em``) is in :func:`segmentation_dir`."""
    path = segmentation_dir() / folder
    return pytest.mark.skipif(
        not path.is_dir(),
        reason=f"needs the real data set {folder}/ in {path.parent} (not shipped in the repository): set {ENV}, "
        "or place the project's shared/data/segmentation beside the clone",
    )
