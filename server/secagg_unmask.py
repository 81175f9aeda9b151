"""The arithmetic of SecAgg+'s unmask stage on flat ``uint32`` vectors.

Flower's ``SecAggPlusWorkflow.unmask_stage`` removes each mask with
``pseudo_rand_gen(seed, 2**32, shapes)`` (one ``int64`` array per parameter tensor, drawn word by
word into ``int64``) and ``int64`` additions, then reduces modulo ``2^32``. With the modulus at
``2^32`` the same sums are ``uint32`` arithmetic, which wraps by itself: :func:`remove_masks`
draws every mask as one flat ``uint32`` vector (:func:`medfed.shared.secagg_masks.expand_mask`,
tested equal to Flower's generator) and adds or subtracts it in place, without the per-tensor
lists and the ``int64`` copies. Secrets are recovered with Flower's own ``combine_shares`` and the
pairwise keys with Flower's own ``generate_shared_key``: the protocol and its security are
Flower's; only the array arithmetic changes. ``tests/server/test_secagg_unmask.py`` checks the
aggregate against Flower's own stage, with and without sites dropping out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.common import NDArrays
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from medfed.shared.secagg_masks import PACKED_MODULUS, expand_mask

__all__ = ["remove_masks"]


def remove_masks(
    masked: NDArrays,
    *,
    shares: Mapping[int, Sequence[bytes]],
    active: set[int],
    neighbours: Mapping[int, set[int]],
    public_keys: Mapping[int, Sequence[bytes]],
    threshold: int,
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

    Returns
    -------
    list of numpy.ndarray or None
        The unmasked sum, ``int64`` arrays of ``masked``'s shapes with values in ``[0, 2^32)``
        (as Flower's ``parameters_mod`` leaves them); ``None`` when a secret has too few shares.
    """
    shapes = [np.shape(a) for a in masked]
    total = np.concatenate([np.asarray(a).ravel() for a in masked] + [np.zeros(0, np.int64)])
    if total.size and (total.min() < 0 or total.max() >= PACKED_MODULUS):
        total = np.mod(total, PACKED_MODULUS)
    vector = total.astype(np.uint32)
    for nid, share_list in shares.items():
        if len(share_list) < threshold:
            return None
        secret = combine_shares(list(share_list))
        if nid in active:  # the private mask seed of a site that sent its vector
            vector -= expand_mask(secret, vector.size)
            continue
        private = bytes_to_private_key(secret)  # a dropped site's first secret key
        for other in neighbours[nid] - {nid}:  # every neighbour, as Flower's stage does
            key = generate_shared_key(private, bytes_to_public_key(public_keys[other][0]))
            if nid > other:
                vector += expand_mask(key, vector.size)
            else:
                vector -= expand_mask(key, vector.size)
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(vector[start : start + size].astype(np.int64).reshape(shape))
        start += size
    return out
