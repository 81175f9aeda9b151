"""The parts of a SecAgg+ round timed one by one, in this process (no simulation).

``python -m medfed.simulations.bench.secagg_parts`` prints, each the median of ``--repeat`` calls:

* one mask added to a ``uint32`` vector of 1M and 11.2M entries (ResNet-18's size), with each
  generator of :data:`medfed.shared.secagg_masks.MASK_GENERATORS`;
* a site's quantisation and stochastic rounding of an 11.2M-entry float64 update;
* recovering one 32-byte secret from 3 Shamir shares, Flower's ``combine_shares`` and medfed's;
* pickling a simulation's ClientApp with Ray's cloudpickle, as the engine does for every message:
  Flower's ``ClientApp`` with medfed's SecAgg+ mods and medfed's :class:`BoundClientApp`.

These are the figures BENCHMARKS.md ("SecAgg+ with AES-CTR masks") gives for each change; the round
times themselves come from :mod:`medfed.simulations.bench.secagg`.
"""

from __future__ import annotations

import argparse
import os
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
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares as flower_combine
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from ray import cloudpickle

    import medfed.shared.models  # noqa: F401  # torch and MONAI loaded, as in a simulation's server
    from medfed.client.client_app import make_client_app, privacy_mods, site_client_fn
    from medfed.client.egress import egress_guard
    from medfed.client.secagg_packed import quantized_vector
    from medfed.server.secagg_unmask import combine_shares
    from medfed.shared.config import RunConfig
    from medfed.shared.secagg_masks import MASK_GENERATORS, add_mask

    rows: list[tuple[str, str]] = []
    seed = os.urandom(32)
    for size in (1_000_000, 11_200_000):
        vector = np.zeros(size, dtype=np.uint32)
        for generator in MASK_GENERATORS:
            ms = _median_ms(lambda g=generator, v=vector: add_mask(v, seed, generator=g), repeat)
            rows.append((f"one mask, {size / 1e6:g}M entries, {generator}", f"{ms:.1f} ms"))
    update = [np.random.default_rng(0).normal(0.0, 0.01, 1_120_000) for _ in range(10)]
    ms = _median_ms(lambda: quantized_vector(update, dq_ratio=0.3, clipping_range=8.0, target_range=2**26,
                                             q_ratio=5), repeat)
    rows.append(("quantisation and stochastic rounding, 11.2M entries", f"{ms:.0f} ms"))
    shares = create_shares(seed, 2, 3)
    rows.append(("one secret from 3 Shamir shares, Flower's combine_shares",
                 f"{_median_ms(lambda: flower_combine(shares), 5 * repeat):.2f} ms"))
    rows.append(("one secret from 3 Shamir shares, medfed's combine_shares",
                 f"{_median_ms(lambda: combine_shares(shares), 5 * repeat):.3f} ms"))
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
    return rows


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
