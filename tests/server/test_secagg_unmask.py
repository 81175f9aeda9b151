"""medfed's unmask arithmetic (flat uint32) against Flower's (per-tensor int64) on the same protocol state.

The protocol runs in-process under :class:`MedfedSecAggPlusWorkflow` (tests/client/test_secagg_packed.py
has the harness); a spy on :func:`remove_masks` recomputes every call with Flower's own primitives
(``pseudo_rand_gen``, ``parameters_addition`` / ``parameters_subtraction`` / ``parameters_mod``), the loop
of Flower's ``unmask_stage``, and asserts the integer vectors are equal entry by entry. Under medfed's
AES-256-CTR generator the masks in that loop come from a hand-built AES reference (ECB of the counter
blocks) instead of ``pseudo_rand_gen``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from medfed.client.secagg_packed import packed_secaggplus_mod
from medfed.server import secagg_unmask, secure
from tests.client.test_secagg_packed import _aes_reference, _flower, _run


def _aes_masks(seed: bytes, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """``pseudo_rand_gen``'s interface (one int64 array per shape) over the AES reference stream."""
    stream = _aes_reference(seed, int(sum(np.prod(s, dtype=int) for s in shapes))).astype(np.int64)
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=int))
        out.append(stream[start : start + size].reshape(shape))
        start += size
    return out


def _flowers_unmask(masked, *, shares, active, neighbours, public_keys, threshold, generator):
    """Flower 1.42's unmask-stage arithmetic, step for step (masks from ``generator``)."""
    if generator == "flower-mt19937":
        def draw(seed, shapes):
            return pseudo_rand_gen(seed, 2**32, shapes)
    else:
        assert generator == "aes-256-ctr"
        draw = _aes_masks
    vector = list(masked)
    for nid, share_list in shares.items():
        if len(share_list) < threshold:
            return None
        secret = combine_shares(list(share_list))
        if nid in active:
            vector = parameters_subtraction(vector, draw(secret, get_parameters_shape(vector)))
            continue
        for other in neighbours[nid] - {nid}:
            key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(public_keys[other][0]))
            mask = draw(key, get_parameters_shape(vector))
            vector = parameters_addition(vector, mask) if nid > other else parameters_subtraction(vector, mask)
    return parameters_mod(vector, 2**32)


@pytest.mark.parametrize(("mod", "generator"), [
    (_flower.secaggplus_mod, "flower-mt19937"),
    (packed_secaggplus_mod, "flower-mt19937"),
    (packed_secaggplus_mod, "aes-256-ctr"),
], ids=["flower-mod", "packed-mod", "packed-mod-aes"])
@pytest.mark.parametrize("dead", [set(), {3}, {1, 4}])
def test_unmasked_sum_equals_flowers_entry_by_entry(monkeypatch: pytest.MonkeyPatch, dead: set[int], mod,
                                                    generator: str) -> None:
    calls: list[tuple[int, int]] = []

    def spy(masked, **kw):
        ours = secagg_unmask.remove_masks(masked, **kw)
        theirs = _flowers_unmask(masked, **kw)
        assert ours is not None and theirs is not None
        for a, b in zip(ours, theirs, strict=True):
            assert a.dtype == np.int64 and a.shape == b.shape and np.array_equal(a, b)
        calls.append((len(kw["active"]), sum(a.size for a in ours), kw["generator"]))
        return ours

    monkeypatch.setattr(secure, "remove_masks", spy)
    plan = {1: (Stage.COLLECT_MASKED_VECTORS, dead), 2: (Stage.COLLECT_MASKED_VECTORS, dead)} if dead else None
    agg, _ = _run(mod, sites=5, rounds=2, on_grid=False, plan=plan, server="medfed", generator=generator)
    assert sorted(agg) == [1, 2]
    assert calls == [(5 - len(dead), 1 + 72, generator)] * 2  # the weight factor entry plus the 72 parameters


def test_too_few_shares_is_refused() -> None:
    masked = [np.zeros(3, np.int64)]
    out = secagg_unmask.remove_masks(masked, shares={1: [b"x"]}, active={1}, neighbours={1: {1}},
                                     public_keys={}, threshold=2, generator="aes-256-ctr")
    assert out is None


@pytest.mark.parametrize("dtype", [np.uint32, np.int64], ids=["packed-uint32", "flower-int64"])
def test_collect_sum_equals_flowers(dtype) -> None:
    """sum_masked_vectors == Flower's collect-stage sum (bytes_to_ndarray, parameters_addition, parameters_mod)."""
    rng = np.random.default_rng(0)
    shapes = [(1,), (3, 4), (), (0,), (2, 3, 5)]
    sites = [[rng.integers(0, 2**32 - 1, size=s, dtype=np.int64).astype(dtype) for s in shapes] for _ in range(6)]
    sites[0][2] = np.asfortranarray(rng.integers(0, 2**32 - 1, size=(2, 3), dtype=np.int64).astype(dtype))
    for site in sites[1:]:
        site[2] = rng.integers(0, 2**32 - 1, size=(2, 3), dtype=np.int64).astype(dtype)
    payloads = [[ndarray_to_bytes(a) for a in site] for site in sites]
    theirs = None
    for site in payloads:
        arrays = [bytes_to_ndarray(b) for b in site]
        theirs = arrays if theirs is None else parameters_addition(theirs, arrays)
    theirs = parameters_mod(theirs, 2**32)
    ours = secagg_unmask.sum_masked_vectors(payloads)
    assert [a.shape for a in ours] == [a.shape for a in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == np.uint32 and np.array_equal(a.astype(np.int64), b.astype(np.int64))


def test_collect_sum_refuses_mismatched_sites() -> None:
    one = [ndarray_to_bytes(np.zeros(3, np.uint32))]
    other = [ndarray_to_bytes(np.zeros(4, np.uint32))]
    with pytest.raises(ValueError, match="differ in shape"):
        secagg_unmask.sum_masked_vectors([one, other])
    pickled = io.BytesIO()
    np.save(pickled, np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object array"):
        secagg_unmask.npy_view(pickled.getvalue())
