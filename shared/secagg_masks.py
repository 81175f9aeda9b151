"""SecAgg+ masks as flat ``uint32`` vectors, from one of two mask generators (pure numpy + AES).

A SecAgg+ mask is a stream of 32-bit words expanded from a secret seed: the site's private mask
seed (32 random bytes) or a pairwise key (ECDH + HKDF, 44 bytes of base64). The sites add the
masks to their quantised vectors (:mod:`medfed.client.secagg_packed`) and the server removes the
private masks of the survivors and the pairwise masks of the sites that dropped out
(:mod:`medfed.server.secagg_unmask`); both must expand the same seed to the same words.

Generators (:data:`MASK_GENERATORS`; run-config key ``secagg-mask-generator``):

``"aes-256-ctr"`` (medfed's default)
    AES-256 in counter mode over zero bytes, read as little-endian ``uint32`` words; the key is
    ``HKDF-SHA256(seed, info=b"medfed SecAgg+ mask v1")``, the initial counter block zero (every
    seed is fresh each round and expands exactly one stream). A cryptographic generator keyed by
    the whole 256-bit secret, as SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020)
    assume, and about 3.5x faster here than Flower's (AES-NI: 1.1 ms per million words against
    3.9 ms; ``python -m medfed.simulations.bench.secagg_parts``). Words are uniform on ``[0, 2^32)``.
``"flower-mt19937"``
    Flower 1.42's ``pseudo_rand_gen(seed, 2**32, shapes)``: NumPy's legacy ``RandomState``
    seeded with the XOR of the seed's 32-bit words, drawing ``[0, 2^32 - 2]``. Only 2^32 seeds
    and a generator whose state can be recovered from its output (see
    ``docs/threat-model-secagg.md``); kept for federations whose sites run Flower's own
    ``secaggplus_mod``, and bit-for-bit equal to it (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfed.shared.config import SECAGG_MASK_GENERATORS, RunConfig, SecAggMaskGenerator

__all__ = [
    "DEFAULT_MASK_GENERATOR",
    "MASK_CHUNK",
    "MASK_GENERATORS",
    "MASK_GENERATOR_KEY",
    "PACKED_MODULUS",
    "FLOWER_MASK_GENERATOR",
    "add_mask",
    "check_mask_generator",
    "expand_mask",
    "mask_key",
    "mask_seed",
]

PACKED_MODULUS = 2**32
"""The only ``modulus_range`` medfed packs in 32 bits (its default; Flower's default and largest)."""

MASK_GENERATORS: tuple[str, ...] = SECAGG_MASK_GENERATORS
DEFAULT_MASK_GENERATOR: SecAggMaskGenerator = RunConfig.secagg_mask_generator  # the run-config key's default
FLOWER_MASK_GENERATOR: SecAggMaskGenerator = "flower-mt19937"
"""The generator of a party that names none: Flower's server workflow and Flower's site mod."""
MASK_GENERATOR_KEY = "medfed-mask-generator"
"""Config-record key of the collect stage: the server names the generator, the site echoes it.
Absent means Flower's (a Flower server workflow, or a Flower site mod)."""

_REJECTED = np.uint32(0xFFFFFFFF)
"""Flower draws masks in ``[0, 2^32 - 2]``: a 32-bit word equal to this is rejected and redrawn."""

_AES_INFO = b"medfed SecAgg+ mask v1"

MASK_CHUNK = 1 << 18
"""Words drawn per step (1 MiB of ``uint32``): small enough to be reused from the allocator's heap
and to stay in cache, so a mask of millions of entries costs no fresh pages."""

_ZEROS = bytes(4 * MASK_CHUNK)
"""The plaintext of an AES-CTR chunk (read only, shared)."""


def check_mask_generator(name: str) -> SecAggMaskGenerator:
    """``name`` if it is a known generator, else ``ValueError`` listing the valid names."""
    if name not in MASK_GENERATORS:
        raise ValueError(
            f"unknown SecAgg+ mask generator {name!r}: use one of {', '.join(map(repr, MASK_GENERATORS))} "
            "(run-config key secagg-mask-generator)."
        )
    return name  # type: ignore[return-value]


def mask_seed(seed: bytes) -> int:
    """The 32-bit ``RandomState`` seed Flower's ``pseudo_rand_gen`` derives from ``seed``: XOR of its words."""
    if len(seed) % 4:
        raise ValueError(f"a SecAgg+ mask seed has a multiple of 4 bytes, got {len(seed)}.")
    out = 0
    for i in range(0, len(seed), 4):
        out ^= int.from_bytes(seed[i : i + 4], "little")
    return out


def mask_key(seed: bytes) -> bytes:
    """The AES-256 key of ``"aes-256-ctr"`` for ``seed``: ``HKDF-SHA256(seed, info=b"medfed SecAgg+ mask v1")``."""
    if len(seed) < 16:
        raise ValueError(f"a SecAgg+ mask seed has at least 16 bytes, got {len(seed)}.")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_AES_INFO).derive(seed)


def _flower_chunks(seed: bytes, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Flower's mask stream for ``seed``, chunk by chunk.

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


def _aes_chunks(seed: bytes, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """AES-256-CTR keystream words for ``seed``, chunk by chunk (one buffer, reused)."""
    encryptor = Cipher(algorithms.AES(mask_key(seed)), modes.CTR(bytes(16))).encryptor()
    block = algorithms.AES.block_size // 8
    buf = bytearray(4 * min(MASK_CHUNK, size) + block - 1)  # update_into needs block - 1 spare bytes
    words = np.frombuffer(buf, dtype="<u4", count=min(MASK_CHUNK, size))
    for start in range(0, size, MASK_CHUNK):
        n = min(MASK_CHUNK, size - start)
        encryptor.update_into(memoryview(_ZEROS)[: 4 * n], buf)
        yield start, words[:n]


_CHUNKS: dict[str, Callable[[bytes, int], Iterator[tuple[int, np.ndarray]]]] = {
    "aes-256-ctr": _aes_chunks,
    FLOWER_MASK_GENERATOR: _flower_chunks,
}


def expand_mask(seed: bytes, size: int, *, generator: str) -> np.ndarray:
    """The SecAgg+ mask of ``size`` entries for ``seed``, as one flat ``uint32`` vector.

    With ``generator="flower-mt19937"`` it equals ``np.concatenate([m.ravel() for m in
    pseudo_rand_gen(seed, 2**32, shapes)])`` for any shapes of ``size`` entries in total (Flower
    draws consecutive 32-bit words from one generator, array after array).

    Returns
    -------
    numpy.ndarray
        Shape ``(size,)``, dtype ``uint32``.
    """
    chunks = _CHUNKS[check_mask_generator(generator)]
    out = np.empty(size, dtype=np.uint32)
    for start, words in chunks(seed, size):
        out[start : start + words.size] = words
    return out


def add_mask(vector: np.ndarray, seed: bytes, *, generator: str, subtract: bool = False) -> np.ndarray:
    """``vector += expand_mask(seed, vector.size)`` (or ``-=``), modulo ``2^32``, in place, chunk by chunk.

    The same result as adding the whole mask, without allocating it: one chunk of
    :data:`MASK_CHUNK` words at a time.

    Parameters
    ----------
    vector
        Flat ``uint32`` vector, shape ``(n,)``; overwritten.
    seed
        The mask's secret seed.
    generator
        One of :data:`MASK_GENERATORS`.
    subtract
        Subtract the mask instead of adding it.

    Returns
    -------
    numpy.ndarray
        ``vector``.
    """
    if vector.dtype != np.uint32 or vector.ndim != 1:
        raise ValueError(f"add_mask needs a flat uint32 vector, got {vector.dtype} of shape {vector.shape}.")
    chunks = _CHUNKS[check_mask_generator(generator)]
    op = np.subtract if subtract else np.add
    for start, words in chunks(seed, vector.size):
        part = vector[start : start + words.size]
        op(part, words, out=part)
    return vector
