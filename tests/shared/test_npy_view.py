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


def test_headers_are_parsed_once_and_each_payload_keeps_its_own_data() -> None:
    """Equal headers share one parse; the data still comes from each payload (not from the cache)."""
    from medfed.shared import weights

    weights._npy_header.cache_clear()
    first, second = np.arange(6, dtype=np.float32), np.arange(6, 12, dtype=np.float32)
    a, b = npy_view(_npy(first)), npy_view(_npy(second))
    np.testing.assert_array_equal(a, first)
    np.testing.assert_array_equal(b, second)
    info = weights._npy_header.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    npy_view(_npy(first.reshape(2, 3)))  # another shape: another header
    assert weights._npy_header.cache_info().misses == 2


def test_a_version_2_header_and_bytes_that_are_not_npy() -> None:
    array = np.arange(10, dtype=np.int16)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=(2, 0))
    payload = buffer.getvalue()
    assert payload[6] == 2  # 4-byte header length
    np.testing.assert_array_equal(npy_view(payload), array)
    with pytest.raises(ValueError, match="not an .npy payload"):
        npy_view(b"PK\x03\x04 a zip file, not an array")
    with pytest.raises(ValueError, match="not an .npy payload"):
        npy_view(b"")
