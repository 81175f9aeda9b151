"""medfed's benchmarks: the suite (``medfed bench``, :mod:`.suite`) and the modules of its sections.

One module per section, each runnable on its own (``python -m medfed.simulations.bench.NAME``):
:mod:`.quality` (federated vs pooled), :mod:`.dp` (DP-SGD cost and accuracy), :mod:`.secagg`
(SecAgg+ round time), :mod:`.overhead` (Flower's engine vs a plain loop), :mod:`.peers` (a minimal
Flower app and NVIDIA FLARE), :mod:`.scale` (many sites), :mod:`.robust` (poisoning); shared
formatting and plots in :mod:`.support`. ``python -m medfed.simulations.bench`` runs the suite.
"""

from medfed.simulations.bench.suite import (
    PROFILES,
    REASON_PREFIXES,
    SECTIONS,
    BenchContext,
    Profile,
    SectionResult,
    SectionSpec,
    Table,
    Target,
    bench_command,
    default_data_dir,
    incomplete_cells,
    main,
    register_section,
    render_section,
    run_bench,
    write_regions,
)

__all__ = [
    "BenchContext",
    "PROFILES",
    "Profile",
    "REASON_PREFIXES",
    "SECTIONS",
    "SectionResult",
    "SectionSpec",
    "Table",
    "Target",
    "bench_command",
    "default_data_dir",
    "incomplete_cells",
    "main",
    "register_section",
    "render_section",
    "run_bench",
    "write_regions",
]
