"""Fixtures shared across the test packages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.support.medmnist import medmnist_dir, missing_reason


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.data`` (or ``data("file.npz", ...)``): skip, saying why, when the MedMNIST files are absent."""
    marker = item.get_closest_marker("data")
    if marker is not None:
        reason = missing_reason(*marker.args)
        if reason:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def medmnist() -> Path:
    """The MedMNIST folder (``$MEDFED_DATA_DIR`` or ``../shared/data/medmnist``); it may not exist."""
    return medmnist_dir()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test, restored after it.

    For modules whose sites train in this process one after another: one thread each is
    fastest on a shared 2-core CPU (two contending threads are slower). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
