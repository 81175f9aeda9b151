"""``npy_view``: a ``.npy`` payload read in place, equal to what ``np.load`` reads."""

from __future__ import annotations

import io

import numpy as np
import pytest

from medfed.shared.weights import npy_view


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


CASES = [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.array(7, np.int64),
    np.zeros((0, 5), np.uint32),
    np.array([True, False]),
]


@pytest.mark.parametrize("array", CASES, ids=lambda a: f"{a.dtype}-{a.shape}")
def test_it_reads_what_np_load_reads_without_a_copy(array: np.ndarray) -> None:
    payload = _npy(array)
    view = npy_view(payload)
    expected = np.load(io.BytesIO(payload))
    assert view.dtype == expected.dtype and view.shape == expected.shape
    np.testing.assert_array_equal(view, expected)
    assert not view.flags.writeable  # shares the payload's (immutable) bytes
    if array.size:
        assert np.shares_memory(view, np.frombuffer(payload, np.uint8))


def test_a_truncated_payload_and_a_pickle_are_refused() -> None:
    payload = _npy(np.arange(100, dtype=np.float32))
    with pytest.raises(ValueError):
        npy_view(payload[:-4])
    with pytest.raises(ValueError, match="object array"):
        npy_view(_object_npy())


def _object_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()
