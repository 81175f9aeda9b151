"""medfed's unmask arithmetic (flat uint32) against Flower's (per-tensor int64) on the same protocol state.

The protocol runs in-process under :class:`MedfedSecAggPlusWorkflow` (tests/client/test_secagg_packed.py
has the harness); a spy on :func:`remove_masks` recomputes every call with Flower's own primitives
(``pseudo_rand_gen``, ``parameters_addition`` / ``parameters_subtraction`` / ``parameters_mod``), the loop
of Flower's ``unmask_stage``, and asserts the integer vectors are equal entry by entry.
"""

from __future__ import annotations

import numpy as np
import pytest
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
from tests.client.test_secagg_packed import _flower, _run


def _flowers_unmask(masked, *, shares, active, neighbours, public_keys, threshold):
    """Flower 1.42's unmask-stage arithmetic, step for step."""
    vector = list(masked)
    for nid, share_list in shares.items():
        if len(share_list) < threshold:
            return None
        secret = combine_shares(list(share_list))
        if nid in active:
            vector = parameters_subtraction(vector, pseudo_rand_gen(secret, 2**32, get_parameters_shape(vector)))
            continue
        for other in neighbours[nid] - {nid}:
            key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(public_keys[other][0]))
            mask = pseudo_rand_gen(key, 2**32, get_parameters_shape(vector))
            vector = parameters_addition(vector, mask) if nid > other else parameters_subtraction(vector, mask)
    return parameters_mod(vector, 2**32)


@pytest.mark.parametrize("mod", [_flower.secaggplus_mod, packed_secaggplus_mod], ids=["flower-mod", "packed-mod"])
@pytest.mark.parametrize("dead", [set(), {3}, {1, 4}])
def test_unmasked_sum_equals_flowers_entry_by_entry(monkeypatch: pytest.MonkeyPatch, dead: set[int], mod) -> None:
    calls: list[tuple[int, int]] = []

    def spy(masked, **kw):
        ours = secagg_unmask.remove_masks(masked, **kw)
        theirs = _flowers_unmask(masked, **kw)
        assert ours is not None and theirs is not None
        for a, b in zip(ours, theirs, strict=True):
            assert a.dtype == np.int64 and a.shape == b.shape and np.array_equal(a, b)
        calls.append((len(kw["active"]), sum(a.size for a in ours)))
        return ours

    monkeypatch.setattr(secure, "remove_masks", spy)
    plan = {1: (Stage.COLLECT_MASKED_VECTORS, dead), 2: (Stage.COLLECT_MASKED_VECTORS, dead)} if dead else None
    agg, _ = _run(mod, sites=5, rounds=2, on_grid=False, plan=plan, server="medfed")
    assert sorted(agg) == [1, 2]
    assert calls == [(5 - len(dead), 1 + 72)] * 2  # the weight factor entry plus the 72 parameters


def test_too_few_shares_is_refused() -> None:
    masked = [np.zeros(3, np.int64)]
    out = secagg_unmask.remove_masks(masked, shares={1: [b"x"]}, active={1}, neighbours={1: {1}},
                                     public_keys={}, threshold=2)
    assert out is None
