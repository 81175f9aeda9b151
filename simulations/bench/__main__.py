"""``python -m medfed.simulations.bench``: the benchmark suite (see :mod:`.suite`)."""

from medfed.simulations.bench.suite import main

raise SystemExit(main())
