"""SecAgg+ at the sites with masked vectors packed in 32 bits: Flower's protocol, medfed's arithmetic.

:func:`packed_secaggplus_mod` replaces Flower's ``secaggplus_mod`` in medfed's ClientApp. It hands
the setup and unmask stages to Flower's mod unchanged and runs the share-keys and
collect-masked-vectors stages itself, with the same state (Flower's ``SecAggPlusState`` in the
site's context), the same checks, the same keys, seeds and pseudo-random masks, so Flower's
server workflow (``SecAggPlusWorkflow``) aggregates and unmasks its replies unchanged, dropouts
included. The share-keys stage (:func:`share_keys`) differs only in speed: Shamir shares in
Flower's format from :func:`medfed.shared.shamir.create_shares` (no thread pool per secret) and
the second secret key decoded once. What differs in the collect stage is how the masked vector
is computed and sent:

* **32-bit upload.** The modulus is ``2^32``, so every masked entry fits in ``uint32``; Flower
  sends them as ``int64`` (twice the fp32 model). The server adds the vectors and reduces them
  modulo ``2^32`` as before (``uint32`` sums wrap modulo ``2^32``, and its ``& (2^32 - 1)``
  keeps the value).
* **One flat buffer.** Quantisation, stochastic rounding and the masks run over one
  contiguous vector, in place, 256K entries at a time (Flower allocates a new array per
  operation and per layer, and applies the rounding through a boolean-mask index).
* **The mask generator the server names.** medfed's server workflow names its generator in the
  collect stage's config (:data:`~medfed.shared.secagg_masks.MASK_GENERATOR_KEY`; run-config key
  ``secagg-mask-generator``) and the site echoes the name in its reply. medfed's default,
  ``"aes-256-ctr"``, expands each 32-byte secret with AES-256 in counter mode, a cryptographic
  generator keyed by the whole secret. Without the key (Flower's own server workflow) the site
  draws Flower's masks (``pseudo_rand_gen``: NumPy's ``RandomState`` seeded with the XOR of the
  seed's 4-byte words), bit for bit (tested against ``pseudo_rand_gen``), as 32-bit words.
* **Stochastic rounding** rounds ``y`` up with probability ``y - floor(y)`` as Flower's does,
  with its uniform numbers from a fresh ``numpy.random.Generator`` per message instead of NumPy's
  global legacy state. The rounding is not a secret (the masks are), but it must be unbiased:
  values on the quantisation grid come out exactly as with Flower's mod, and the aggregate
  stays within :func:`medfed.server.secure.quantization_error_bound` of the exact mean.

Security properties are Flower's protocol's: the masked vector is the quantised update plus a
private mask (seeded by a fresh 32-byte secret shared by Shamir's scheme in the share-keys stage)
plus the pairwise masks (ECDH shared keys with every neighbour), modulo ``2^32``; with
``"aes-256-ctr"`` each mask is a cryptographic keystream of the whole secret instead of a Mersenne
Twister stream of a 32-bit fold of it.

When the protocol's ``modulus_range`` is not ``2^32`` (not a medfed configuration) the stage
goes to Flower's mod as well.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Parameters, ndarray_to_bytes
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from medfed.shared.secagg_masks import (
    FLOWER_MASK_GENERATOR,
    MASK_GENERATOR_KEY,
    PACKED_MODULUS,
    add_mask,
    check_mask_generator,
    expand_mask,
    mask_seed,
)
from medfed.shared.shamir import create_shares
from medfed.shared.weights import npy_view

__all__ = [
    "PACKED_MODULUS", "packed_secaggplus_mod", "collect_masked_vectors", "share_keys", "expand_mask", "mask_seed",
]

logger = logging.getLogger(__name__)

# ``flwr.client.mod.secure_aggregation`` re-exports the mod function under its module's name.
_flower = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
SecAggPlusState = _flower.SecAggPlusState
flower_secaggplus_mod = _flower.secaggplus_mod

QUANTIZE_CHUNK = 1 << 15
"""Entries quantised per step: the work buffers (256 KiB of float64 each) are reused and stay in the
core's L2 cache (1 << 18 entries, 2 MiB buffers, took 10.8 ms per million entries, 1 << 15 7.6 ms)."""

_DRAW_SCALE = float(1 << 32)


class _StochasticRounder:
    """Rounds ``y`` (float64, ``>= 0``) up with probability ``frac(y)``, in reused buffers.

    Per chunk: ``up = ceil(y)``; round down (``up - 1``) when a uniform 32-bit integer ``r`` is
    below ``(up - y) 2^32`` (exact: a power-of-two scaling of a float64 in ``[0, 1)``), so
    ``P(down) = ceil((up - y) 2^32) / 2^32``: ``up - y`` to within ``2^-32``, a bias below
    ``2^-32`` of a quantisation step, and values on the grid (``up == y``) stay exact. The draws
    are the bit generator's raw 64-bit words read as two 32-bit integers each: half the
    generator's work of a float64 draw per entry and no conversion (1.8 ms against 4.0 ms per
    million entries). The work buffers (float64, uint32, bool) are allocated once per vector,
    not per chunk and operation.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.up = np.empty(size, dtype=np.float64)
        self.down = np.empty(size, dtype=bool)

    def __call__(self, values: np.ndarray, out: np.ndarray) -> None:
        """Write the rounding of ``values`` (overwritten) into ``out`` (``uint32``, same shape)."""
        n = values.size
        up, down = self.up[:n], self.down[:n]
        np.ceil(values, out=up)
        np.subtract(up, values, out=values)  # values := up - values, in [0, 1)
        values *= _DRAW_SCALE  # in [0, 2^32), exact
        out[...] = up  # exact: integers below 2^32
        draws = self.rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
        np.less(draws, values, out=down)  # P(down) = ceil((up - values) 2^32) / 2^32
        np.subtract(out, down, out=out, casting="unsafe")


def share_keys(state: object, configs: ConfigRecord) -> dict[str, list]:
    """The share-keys stage of Flower's SecAgg+ site (``secaggplus_mod._share_keys``), faster.

    Same checks, same state changes and the same reply: a fresh 32-byte private mask seed
    (``os.urandom``), Shamir shares of it and of the first secret key in Flower's format
    (:func:`medfed.shared.shamir.create_shares`: the same sharing without Flower's per-call thread
    pool and field objects), each neighbour's pair of shares encrypted with the key agreed from the
    second key pair (Flower's ``generate_shared_key`` and ``encrypt``). The site's second secret
    key is decoded once, not once per neighbour.

    Parameters
    ----------
    state
        Flower's ``SecAggPlusState`` after the setup stage; updated in place.
    configs
        The stage's config record: node id (as a string) -> ``[public key 1, public key 2]``.

    Returns
    -------
    dict
        ``{Key.DESTINATION_LIST: [node ids], Key.CIPHERTEXT_LIST: [bytes]}``, neighbours in
        ``configs``'s order, this site left out.
    """
    st = cast(_flower.SecAggPlusState, state)
    st.public_keys_dict = {int(sid): (pk1, pk2) for sid, (pk1, pk2) in cast(dict[str, tuple], configs).items()}
    if len(st.public_keys_dict) < st.threshold:
        raise ValueError("Available neighbours number smaller than threshold")
    keys = [key for pair in st.public_keys_dict.values() for key in pair]
    if len(set(keys)) != len(keys):
        raise ValueError("Some public keys are identical")
    if st.public_keys_dict[st.nid][0] != st.pk1 or st.public_keys_dict[st.nid][1] != st.pk2:
        raise ValueError("Own public keys are displayed in dict incorrectly, should not happen!")
    st.rd_seed = os.urandom(32)
    b_shares = create_shares(st.rd_seed, st.threshold, st.share_num)
    sk1_shares = create_shares(st.sk1, st.threshold, st.share_num)
    private_key = bytes_to_private_key(st.sk2)
    dsts: list[int] = []
    ciphertexts: list[bytes] = []
    for idx, (nid, (_, pk2)) in enumerate(st.public_keys_dict.items()):
        if nid == st.nid:
            st.rd_seed_share_dict[st.nid] = b_shares[idx]
            st.sk1_share_dict[st.nid] = sk1_shares[idx]
            continue
        shared_key = generate_shared_key(private_key, bytes_to_public_key(pk2))
        st.ss2_dict[nid] = shared_key
        plaintext = share_keys_plaintext_concat(st.nid, nid, b_shares[idx], sk1_shares[idx])
        dsts.append(nid)
        ciphertexts.append(encrypt(shared_key, plaintext))
    return {Key.DESTINATION_LIST: dsts, Key.CIPHERTEXT_LIST: ciphertexts}


def collect_masked_vectors(
    state: object,
    configs: ConfigRecord,
    num_examples: int,
    updated_parameters: Parameters,
    *,
    generator: str = FLOWER_MASK_GENERATOR,
) -> dict[str, list[bytes]]:
    """The collect-masked-vectors stage of Flower's SecAgg+ site, packed in ``uint32``.

    Same inputs and state changes as Flower's ``secaggplus_mod._collect_masked_vectors``: stores
    the decrypted shares of the neighbours in ``state``; returns the masked vector (the factor
    ``q_ratio`` first, then one array per entry of ``updated_parameters``, shapes unchanged).

    Parameters
    ----------
    state
        Flower's ``SecAggPlusState`` after the share-keys stage (``mod_range`` must be ``2^32``).
    configs
        The stage's config record (ciphertexts and their sources).
    num_examples
        The site's FedAvg weight.
    updated_parameters
        The site's vector (medfed: the update ``local - global``, in the weights' float dtype;
        :mod:`medfed.client.update_mods`).
    generator
        The mask generator (:data:`medfed.shared.secagg_masks.MASK_GENERATORS`): the one the
        server named; Flower's when it named none.

    Returns
    -------
    dict
        ``{Key.MASKED_PARAMETERS: [bytes, ...]}``, each a ``uint32`` array saved by
        ``flwr.common.ndarray_to_bytes``.
    """
    st = cast(_flower.SecAggPlusState, state)
    if st.mod_range != PACKED_MODULUS:
        raise ValueError(f"packed SecAgg+ needs modulus_range 2^32, got {st.mod_range}.")
    ciphertexts = cast(list[bytes], configs[Key.CIPHERTEXT_LIST])
    srcs = cast(list[int], configs[Key.SOURCE_LIST])
    if len(ciphertexts) + 1 < st.threshold:
        raise ValueError("Not enough available neighbour clients.")
    available: list[int] = []
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        plaintext = decrypt(st.ss2_dict[src], ciphertext)
        actual_src, dst, rd_seed_share, sk1_share = share_keys_plaintext_separate(plaintext)
        available.append(src)
        if src != actual_src:
            raise ValueError(f"Node {st.nid}: received ciphertext from {actual_src} instead of {src}.")
        if dst != st.nid:
            raise ValueError(f"Node {st.nid}: received an encrypted message for Node {dst} from Node {src}.")
        st.rd_seed_share_dict[src] = rd_seed_share
        st.sk1_share_dict[src] = sk1_share

    ratio = num_examples / st.max_weight
    if ratio > 1:
        logger.warning(
            "the site's weight (%s) exceeds max_weight (%s): the aggregate may overflow.", num_examples, st.max_weight
        )
    q_ratio = round(ratio * st.target_range)
    dq_ratio = q_ratio / st.target_range
    arrays = [npy_view(tensor) for tensor in updated_parameters.tensors]  # read in place, not copied
    masked = quantized_vector(
        arrays, dq_ratio=dq_ratio, clipping_range=st.clipping_range, target_range=st.target_range, q_ratio=q_ratio
    )
    add_mask(masked, st.rd_seed, generator=generator)  # uint32: wraps modulo 2^32
    private_key = bytes_to_private_key(st.sk1)
    for node_id in available:
        shared_key = generate_shared_key(private_key, bytes_to_public_key(st.public_keys_dict[node_id][0]))
        add_mask(masked, shared_key, generator=generator, subtract=st.nid < node_id)
    return {Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in split_like(masked, arrays)]}


def quantized_vector(
    arrays: Sequence[np.ndarray], *, dq_ratio: float, clipping_range: float, target_range: int, q_ratio: int
) -> np.ndarray:
    """``[q_ratio] + quantize(arrays * dq_ratio)`` as one flat ``uint32`` vector (Flower's arithmetic).

    Per entry ``x``: ``y = (clip(x * dq_ratio, -c, c) + c) * Q / (2 c)``, stochastically rounded.

    Returns
    -------
    numpy.ndarray
        Shape ``(1 + sum of sizes,)``, ``uint32``.
    """
    total = sum(int(np.asarray(a).size) for a in arrays)
    out = np.empty(total + 1, dtype=np.uint32)
    out[0] = q_ratio
    chunk = min(QUANTIZE_CHUNK, total)
    rounder = _StochasticRounder(chunk, np.random.default_rng())
    scale = target_range / (2 * clipping_range)
    buf = np.empty(chunk, dtype=np.float64)
    pos = 1
    for a in arrays:
        flat = np.asarray(a).ravel()
        for start in range(0, flat.size, QUANTIZE_CHUNK):
            part = flat[start : start + QUANTIZE_CHUNK]
            y = buf[: part.size]
            if part.dtype == np.float64:
                np.multiply(part, dq_ratio, out=y)
            else:  # in the array's own dtype first, as Flower's parameters_multiply
                y[:] = part * dq_ratio
            np.clip(y, -clipping_range, clipping_range, out=y)
            y += clipping_range
            y *= scale
            rounder(y, out[pos : pos + part.size])
            pos += part.size
    return out


def split_like(flat: np.ndarray, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``flat`` (the factor, then every array's entries) as ``[factor (1,), *arrays' shapes]`` views."""
    out = [flat[:1]]
    start = 1
    for a in arrays:
        a = np.asarray(a)
        out.append(flat[start : start + a.size].reshape(a.shape))
        start += a.size
    if start != flat.size:
        raise ValueError(f"the flat vector has {flat.size} entries, the arrays {start}.")
    return out


def packed_secaggplus_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` with the masked vector computed by :func:`collect_masked_vectors`.

    Every stage but collect-masked-vectors, and every message that is not a SecAgg+ training
    message, goes to Flower's mod; so do rounds whose ``modulus_range`` is not ``2^32``.
    """
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return flower_secaggplus_mod(msg, ctxt, call_next)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stored = ctxt.state.config_records.get(RECORD_KEY_STATE)
    if configs.get(Key.STAGE) == Stage.SHARE_KEYS and stored is not None:
        return _share_keys_reply(msg, ctxt, configs, SecAggPlusState(**stored))
    if configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS or stored is None:
        return flower_secaggplus_mod(msg, ctxt, call_next)
    state = SecAggPlusState(**stored)
    if state.mod_range != PACKED_MODULUS:
        return flower_secaggplus_mod(msg, ctxt, call_next)
    named = configs.get(MASK_GENERATOR_KEY)
    generator = check_mask_generator(str(named)) if named is not None else FLOWER_MASK_GENERATOR
    if named is not None:
        del configs[MASK_GENERATOR_KEY]
    # From here on as Flower's mod does for this stage (secaggplus_mod.secaggplus_mod).
    _flower.check_stage(state.current_stage, configs)
    state.current_stage = cast(str, configs.pop(Key.STAGE))
    _flower.check_configs(state.current_stage, configs)
    out_msg = call_next(msg, ctxt)
    out_content = out_msg.content
    fitres = compat.recorddict_to_fitres(out_content, keep_input=True)
    res: dict[str, object] = dict(
        collect_masked_vectors(state, configs, fitres.num_examples, fitres.parameters, generator=generator)
    )
    if named is not None:
        res[MASK_GENERATOR_KEY] = generator  # tells the server which masks to remove
    for arr_record in out_content.array_records.values():
        arr_record.clear()
    ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
    out_content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(res, False)  # type: ignore[arg-type]
    return Message(out_content, reply_to=msg)


def _share_keys_reply(msg: Message, ctxt: Context, configs: ConfigRecord, state: object) -> Message:
    """The share-keys stage as Flower's mod runs it (checks, stage, state saved), with :func:`share_keys`."""
    st = cast(_flower.SecAggPlusState, state)
    _flower.check_stage(st.current_stage, configs)
    st.current_stage = cast(str, configs.pop(Key.STAGE))
    _flower.check_configs(st.current_stage, configs)
    res = share_keys(st, configs)
    ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(st.to_dict())
    out_content = RecordDict()
    out_content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(res, False)  # type: ignore[arg-type]
    return Message(out_content, reply_to=msg)
