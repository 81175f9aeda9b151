"""The arithmetic of SecAgg+'s unmask stage on flat ``uint32`` vectors.

Flower's ``SecAggPlusWorkflow.unmask_stage`` removes each mask with
``pseudo_rand_gen(seed, 2**32, shapes)`` (one ``int64`` array per parameter tensor, drawn word by
word into ``int64``) and ``int64`` additions, then reduces modulo ``2^32``. With the modulus at
``2^32`` the same sums are ``uint32`` arithmetic, which wraps by itself: :func:`remove_masks`
adds or subtracts every mask in place on one flat ``uint32`` vector, drawn chunk by chunk
(:func:`medfed.shared.secagg_masks.add_mask`) from the generator the sites used (Flower's, tested
equal to ``pseudo_rand_gen``, or medfed's AES-256-CTR), without the per-tensor lists, the
``int64`` copies or a whole mask in memory. Secrets are recovered as Flower's ``combine_shares``
recovers them (:func:`medfed.shared.shamir.combine_shares`: the same interpolation, faster; tested equal) and the
pairwise keys with Flower's own ``generate_shared_key``.
``tests/server/test_secagg_unmask.py`` checks the aggregate against Flower's own stage (and
against an independent AES reference), with and without sites dropping out.

:func:`sum_masked_vectors` does the same for the collect stage's sum: Flower reads every site's
masked arrays with ``np.load`` (a chunked copy), adds them per tensor into new ``int64`` arrays and
reduces modulo ``2^32`` at the end; here each ``.npy`` payload is read in place
(``np.frombuffer`` after its header) and added into one ``uint32`` buffer, which wraps modulo
``2^32`` by itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.common import NDArrays
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from medfed.shared.secagg_masks import FLOWER_MASK_GENERATOR, PACKED_MODULUS, add_mask
from medfed.shared.shamir import combine_shares
from medfed.shared.weights import npy_view

__all__ = ["combine_shares", "npy_view", "remove_masks", "sum_masked_vectors"]  # npy_view lives in medfed.shared.weights


def sum_masked_vectors(payloads: Sequence[Sequence[bytes]]) -> NDArrays:
    """The sum modulo ``2^32`` of the sites' masked vectors, as Flower's collect stage computes it.

    Parameters
    ----------
    payloads
        One list per site: its masked arrays as ``.npy`` bytes (the factor first, then one
        array per parameter tensor), ``uint32`` (medfed's sites) or ``int64`` (Flower's mod).

    Returns
    -------
    list of numpy.ndarray
        ``uint32`` arrays of the first site's shapes, views into one flat buffer: equal, entry
        by entry, to Flower's ``parameters_mod(sum, 2^32)``.

    Raises
    ------
    ValueError
        If the sites' arrays differ in number or shape.
    """
    if not payloads:
        raise ValueError("no masked vectors to sum.")
    shapes: list[tuple[int, ...]] | None = None
    total: np.ndarray | None = None
    for site_payloads in payloads:
        arrays = [npy_view(b) for b in site_payloads]
        if shapes is None:
            shapes = [a.shape for a in arrays]
            total = np.zeros(sum(a.size for a in arrays), dtype=np.uint32)
        elif [a.shape for a in arrays] != shapes:
            raise ValueError("the sites' masked vectors differ in shape; every site must send the same model.")
        start = 0
        for a in arrays:
            part = total[start : start + a.size]  # type: ignore[index]
            if a.dtype == np.uint32:
                np.add(part, a.ravel(), out=part)
            else:  # int64 from Flower's mod: reduce first (values are in [0, 2^32) anyway)
                np.add(part, np.mod(a.ravel(), PACKED_MODULUS).astype(np.uint32), out=part)
            start += a.size
    out, start = [], 0
    for shape in shapes or []:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(total[start : start + size].reshape(shape))  # type: ignore[index]
        start += size
    return out


def remove_masks(
    masked: NDArrays,
    *,
    shares: Mapping[int, Sequence[bytes]],
    active: set[int],
    neighbours: Mapping[int, set[int]],
    public_keys: Mapping[int, Sequence[bytes]],
    threshold: int,
    generator: str = FLOWER_MASK_GENERATOR,
) -> NDArrays | None:
    """The sum of the active sites' quantised vectors: ``masked`` without any mask.

    Parameters
    ----------
    masked
        The sum of the active sites' masked vectors modulo ``2^32`` (the collect stage's
        ``state.aggregate_ndarrays``), one integer array per parameter tensor.
    shares
        Node id -> the Shamir shares of its secret collected in the unmask stage: the private
        mask seed of an active site, the first secret key of a dropped one.
    active
        Sites whose masked vector is in ``masked``.
    neighbours
        Node id -> its SecAgg+ neighbours (itself included, as Flower keeps them).
    public_keys
        Node id -> its public keys (the first is the pairwise-mask key).
    threshold
        Shares needed to recover a secret.
    generator
        The mask generator the sites used (:data:`medfed.shared.secagg_masks.MASK_GENERATORS`).

    Returns
    -------
    list of numpy.ndarray or None
        The unmasked sum, ``int64`` arrays of ``masked``'s shapes with values in ``[0, 2^32)``
        (as Flower's ``parameters_mod`` leaves them); ``None`` when a secret has too few shares.
    """
    shapes = [np.shape(a) for a in masked]
    if all(np.asarray(a).dtype == np.uint32 for a in masked):  # :func:`sum_masked_vectors`'s output
        vector = np.concatenate([np.asarray(a).ravel() for a in masked] + [np.zeros(0, np.uint32)])
    else:
        total = np.concatenate([np.asarray(a).ravel() for a in masked] + [np.zeros(0, np.int64)])
        if total.size and (total.min() < 0 or total.max() >= PACKED_MODULUS):
            total = np.mod(total, PACKED_MODULUS)
        vector = total.astype(np.uint32)
    for nid, share_list in shares.items():
        if len(share_list) < threshold:
            return None
        secret = combine_shares(list(share_list))
        if nid in active:  # the private mask seed of a site that sent its vector
            add_mask(vector, secret, generator=generator, subtract=True)
            continue
        private = bytes_to_private_key(secret)  # a dropped site's first secret key
        for other in neighbours[nid] - {nid}:  # every neighbour, as Flower's stage does
            key = generate_shared_key(private, bytes_to_public_key(public_keys[other][0]))
            add_mask(vector, key, generator=generator, subtract=nid < other)
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(vector[start : start + size].astype(np.int64).reshape(shape))
        start += size
    return out
