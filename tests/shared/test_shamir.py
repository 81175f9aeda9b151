"""medfed's Shamir sharing (``medfed.shared.shamir``) against Flower's, in Flower's share format, both ways."""

from __future__ import annotations

import random

import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.shamir import create_shares as flower_create_shares

from medfed.shared import shamir


def test_combine_shares_equals_flowers_on_random_secrets_and_subsets() -> None:
    """medfed's interpolation (cached Lagrange coefficients, shift-and-add products) against Flower's
    ``combine_shares`` (pycryptodome) on the share format Flower's ``create_shares`` writes."""
    import random

    from flwr.common.secure_aggregation.crypto.shamir import create_shares

    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(2, 9)
        t = rng.randint(2, n)
        secret = rng.randbytes(rng.choice([1, 15, 16, 17, 32, 44, 48]))
        shares = create_shares(secret, t, n)
        subset = rng.sample(shares, rng.randint(t, n))
        assert shamir.combine_shares(subset) == combine_shares(subset) == secret
        assert shamir.combine_shares(subset[::-1]) == secret



def test_combine_shares_computes_one_coefficient_set_whatever_the_reply_order() -> None:
    """Replies (and so shares) arrive in any order: the coefficients are computed once per set of
    indices, not once per order (a miss costs a field inversion; 8 orders of 8 shares once cost 0.45 s)."""
    import random

    from flwr.common.secure_aggregation.crypto.shamir import create_shares

    rng = random.Random(1)
    shamir._lagrange_at_zero.cache_clear()
    for _ in range(12):
        secret = rng.randbytes(32)
        shares = create_shares(secret, 5, 8)
        rng.shuffle(shares)
        assert shamir.combine_shares(shares) == secret
    info = shamir._lagrange_at_zero.cache_info()
    assert (info.misses, info.hits) == (1, 11)
    # the batched inversion gives each index set the same coefficients as one inversion per denominator
    indices = (1, 3, 4, 7, 8)
    expected = []
    for j, x_j in enumerate(indices):
        numerator, denominator = 1, 1
        for m, x_m in enumerate(indices):
            if m != j:
                numerator = shamir._gf_mul(numerator, x_m)
                denominator = shamir._gf_mul(denominator, x_j ^ x_m)
        expected.append(shamir._gf_mul(numerator, shamir._gf_inverse(denominator)))
    assert shamir._lagrange_at_zero(indices) == tuple(expected)

def test_combine_shares_refuses_what_flowers_refuses() -> None:
    from flwr.common.secure_aggregation.crypto.shamir import create_shares

    shares = create_shares(b"k" * 32, 2, 3)
    with pytest.raises(ValueError, match="Duplicate share"):
        shamir.combine_shares([shares[0], shares[0]])
    broken = [i.to_bytes(4, "little") + bytes(48) for i in (1, 2)]  # interpolates to zeros: no valid padding
    with pytest.raises(ValueError) as ours:
        shamir.combine_shares(broken)
    with pytest.raises(ValueError) as theirs:
        combine_shares(broken)
    assert str(ours.value) == str(theirs.value) == "Failed to combine shares"


@pytest.mark.parametrize(("threshold", "num"), [(1, 1), (2, 3), (3, 3), (5, 8), (7, 12), (15, 20)])
def test_created_shares_recover_with_flowers_combine_from_any_threshold_subset(threshold: int, num: int) -> None:
    """What a medfed site sends a Flower (or medfed) server: Flower's format, any ``threshold`` shares recover."""
    rng = random.Random(threshold * 100 + num)
    for size in (0, 1, 15, 16, 17, 32, 48):
        secret = rng.randbytes(size)
        shares = shamir.create_shares(secret, threshold, num)
        flowers = flower_create_shares(secret, threshold, num)
        assert [len(s) for s in shares] == [len(s) for s in flowers]  # 4-byte index + 16 bytes per padded chunk
        assert [int.from_bytes(s[:4], "little") for s in shares] == list(range(1, num + 1))
        for _ in range(3):
            subset = rng.sample(shares, threshold)
            assert combine_shares(subset) == shamir.combine_shares(subset) == secret


def test_fewer_than_threshold_shares_do_not_give_the_secret_and_coefficients_are_fresh() -> None:
    """Random coefficients per chunk and per call: the same secret splits differently every time,
    and ``threshold - 1`` shares interpolate to something else (a check, not a proof, of secrecy)."""
    secret = bytes(range(32))
    first, second = shamir.create_shares(secret, 3, 5), shamir.create_shares(secret, 3, 5)
    assert all(a != b for a, b in zip(first, second, strict=True))
    try:
        assert shamir.combine_shares(first[:2]) != secret
    except ValueError:  # the wrong interpolation is usually not validly padded
        pass
    chunk = shamir.create_shares(bytes(16), 2, 3)  # the padding chunk and the data chunk
    assert chunk[0][4:20] != chunk[0][20:36] or chunk[1][4:20] != chunk[1][20:36]


def test_create_shares_refuses_impossible_thresholds() -> None:
    for threshold, num in ((0, 3), (4, 3)):
        with pytest.raises(ValueError, match="threshold"):
            shamir.create_shares(b"secret", threshold, num)
