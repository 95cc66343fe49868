"""``flexlora bench``: the paper's comparison of strategies across resource distributions.

``run_bench(strategies, distributions, seeds, out, base=cfg)`` runs the grid (resuming at run
granularity) and writes ``results.csv``, ``summary.md`` and the plots; :data:`PRESETS` names
ready-made grids (``2core``, ``full``, ``paper``).

One job per module, imports pointing one way (``runner`` uses the others, none uses it):
``presets`` (the named grids), ``settings`` (configs: layering, each run's, comparing two),
``layout`` (the folder: run paths, ``DONE.json``, the call log), ``plan`` (what a call still
has to do), ``execute`` (doing it, in workers), ``results`` (rows and scores), ``summary``
(``summary.md``), ``plots``, ``outputs`` (writing them all), ``stats`` (Student-t intervals),
``runner`` (``run_bench``: the steps in order, progress lines) and ``cli``.
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
