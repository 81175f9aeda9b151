"""medfed's packed SecAgg+ site stage against Flower's own: same masks, same aggregate, same dropouts.

The protocol runs in-process (``tests/support/local_grid.py``: every message serialised, a
Context per site) under Flower's unchanged server workflow (``SecAggPlusWorkflow``) or medfed's,
once with Flower's ``secaggplus_mod`` at the sites and once with :func:`packed_secaggplus_mod`.
medfed's workflow names its mask generator (AES-256-CTR by default) to the sites; Flower's names
none, and the packed stage then draws Flower's masks bit for bit.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from medfed.client.secagg_packed import (
    _flower,
    collect_masked_vectors,
    expand_mask,
    packed_secaggplus_mod,
    quantized_vector,
    share_keys,
)
from medfed.server.secure import MedfedSecAggPlusWorkflow, SecAggSettings, quantization_error_bound
from medfed.shared.secagg_masks import DEFAULT_MASK_GENERATOR, MASK_GENERATOR_KEY, add_mask, mask_key
from tests.support.local_grid import LocalGrid, server_identity
from tests.support.secagg_sites import dying_mod

SHAPES = [(3, 4, 5), (7,), (1,), (2, 2)]
C, Q, W = 1.0, 2**22, 64.0
SIZES = [64, 40, 50, 30, 20]  # examples per site; the first has max-weight, so its factor is exactly 1
_LAST_GRID: list[LocalGrid] = []  # the grid of the last _run, for tests that read its messages


def _update(partition: int, server_round: int, *, on_grid: bool) -> list[np.ndarray]:
    """Site ``partition``'s update: on the quantisation grid of a site with W examples, or not."""
    rng = np.random.default_rng([partition, server_round])
    if on_grid:  # (x + c) * Q / (2c) is an integer: rounding is deterministic for the first site
        return [rng.integers(-(2**20), 2**20, s).astype(np.float64) / 2**21 for s in SHAPES]
    return [rng.normal(0.0, 0.05, s) for s in SHAPES]


class _UpdateClient(NumPyClient):
    def __init__(self, partition: int, *, on_grid: bool) -> None:
        self.partition, self.on_grid = partition, on_grid

    def fit(self, parameters, config):
        return _update(self.partition, int(config["round"]), on_grid=self.on_grid), SIZES[self.partition], {}


class _Capture(FedAvg):
    """FedAvg that records the securely aggregated vector of each round."""

    def __init__(self) -> None:
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_available_clients=2, min_fit_clients=2,
            initial_parameters=ndarrays_to_parameters([np.zeros(s) for s in SHAPES]),
            on_fit_config_fn=lambda r: {"round": r},
        )
        self.aggregates: dict[int, list[np.ndarray]] = {}

    def aggregate_fit(self, server_round, results, failures):
        self.aggregates[server_round] = parameters_to_ndarrays(results[0][1].parameters)
        return super().aggregate_fit(server_round, results, failures)


def _workflow(name: str, *, threshold: int, generator: str):
    """Flower's server workflow, or medfed's (Flower's with the mask arithmetic on uint32)."""
    if name == "flower":
        return SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=threshold, clipping_range=C,
                                  quantization_range=Q, max_weight=W)
    settings = SecAggSettings(num_shares=1.0, reconstruction_threshold=threshold, clipping_range=C,
                              quantization_range=Q, max_weight=W, timeout=3600.0, sites_per_round=0,
                              on_failure="skip", mask_generator=generator)
    return MedfedSecAggPlusWorkflow(settings)


def _run(mod, *, sites: int, rounds: int = 1, on_grid: bool = True, threshold: int = 3, plan=None,
         server: str = "flower", generator: str | None = None):
    """Run the protocol; ``generator`` (medfed's server): Flower's for Flower's mod, else medfed's default."""
    if generator is None:
        generator = "flower-mt19937" if mod is _flower.secaggplus_mod else DEFAULT_MASK_GENERATOR
    mods = ([dying_mod(plan)] if plan else []) + [mod]
    def client_fn(ctx: Context):
        return _UpdateClient(int(ctx.node_config["partition-id"]), on_grid=on_grid).to_client()

    app = ClientApp(client_fn=client_fn, mods=mods)
    grid = LocalGrid(app, num_nodes=sites)
    _LAST_GRID[:] = [grid]
    strategy = _Capture()
    workflow = DefaultWorkflow(fit_workflow=_workflow(server, threshold=threshold, generator=generator))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with server_identity():
        workflow(grid, LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy))
    masked = {}
    for reply in grid.received:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS) if reply.has_content() else None
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            masked[(int(reply.metadata.group_id), reply.metadata.src_node_id)] = [
                bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
    return strategy.aggregates, masked


@pytest.mark.parametrize("shapes", [[(10,), (3, 4), ()], [(0,), (1,), (5, 6, 7)], [(1000,)]])
def test_mask_expansion_equals_flowers_generator(shapes: list[tuple[int, ...]]) -> None:
    for seed in (bytes(range(32)), b"\xff" * 44, np.random.default_rng(3).bytes(32)):
        flower = np.concatenate([np.ravel(m) for m in pseudo_rand_gen(seed, 2**32, shapes)] + [np.zeros(0, np.int64)])
        ours = expand_mask(seed, int(sum(np.prod(s, dtype=int) for s in shapes)), generator="flower-mt19937")
        assert ours.dtype == np.uint32 and np.array_equal(ours.astype(np.int64), flower)


def _aes_reference(seed: bytes, size: int) -> np.ndarray:
    """AES-256-CTR's keystream built by hand: AES-ECB of the big-endian counter blocks 0, 1, 2, ..."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    blocks = (4 * size + 15) // 16
    encryptor = Cipher(algorithms.AES(mask_key(seed)), modes.ECB()).encryptor()
    stream = encryptor.update(b"".join(i.to_bytes(16, "big") for i in range(blocks)))
    return np.frombuffer(stream, dtype="<u4")[:size]


@pytest.mark.parametrize("size", [0, 1, 3, 4, 1000, (1 << 18) - 1, (1 << 18) + 5, 3 << 18])
def test_aes_mask_is_the_counter_mode_keystream_across_chunks(size: int) -> None:
    seed = bytes(range(32))
    ours = expand_mask(seed, size, generator="aes-256-ctr")
    assert ours.dtype == np.uint32 and ours.shape == (size,)
    assert np.array_equal(ours, _aes_reference(seed, size))
    vector = np.arange(size, dtype=np.uint32)
    add_mask(vector, seed, generator="aes-256-ctr")
    assert np.array_equal(vector, np.arange(size, dtype=np.uint32) + ours)  # uint32: modulo 2^32
    add_mask(vector, seed, generator="aes-256-ctr", subtract=True)
    assert np.array_equal(vector, np.arange(size, dtype=np.uint32))


def test_aes_masks_use_the_whole_seed() -> None:
    """Flower folds a seed to 32 bits (XOR of its words): seeds with the same fold give the same mask.
    The AES key is derived from every byte, so they do not."""
    a = bytes(range(32))
    b = bytearray(a)
    b[0:4], b[4:8] = a[4:8], a[0:4]  # swapping two words keeps the XOR fold
    b = bytes(b)
    assert np.array_equal(expand_mask(a, 64, generator="flower-mt19937"), expand_mask(b, 64, generator="flower-mt19937"))
    assert not np.array_equal(expand_mask(a, 64, generator="aes-256-ctr"), expand_mask(b, 64, generator="aes-256-ctr"))
    assert mask_key(a) != mask_key(b) and len(mask_key(a)) == 32


def test_unknown_mask_generator_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'aes-256-ctr', 'flower-mt19937'.*secagg-mask-generator"):
        expand_mask(b"\0" * 32, 4, generator="chacha")


def test_mask_expansion_rejects_the_word_flower_rejects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower draws in [0, 2^32 - 2]: a drawn 0xFFFFFFFF is skipped and the stream goes on."""
    top = 0xFFFFFFFF
    stream = np.array([5, top, 7, top, top, 9, 11, 13], dtype=np.uint32)

    class Scripted:
        def __init__(self, seed: int) -> None:
            self.pos = 0

        def randint(self, low, high, size, dtype):
            assert (low, high, dtype) == (0, 2**32, np.uint32)
            out = stream[self.pos : self.pos + size]
            self.pos += size
            return out.copy()

    monkeypatch.setattr(np.random, "RandomState", Scripted)
    assert expand_mask(b"\0" * 4, 4, generator="flower-mt19937").tolist() == [5, 7, 9, 11]


def _after_setup(sites: int, *, threshold: int) -> tuple[list[object], dict[str, list[bytes]]]:
    """Flower's own setup stage for ``sites`` sites (node ids 1..sites): their states and the
    share-keys stage's config (node id -> the two public keys)."""
    setup = {Key.SAMPLE_NUMBER: sites, Key.SHARE_NUMBER: sites, Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: C,
             Key.TARGET_RANGE: Q, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: W}
    states = []
    for nid in range(1, sites + 1):
        state = _flower.SecAggPlusState()
        state.nid = nid
        states.append(state)
    keys = {s.nid: _flower._setup(s, dict(setup)) for s in states}
    return states, {str(nid): [k[Key.PUBLIC_KEY_1], k[Key.PUBLIC_KEY_2]] for nid, k in keys.items()}


def _protocol_states(sites: int) -> tuple[list[object], dict[int, tuple[list[int], list[bytes]]]]:
    """Flower's own setup and share-keys stages for ``sites`` sites; each site's incoming ciphertexts."""
    states, public = _after_setup(sites, threshold=2)
    incoming: dict[int, tuple[list[int], list[bytes]]] = {s.nid: ([], []) for s in states}
    for s in states:
        out = _flower._share_keys(s, dict(public))
        for dst, ciphertext in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST], strict=True):
            incoming[dst][0].append(s.nid)
            incoming[dst][1].append(ciphertext)
    return states, incoming


def test_share_keys_does_what_flowers_stage_does_with_shares_flowers_combine_reads() -> None:
    """medfed's share-keys stage on a copy of the state Flower's stage gets: the same checks pass, the
    same neighbours are addressed in the same order, the same keys agreed; the new seed and the
    shares differ (fresh randomness) but every neighbour's ciphertext decrypts, with the key it
    agreed, to its pair of shares, and any threshold of them recovers the seed and the first
    secret key with Flower's ``combine_shares``."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate

    sites = 4
    states, public = _after_setup(sites, threshold=3)
    ours_states = copy.deepcopy(states)
    theirs = [_flower._share_keys(s, dict(public)) for s in states]
    ours = [share_keys(s, dict(public)) for s in ours_states]
    for mine, flowers, st_mine, st_flower in zip(ours, theirs, ours_states, states, strict=True):
        assert mine[Key.DESTINATION_LIST] == flowers[Key.DESTINATION_LIST]
        assert len(mine[Key.CIPHERTEXT_LIST]) == len(flowers[Key.CIPHERTEXT_LIST]) == sites - 1
        assert st_mine.ss2_dict == st_flower.ss2_dict and st_mine.public_keys_dict == st_flower.public_keys_dict
        assert st_mine.rd_seed != st_flower.rd_seed and len(st_mine.rd_seed) == 32
    # every site's shares, as its neighbours decrypt them (plus its own)
    seed_shares = {s.nid: [s.rd_seed_share_dict[s.nid]] for s in ours_states}
    key_shares = {s.nid: [s.sk1_share_dict[s.nid]] for s in ours_states}
    for sender, reply in zip(ours_states, ours, strict=True):
        for dst, ciphertext in zip(reply[Key.DESTINATION_LIST], reply[Key.CIPHERTEXT_LIST], strict=True):
            receiver = ours_states[dst - 1]
            src, to, seed_share, key_share = share_keys_plaintext_separate(decrypt(receiver.ss2_dict[sender.nid], ciphertext))
            assert (src, to) == (sender.nid, dst)
            seed_shares[sender.nid].append(seed_share)
            key_shares[sender.nid].append(key_share)
    for s in ours_states:
        assert combine_shares(seed_shares[s.nid][1:]) == s.rd_seed  # 3 of 4: the threshold
        assert combine_shares(key_shares[s.nid][:3]) == s.sk1


def test_share_keys_refuses_what_flowers_stage_refuses() -> None:
    states, public = _after_setup(3, threshold=3)
    too_few = {k: v for k, v in public.items() if k != "3"}
    same_key = {**public, "3": public["2"]}
    wrong_own = {**public, "1": public["1"][::-1]}  # own keys swapped
    for configs, message in ((too_few, "smaller than threshold"), (same_key, "identical"), (wrong_own, "incorrectly")):
        for stage in (share_keys, _flower._share_keys):
            with pytest.raises(ValueError, match=message):
                stage(copy.deepcopy(states[0]), dict(configs))


@pytest.mark.parametrize("site", [0, 1, 2])
def test_masked_vector_is_flowers_bit_for_bit_when_rounding_is_exact(site: int) -> None:
    """Same state, same keys and seeds, an update on the quantisation grid at max-weight examples:
    the packed stage's uint32 vector equals Flower's int64 vector entry by entry (private and
    pairwise masks, both signs, the weight factor), and both store the same shares."""
    states, incoming = _protocol_states(3)
    state = states[site]
    srcs, ciphertexts = incoming[state.nid]
    configs = {Key.CIPHERTEXT_LIST: ciphertexts, Key.SOURCE_LIST: srcs}
    update = _update(site, 1, on_grid=True)
    mine_state, flower_state = copy.deepcopy(state), copy.deepcopy(state)
    ours = collect_masked_vectors(mine_state, dict(configs), int(W), ndarrays_to_parameters(update))
    theirs = _flower._collect_masked_vectors(flower_state, dict(configs), int(W), ndarrays_to_parameters(update))
    ours_arrays = [bytes_to_ndarray(b) for b in ours[Key.MASKED_PARAMETERS]]
    theirs_arrays = [bytes_to_ndarray(b) for b in theirs[Key.MASKED_PARAMETERS]]
    assert [a.shape for a in ours_arrays] == [a.shape for a in theirs_arrays] == [(1,), *SHAPES]
    for a, b in zip(ours_arrays, theirs_arrays, strict=True):
        assert a.dtype == np.uint32 and b.dtype == np.int64
        assert np.array_equal(a.astype(np.int64), b)
    assert mine_state.to_dict() == flower_state.to_dict()


def _exact_mean(survivors: list[int], server_round: int = 1, *, on_grid: bool) -> list[np.ndarray]:
    total = sum(SIZES[p] for p in survivors)
    return [sum(SIZES[p] * _update(p, server_round, on_grid=on_grid)[k] for p in survivors) / total
            for k in range(len(SHAPES))]


@pytest.mark.parametrize("server", ["flower", "medfed"])
@pytest.mark.parametrize("dead", [set(), {3, 4}])
def test_aggregate_is_the_weighted_mean_of_the_survivors_like_flowers(dead: set[int], server: str) -> None:
    """Five sites, threshold 3; two die after key sharing: the server rebuilds their masks (Flower's
    unmask stage, or medfed's on uint32 vectors), with Flower's site mod and with the packed one."""
    plan = {1: (Stage.COLLECT_MASKED_VECTORS, dead)} if dead else None
    survivors = [p for p in range(5) if p not in dead]
    exact = _exact_mean(survivors, on_grid=False)
    bound = quantization_error_bound(num_examples=[SIZES[p] for p in survivors], clipping_range=C,
                                     quantization_range=Q, max_weight=W, max_abs_update=0.5)
    cases = [(_flower.secaggplus_mod, None), (packed_secaggplus_mod, None)]
    if server == "medfed":  # medfed's default generator (AES) above; Flower's generator named here
        cases.append((packed_secaggplus_mod, "flower-mt19937"))
    for mod, generator in cases:
        agg, masked = _run(mod, sites=5, on_grid=False, plan=plan, server=server, generator=generator)
        assert len(masked) == len(survivors)
        dtypes = {v.dtype for vectors in masked.values() for v in vectors}
        assert dtypes == ({np.dtype(np.uint32)} if mod is packed_secaggplus_mod else {np.dtype(np.int64)})
        for a, e in zip(agg[1], exact, strict=True):
            assert a.shape == e.shape and np.max(np.abs(a - e)) <= bound, (mod, generator)


@pytest.mark.parametrize(("server", "generator", "echoed"), [
    ("flower", None, None),  # Flower's workflow names no generator: Flower's masks, nothing echoed
    ("medfed", "aes-256-ctr", "aes-256-ctr"),
    ("medfed", "flower-mt19937", None),  # Flower's generator is not named, so Flower's sites interoperate
])
def test_the_site_masks_with_the_generator_the_server_names(server: str, generator: str | None, echoed) -> None:
    _run(packed_secaggplus_mod, sites=3, on_grid=False, server=server, generator=generator)
    grid_replies = _LAST_GRID[0].received
    replies = [r.content.config_records[RECORD_KEY_CONFIGS] for r in grid_replies if r.has_content()
               and RECORD_KEY_CONFIGS in r.content.config_records
               and Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(replies) == 3 and [c.get(MASK_GENERATOR_KEY) for c in replies] == [echoed] * 3


def test_a_site_with_flowers_mod_under_medfeds_generator_is_left_out_as_a_dropout(caplog) -> None:
    """medfed's server (AES masks) with two of five sites running Flower's own mod (Flower's masks, no
    echo): those two are left out with an error naming the fix, and their pairwise masks are removed
    as a dropout's, so the aggregate is exactly the three medfed sites' weighted mean."""
    flower_sites = {3, 4}

    def mixed(msg, ctx, call_next):
        mod = _flower.secaggplus_mod if int(ctx.node_config["partition-id"]) in flower_sites else packed_secaggplus_mod
        return mod(msg, ctx, call_next)

    survivors = [p for p in range(5) if p not in flower_sites]
    bound = quantization_error_bound(num_examples=[SIZES[p] for p in survivors], clipping_range=C,
                                     quantization_range=Q, max_weight=W, max_abs_update=0.5)
    with caplog.at_level("ERROR"):
        agg, masked = _run(mixed, sites=5, on_grid=False, server="medfed", generator="aes-256-ctr")
    assert len(masked) == 5  # every site replied; two with Flower's masks
    for a, e in zip(agg[1], _exact_mean(survivors, on_grid=False), strict=True):
        assert np.max(np.abs(a - e)) <= bound
    errors = [r.getMessage() for r in caplog.records if "masked its update with Flower's generator" in r.getMessage()]
    assert len(errors) == 2 and all("secagg-mask-generator = 'flower-mt19937'" in e for e in errors)


@pytest.mark.parametrize("server", ["flower", "medfed"])
def test_dropouts_below_the_threshold_fail_the_round_as_with_flower(server: str) -> None:
    plan = {1: (Stage.COLLECT_MASKED_VECTORS, {2, 3, 4})}
    for mod in (_flower.secaggplus_mod, packed_secaggplus_mod):
        agg, masked = _run(mod, sites=5, on_grid=False, plan=plan, server=server)
        assert agg == {} and len(masked) == 2, mod


@pytest.mark.parametrize("server", ["flower", "medfed"], ids=["flower-masks", "aes-masks"])
def test_masked_vectors_are_uniform_and_uncorrelated_with_the_update(monkeypatch: pytest.MonkeyPatch, server) -> None:
    """On 20,000 entries a site's masked vector looks like uniform noise, whatever its update.

    The masks are drawn from fresh keys each run, so the figures are random: with n entries the
    sample correlation of independent vectors has standard deviation 1/sqrt(n) (0.007 here) and the
    mean of uniform [0, 1) values 0.29/sqrt(n) (0.002). The bounds sit 7 and 10 deviations out;
    on the 72 entries of ``SHAPES`` a 0.3 bound failed about one run in thirty.
    """
    monkeypatch.setitem(globals(), "SHAPES", [(100, 150), (50, 100)])  # read by _update and _Capture
    agg, masked = _run(packed_secaggplus_mod, sites=3, on_grid=False, server=server)
    assert len(masked) == 3
    for (_, node), vectors in masked.items():
        flat = np.concatenate([v.ravel() for v in vectors[1:]]).astype(np.float64) / 2**32
        assert flat.size == 20_000
        partition = node - 101
        update = np.concatenate([u.ravel() for u in _update(partition, 1, on_grid=False)])
        assert abs(np.corrcoef(flat, update)[0, 1]) < 0.05
        assert 0.48 < flat.mean() < 0.52
        counts = np.histogram(flat, bins=10, range=(0.0, 1.0))[0]
        chi2 = float(((counts - 2000.0) ** 2 / 2000.0).sum())
        assert chi2 < 40.0  # 9 degrees of freedom: P(chi2 > 40) < 1e-5 for uniform draws


def test_stochastic_rounding_is_unbiased() -> None:
    """Each entry rounds up with probability frac(y): the mean of many roundings of y is y."""
    x = np.full(200_000, 0.3 / 2**21)  # y = (x + c) * Q / (2c) = 2^21 + 0.3
    q = quantized_vector([x], dq_ratio=1.0, clipping_range=C, target_range=Q, q_ratio=Q)
    assert q[0] == Q and set(np.unique(q[1:]).tolist()) == {2**21, 2**21 + 1}
    assert abs(float(q[1:].mean()) - (2**21 + 0.3)) < 0.005  # 4.9 standard errors
