"""The parts of a SecAgg+ round timed one by one, in this process (no simulation).

``python -m medfed.simulations.bench.secagg_parts`` prints, each the median of ``--repeat`` calls:

* one mask added to a ``uint32`` vector of 1M and 11.2M entries (ResNet-18's size), with each
  generator of :data:`medfed.shared.secagg_masks.MASK_GENERATORS`;
* a site's quantisation and stochastic rounding of a 1M- and an 11.2M-entry float64 update;
* a site's update (1M entries) written as ``.npy`` payloads for the next mod, float64 and float32;
* Shamir sharing of one 32-byte secret into 8 shares (threshold 5), Flower's ``create_shares`` and
  medfed's; recovering one secret from 3 shares, Flower's ``combine_shares`` and medfed's; and
  recovering 8 secrets whose 8 shares came in 8 different orders (medfed's, its cache cleared first);
* decoding a site's secret key from bytes (Flower's share-keys stage did it once per neighbour);
* reading the header of one ``.npy`` payload: NumPy's parser and medfed's cached ``npy_view``;
* pickling a simulation's ClientApp with Ray's cloudpickle, as the engine does for every message:
  Flower's ``ClientApp`` with medfed's SecAgg+ mods and medfed's :class:`BoundClientApp`; and the
  SecAgg+ benchmark's noise-site app by reference and by value (what a benchmark run as
  ``python -m`` sends when its classes live in ``__main__``).

These are the figures BENCHMARKS.md ("SecAgg+ with AES-CTR masks", "SecAgg+ below 2x") gives for
each change; the round times themselves come from :mod:`medfed.simulations.bench.secagg`.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["main", "measure"]


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: first-touch pages, caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(*, repeat: int = 5) -> list[tuple[str, str]]:
    """``(what, figure)`` rows; see the module docstring."""
    from flwr.client import ClientApp
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares as flower_combine
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, generate_key_pairs, private_key_to_bytes
    from ray import cloudpickle

    import medfed.shared.models  # noqa: F401  # torch and MONAI loaded, as in a simulation's server
    import medfed.simulations.bench.secagg as secagg_bench
    from medfed.client.client_app import BoundClientApp, make_client_app, privacy_mods, site_client_fn
    from medfed.client.egress import egress_guard
    from medfed.client.secagg_packed import quantized_vector
    from medfed.client.update_mods import _write
    from medfed.shared import shamir
    from medfed.shared.config import RunConfig
    from medfed.shared.secagg_masks import MASK_GENERATORS, add_mask
    from medfed.shared.shamir import combine_shares
    from medfed.shared.shamir import create_shares as medfed_create_shares
    from medfed.shared.weights import npy_view
    from medfed.simulations.bench.secagg import _secure_messages_mod, noise_client_fn

    rows: list[tuple[str, str]] = []
    seed = os.urandom(32)
    for size in (1_000_000, 11_200_000):
        vector = np.zeros(size, dtype=np.uint32)
        for generator in MASK_GENERATORS:
            ms = _median_ms(lambda g=generator, v=vector: add_mask(v, seed, generator=g), repeat)
            rows.append((f"one mask, {size / 1e6:g}M entries, {generator}", f"{ms:.1f} ms"))
    for entries, label in ((100_000, "1M"), (1_120_000, "11.2M")):
        update = [np.random.default_rng(0).normal(0.0, 0.01, entries) for _ in range(10)]
        ms = _median_ms(lambda u=update: quantized_vector(u, dq_ratio=0.3, clipping_range=8.0, target_range=2**26,
                                                          q_ratio=5), repeat)
        rows.append((f"quantisation and stochastic rounding, {label} entries", f"{ms:.1f} ms"))
    for dtype in (np.float64, np.float32):
        update = [np.random.default_rng(0).normal(0.0, 0.01, 100_000).astype(dtype) for _ in range(10)]
        ms = _median_ms(lambda u=update: _write(u), repeat)
        rows.append((f"writing a 1M-entry update for the next mod, {np.dtype(dtype).name}", f"{ms:.1f} ms"))
    rows.append(("Shamir shares of one secret (8 shares, threshold 5), Flower's create_shares",
                 f"{_median_ms(lambda: create_shares(seed, 5, 8), 5 * repeat):.2f} ms"))
    rows.append(("Shamir shares of one secret (8 shares, threshold 5), medfed's create_shares",
                 f"{_median_ms(lambda: medfed_create_shares(seed, 5, 8), 5 * repeat):.2f} ms"))
    shares = create_shares(seed, 2, 3)
    rows.append(("one secret from 3 Shamir shares, Flower's combine_shares",
                 f"{_median_ms(lambda: flower_combine(shares), 5 * repeat):.2f} ms"))
    rows.append(("one secret from 3 Shamir shares, medfed's combine_shares",
                 f"{_median_ms(lambda: combine_shares(shares), 5 * repeat):.3f} ms"))
    orders = random.Random(0)
    secrets = [os.urandom(32) for _ in range(8)]
    shuffled = [(secret, orders.sample(create_shares(secret, 5, 8), 8)) for secret in secrets]

    def recover_all() -> None:
        shamir._lagrange_at_zero.cache_clear()
        for secret, share_list in shuffled:
            if combine_shares(share_list) != secret:
                raise RuntimeError("Shamir recovery returned a wrong secret")

    rows.append(("8 secrets from 8 Shamir shares each, in 8 orders, medfed's combine_shares (cache cleared)",
                 f"{_median_ms(recover_all, repeat):.1f} ms"))
    private_key = private_key_to_bytes(generate_key_pairs()[0])
    rows.append(("decoding a site's secret key from bytes",
                 f"{_median_ms(lambda: bytes_to_private_key(private_key), 5 * repeat):.2f} ms"))
    payload = ndarray_to_bytes(np.zeros((64, 32, 3, 3), np.float32))
    rows.append(("one .npy header, NumPy's parser (np.load)",
                 f"{1e3 * _median_ms(lambda: np.lib.format.read_array_header_1_0(_after_magic(payload)), 5 * repeat):.0f} us"))
    rows.append(("one .npy header, medfed's npy_view (cached)",
                 f"{1e3 * _median_ms(lambda: npy_view(payload), 5 * repeat):.0f} us"))
    cfg = RunConfig(num_sites=8, min_fit_clients=8, secagg=True)
    apps = {
        "Flower's ClientApp with medfed's SecAgg+ mods": ClientApp(
            client_fn=site_client_fn(cfg), mods=[egress_guard, *privacy_mods(cfg)]),
        "medfed's BoundClientApp": make_client_app(cfg),
    }
    for name, app in apps.items():
        def load(app: ClientApp = app) -> ClientApp:  # Flower's engine pickles a closure like this one
            return app

        ms = _median_ms(lambda f=load: cloudpickle.dumps(f), 5 * repeat)
        rows.append((f"pickling the app per message, {name}", f"{ms:.2f} ms, {len(cloudpickle.dumps(load))} bytes"))
    noise_app = BoundClientApp(cfg, client_fn=noise_client_fn([100] * 8), mods=[_secure_messages_mod(cfg)])
    for how in ("by reference", "by value"):
        if how == "by value":  # as cloudpickle treats what a ``python -m`` run defines in ``__main__``
            cloudpickle.register_pickle_by_value(secagg_bench)
        try:
            ms = _median_ms(lambda: cloudpickle.dumps(noise_app), 5 * repeat)
            size = len(cloudpickle.dumps(noise_app))
        finally:
            if how == "by value":
                cloudpickle.unregister_pickle_by_value(secagg_bench)
        rows.append((f"pickling the SecAgg+ bench's noise-site app, {how}", f"{ms:.2f} ms, {size} bytes"))
    return rows


def _after_magic(payload: bytes) -> io.BytesIO:
    stream = io.BytesIO(payload)
    np.lib.format.read_magic(stream)
    return stream


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5, help="calls per figure (the median is printed)")
    args = parser.parse_args(argv)
    rows = measure(repeat=args.repeat)
    width = max(len(what) for what, _ in rows)
    for what, figure in rows:
        print(f"{what:<{width}}  {figure}")


if __name__ == "__main__":
    main()
