"""SecAgg+ masks as flat ``uint32`` vectors: Flower's mask generator, vectorised (pure numpy).

Flower's ``pseudo_rand_gen(seed, 2**32, shapes)`` seeds ``numpy.random.RandomState`` with the XOR
of the seed's 32-bit words and draws one word at a time into ``int64`` arrays, one per shape.
:func:`expand_mask` draws the same stream as one ``uint32`` vector. Used at the sites
(:mod:`medfed.client.secagg_packed`) and at the server (:mod:`medfed.server.secagg_unmask`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PACKED_MODULUS", "expand_mask", "mask_seed"]

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
    gen = np.random.RandomState(mask_seed(seed))
    words = gen.randint(0, PACKED_MODULUS, size=size, dtype=np.uint32)
    rejected = np.flatnonzero(words == _REJECTED)
    while rejected.size:  # about size / 2^32 per mask: keep the stream of accepted words
        kept = np.delete(words, rejected)
        more = gen.randint(0, PACKED_MODULUS, size=rejected.size, dtype=np.uint32)
        words = np.concatenate([kept, more])
        rejected = np.flatnonzero(more == _REJECTED) + kept.size
    return words
