"""Where the tests find the real MedMNIST files, and why a ``data`` test skips without them."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = "MEDFED_DATA_DIR"


def medmnist_dir() -> Path:
    """``$MEDFED_DATA_DIR``, else ``../shared/data/medmnist`` beside the repository."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data" / "medmnist"


def missing_reason(*names: str) -> str | None:
    """Why a test needing ``names`` (default ``breastmnist.npz``) cannot run, or ``None``."""
    folder = medmnist_dir()
    absent = [n for n in names or ("breastmnist.npz",) if not (folder / n).is_file()]
    if not absent:
        return None
    return (
        f"needs the real MedMNIST file(s) {', '.join(absent)} in {folder} (not shipped in the repository): "
        f"set {ENV}=/path/to/medmnist, or place the project's shared/data/medmnist beside the clone"
    )
