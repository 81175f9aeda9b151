"""Client mods that shape a site's training reply for SecAgg+ and client-level DP.

Flower's mods do the protocol work (``secaggplus_mod``, ``fixedclipping_mod``,
``adaptiveclipping_mod``); these two mods adapt medfed's model state to them:

:func:`make_update_mod` (between ``secaggplus_mod`` and the clipping mod)
    * Under SecAgg+, replaces the trained weights by the update ``local - global`` (in the
      weights' float32 / float64, other entries float64; 0-d entries as shape ``(1,)``, which
      Flower's SecAgg+ aggregates correctly), which :class:`medfed.server.secure.SecAggUpdateStrategy` adds back to the global model after
      secure aggregation (see ``server/secure.py`` for why updates, not weights). It refuses to
      send when the site's example count exceeds ``secagg-max-weight`` (the weight would
      overflow the quantisation range and corrupt the aggregate) and counts entries that
      SecAgg+ will clip (reported as the ``secagg-clipped`` fit metric: a count, no values).
    * Under SecAgg+ it also validates the update, since the server cannot (see
      ``server/validation.py``): an update with NaN or Inf is never sent (the site raises
      :class:`UpdateValidationError`, which the round counts as a dropout), and with
      ``max-update-norm > 0`` the update's floating-point entries are scaled down to that L2
      norm before masking (fit metric ``update-clipped``: 1 when scaled, else 0).
    * Under client-level DP, hands the clipping mod integer entries as float64: Flower's
      clipping scales every array in place, which numpy refuses for int64 arrays. Without
      SecAgg+ they go back to their dtype.

:func:`freeze_counters_mod` (inside the clipping mod, client-level DP only)
    Returns integer entries unchanged from the global model. They are step counters, not
    learned values, and Flower 1.42's clipping cannot bound them: a 0-d entry (BatchNorm's
    ``num_batches_tracked``) becomes a numpy scalar in ``compute_clip_model_update``, so its
    in-place scaling is lost and "5 steps" per layer would leave the site unclipped (and
    reveal its number of batches).

Message flow of a training round (outermost first)::

    egress_guard -> secaggplus_mod -> update_mod -> fixed/adaptiveclipping_mod
                 -> freeze_counters_mod -> SiteClient.fit
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import NDArrays, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from medfed.shared.config import RunConfig
from medfed.shared.weights import npy_view

__all__ = [
    "make_update_mod",
    "freeze_counters_mod",
    "clip_update",
    "CLIPPED_METRIC",
    "UPDATE_CLIPPED_METRIC",
    "SecAggWeightError",
    "UpdateValidationError",
]

logger = logging.getLogger(__name__)

CLIPPED_METRIC = "secagg-clipped"
"""Fit metric: how many update entries SecAgg+ clips at this site (0 when none)."""

UPDATE_CLIPPED_METRIC = "update-clipped"
"""Fit metric under SecAgg+ with ``max-update-norm > 0``: 1 when the site scaled its update down."""

_INS = "fitins.parameters"
_RES = "fitres.parameters"


class SecAggWeightError(ValueError):
    """A site's example count exceeds ``secagg-max-weight``."""


class UpdateValidationError(ValueError):
    """The site's own update is invalid (NaN or Inf): it is not sent."""


def _is_int(array: np.ndarray) -> bool:
    return array.dtype.kind in "iub"


def _read(record_dict_arrays: object) -> NDArrays:
    """The record's arrays, read-only views of its ``.npy`` bytes (no copy: the mods only read them)."""
    parameters = compat.arrayrecord_to_parameters(record_dict_arrays, keep_input=True)  # type: ignore[arg-type]
    return [npy_view(tensor) for tensor in parameters.tensors]


def _write(arrays: NDArrays) -> object:
    return compat.parameters_to_arrayrecord(ndarrays_to_parameters(arrays), keep_input=True)


def _is_fit_with_weights(msg: Message) -> bool:
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and msg.has_content()
        and _INS in msg.content.array_records
    )


def _reply_weights(reply: Message) -> NDArrays | None:
    if reply.has_error() or not reply.has_content() or _RES not in reply.content.array_records:
        return None
    return _read(reply.content.array_records[_RES])


def make_update_mod(cfg: RunConfig) -> Mod:
    """The mod that turns weights into SecAgg+ updates and keeps integer entries clippable.

    Parameters
    ----------
    cfg
        Uses ``secagg``, ``secagg-clipping-range``, ``secagg-quantization-range``,
        ``secagg-max-weight`` and ``client-dp``.
    """
    dp_on = cfg.client_dp != "off"

    def update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not _is_fit_with_weights(msg):
            return call_next(msg, context)
        global_weights = _read(msg.content.array_records[_INS])
        int_entries = [i for i, a in enumerate(global_weights) if _is_int(a)]
        if dp_on and int_entries:
            as_float = [a.astype(np.float64) if _is_int(a) else a for a in global_weights]
            msg.content.array_records[_INS] = _write(as_float)  # type: ignore[assignment]
        reply = call_next(msg, context)
        local = _reply_weights(reply)
        if local is None:
            return reply
        if len(local) != len(global_weights):
            raise ValueError(
                f"the site returned {len(local)} arrays for a global model of {len(global_weights)}: "
                "the server and the site must use the same model and config."
            )
        if cfg.secagg:
            num_examples = int(reply.content.metric_records["fitres.num_examples"]["num_examples"])
            # 0-d entries travel as shape (1,): Flower 1.42's dequantize returns numpy scalars for
            # 0-d arrays and its in-place offset and weight correction then miss them.
            update = [_difference(x, g) for x, g in zip(local, global_weights, strict=True)]
            _check_finite(update)
            metrics = reply.content.config_records["fitres.metrics"]
            if cfg.max_update_norm > 0:
                is_float = [np.asarray(g).dtype.kind == "f" for g in global_weights]
                update, scaled = clip_update(update, is_float=is_float, max_norm=cfg.max_update_norm)
                metrics[UPDATE_CLIPPED_METRIC] = int(scaled)
            clipped = _count_clipped(update, num_examples=num_examples, cfg=cfg)
            reply.content.array_records[_RES] = _write(update)  # type: ignore[assignment]
            metrics[CLIPPED_METRIC] = clipped
        elif int_entries:
            restored = [
                np.rint(x).astype(global_weights[i].dtype) if i in int_entries else x for i, x in enumerate(local)
            ]
            reply.content.array_records[_RES] = _write(restored)  # type: ignore[assignment]
        return reply

    return update_mod


def _difference(local: np.ndarray, global_: np.ndarray) -> np.ndarray:
    """``local - global`` for the SecAgg+ update, at least 1-d: in the weights' own dtype when both
    are float32 or float64, in float64 otherwise (integer entries, mixed dtypes).

    A float32 difference rounds to within 2^-24 of the update's magnitude, many orders of
    magnitude below SecAgg+'s quantisation step (``2 clipping_range / quantization_range``, about
    4e-6 with the defaults), and is half the bytes of float64 for the next mod to read.
    """
    local, global_ = np.asarray(local), np.asarray(global_)
    if local.dtype == global_.dtype and local.dtype in (np.float32, np.float64):
        return np.atleast_1d(np.subtract(local, global_))
    return np.atleast_1d(np.asarray(local, np.float64) - np.asarray(global_, np.float64))


def _check_finite(update: NDArrays) -> None:
    """Refuse to send an update with NaN or Inf (under SecAgg+ the server could not tell).

    Raises
    ------
    UpdateValidationError
        Naming how many entries are not finite (never their positions' values).
    """
    bad = sum(int(np.count_nonzero(~np.isfinite(u))) for u in update)
    if bad:
        logger.error(
            "this site's update has %d non-finite entries (NaN or Inf) after local training: it is not sent "
            "and the site drops out of this round. Check the learning rate and the data.",
            bad,
        )
        raise UpdateValidationError(
            f"the site's update has {bad} non-finite entries; it was not sent (see the site's log)."
        )


def clip_update(update: NDArrays, *, is_float: list[bool], max_norm: float) -> tuple[NDArrays, bool]:
    """Scale the floating-point entries of ``update`` so that their L2 norm is at most ``max_norm``.

    Parameters
    ----------
    update
        ``local - global`` per state entry (float32 or float64, any shapes).
    is_float
        Per entry: whether the model's entry is floating-point (integer step counters are
        neither part of the norm nor scaled, as on the server: ``medfed.server.validation.update_norm``).
    max_norm
        ``max-update-norm`` (> 0).

    Returns
    -------
    tuple
        The (possibly scaled) update and whether it was scaled.
    """
    norm = float(np.sqrt(sum(float(np.dot(u.ravel(), u.ravel())) for u, f in zip(update, is_float, strict=True) if f)))
    if norm <= max_norm:
        return update, False
    factor = max_norm / norm
    logger.warning(
        "this site's update norm %.4g exceeds max-update-norm = %g: scaled down to it before secure aggregation.",
        norm,
        max_norm,
    )
    return [u * factor if f else u for u, f in zip(update, is_float, strict=True)], True


def _count_clipped(update: NDArrays, *, num_examples: int, cfg: RunConfig) -> int:
    """Entries of ``update`` outside this site's effective SecAgg+ clipping range.

    Flower multiplies the update by ``q / Q`` (``q = round(n Q / W)``) and then clips to
    ``[-c, c]``, so an entry is clipped when ``|x| > c Q / q``.

    Raises
    ------
    SecAggWeightError
        If ``num_examples`` exceeds ``secagg-max-weight``.
    """
    max_weight = cfg.secagg_max_weight
    if num_examples > max_weight:
        raise SecAggWeightError(
            f"this site trained on {num_examples} examples but secagg-max-weight = {max_weight:g}: SecAgg+ "
            "would overflow its weight range and corrupt the aggregate. Set secagg-max-weight above the "
            f"largest site's training-set size (e.g. {2 * num_examples})."
        )
    q = round(num_examples / max_weight * cfg.secagg_quantization_range)
    if q <= 0:
        return 0
    limit = cfg.secagg_clipping_range * cfg.secagg_quantization_range / q
    clipped = int(sum(int(np.count_nonzero(np.abs(u) > limit)) for u in update))
    if clipped:
        logger.warning(
            "SecAgg+ will clip %d update entries at this site (its range is +-%.3g = secagg-clipping-range * "
            "secagg-max-weight / examples): raise secagg-clipping-range.",
            clipped,
            limit,
        )
    return clipped


def freeze_counters_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Return integer state entries unchanged from the global model (client-level DP)."""
    if not _is_fit_with_weights(msg):
        return call_next(msg, context)
    global_weights = _read(msg.content.array_records[_INS])
    reply = call_next(msg, context)
    local = _reply_weights(reply)
    if local is None or not any(_is_int(x) for x in local):
        return reply
    frozen = [global_weights[i] if _is_int(x) else x for i, x in enumerate(local)]
    reply.content.array_records[_RES] = _write(frozen)  # type: ignore[assignment]
    return reply
