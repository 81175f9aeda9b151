"""SecAgg+ masks as flat ``uint32`` vectors: Flower's mask generator, vectorised (pure numpy).

Flower's ``pseudo_rand_gen(seed, 2**32, shapes)`` seeds ``numpy.random.RandomState`` with the XOR
of the seed's 32-bit words and draws one word at a time into ``int64`` arrays, one per shape.
:func:`expand_mask` draws the same stream as one ``uint32`` vector. Used at the sites
(:mod:`medfed.client.secagg_packed`) and at the server (:mod:`medfed.server.secagg_unmask`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["MASK_CHUNK", "PACKED_MODULUS", "add_mask", "expand_mask", "mask_seed"]

PACKED_MODULUS = 2**32
"""The only ``modulus_range`` medfed packs in 32 bits (its default; Flower's default and largest)."""

_REJECTED = np.uint32(0xFFFFFFFF)
"""Flower draws masks in ``[0, 2^32 - 2]``: a 32-bit word equal to this is rejected and redrawn."""


def mask_seed(seed: bytes) -> int:
    """The 32-bit ``RandomState`` seed Flower's ``pseudo_rand_gen`` derives from ``seed``: XOR of its words."""
    if len(seed) % 4:
        raise ValueError(f"a SecAgg+ mask seed has a multiple of 4 bytes, got {len(seed)}.")
    out = 0
    for i in range(0, len(seed), 4):
        out ^= int.from_bytes(seed[i : i + 4], "little")
    return out


MASK_CHUNK = 1 << 18
"""Words drawn per step (1 MiB of ``uint32``): small enough to be reused from the allocator's heap
and to stay in cache, so a mask of millions of entries costs no fresh pages."""


def _mask_chunks(seed: bytes, size: int):  # type: ignore[no-untyped-def]
    """Yield ``(start, words)``: Flower's mask stream for ``seed``, ``size`` words in all, in order.

    Flower draws one word at a time and redraws a rejected ``0xFFFFFFFF``; drawing a chunk, dropping
    its rejected words and drawing the shortfall next gives the same accepted words in the same
    order (the generator's stream is consumed sequentially either way).
    """
    gen = np.random.RandomState(mask_seed(seed))
    filled = 0
    while filled < size:
        words = gen.randint(0, PACKED_MODULUS, size=min(MASK_CHUNK, size - filled), dtype=np.uint32)
        if (words == _REJECTED).any():  # about once per 2^32 words
            words = words[words != _REJECTED]
        yield filled, words
        filled += words.size


def expand_mask(seed: bytes, size: int) -> np.ndarray:
    """Flower's SecAgg+ mask for ``size`` entries, as one flat ``uint32`` vector.

    Equals ``np.concatenate([m.ravel() for m in pseudo_rand_gen(seed, 2**32, shapes)])`` for any
    shapes of ``size`` entries in total (Flower draws consecutive 32-bit words from one
    generator, array after array, rejecting ``0xFFFFFFFF``).

    Returns
    -------
    numpy.ndarray
        Shape ``(size,)``, dtype ``uint32``, values in ``[0, 2^32 - 2]``.
    """
    out = np.empty(size, dtype=np.uint32)
    for start, words in _mask_chunks(seed, size):
        out[start : start + words.size] = words
    return out


def add_mask(vector: np.ndarray, seed: bytes, *, subtract: bool = False) -> np.ndarray:
    """``vector += expand_mask(seed, vector.size)`` (or ``-=``), modulo ``2^32``, in place, chunk by chunk.

    The same result as adding the whole mask, without allocating it: one chunk of
    :data:`MASK_CHUNK` words at a time.

    Parameters
    ----------
    vector
        Flat ``uint32`` vector, shape ``(n,)``; overwritten.

    Returns
    -------
    numpy.ndarray
        ``vector``.
    """
    if vector.dtype != np.uint32 or vector.ndim != 1:
        raise ValueError(f"add_mask needs a flat uint32 vector, got {vector.dtype} of shape {vector.shape}.")
    op = np.subtract if subtract else np.add
    for start, words in _mask_chunks(seed, vector.size):
        part = vector[start : start + words.size]
        op(part, words, out=part)
    return vector
