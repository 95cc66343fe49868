"""``flexlora bench``: the paper's comparison of strategies across resource distributions.

``run_bench(strategies, distributions, seeds, out, base=cfg)`` runs the grid (resuming at run
granularity) and writes ``results.csv``, ``summary.md`` and the plots; :data:`PRESETS` names
ready-made grids (``2core``, ``full``, ``paper``).
"""

from flexlora.bench.presets import PRESETS, BenchPreset, get_preset
from flexlora.bench.runner import BenchResult, RunKey, base_config, run_bench

__all__ = [
    "PRESETS",
    "BenchPreset",
    "BenchResult",
    "RunKey",
    "base_config",
    "get_preset",
    "run_bench",
]
