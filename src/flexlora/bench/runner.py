"""``run_bench``: every strategy x distribution x seed as its own simulated run.

Each run is a :class:`~flexlora.simulation.runner.FederatedRun` in
``DIR/runs/<distribution>/<strategy>/seed-<s>/``; seed ``s`` sets ``federation.seed`` (client
sampling, rank draw, initialisation, example order), so within a seed every strategy sees the
same clients, ranks and data. The data split, and so the held-out unseen tasks, stays the
config's ``data.seed`` for every seed: the seed-to-seed spread is then the federation's own
randomness, not which few tasks happen to be held out (``vary_data`` sets ``data.seed`` to the
seed as well). A run that finished gets ``DONE.json`` and is skipped when the command is
repeated; an unfinished one resumes from its checkpoint, or starts afresh when that is missing
or unusable.

The pieces, one job each: :mod:`~flexlora.bench.settings` (configs), :mod:`~.layout` (the
folder), :mod:`~.plan` (what is left to do), :mod:`~.execute` (doing it), :mod:`~.results`,
:mod:`~.summary` and :mod:`~.outputs` (the tables and plots). This module ties them together
and prints the progress lines.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora.bench.execute import copy_run, run_tasks
from flexlora.bench.layout import MARKER, RunKey, log_invocation, read_json
from flexlora.bench.outputs import write_outputs
from flexlora.bench.plan import ModelFactory, Plan, Task, make_plan
from flexlora.bench.settings import base_config, run_configs
from flexlora.bench.summary import BenchContext, format_duration
from flexlora.config import RunConfig, load_config
from flexlora.errors import UsageError

__all__ = [
    "MARKER",
    "BenchResult",
    "RunKey",
    "base_config",
    "read_json",
    "run_bench",
    "run_configs",
]


@dataclass
class BenchResult:
    """What one ``run_bench`` call did and wrote."""

    out: Path
    status: dict[RunKey, str]  # "ran", "skipped", "copied" or "failed: <reason>"
    rows: list[dict[str, Any]]
    summary: str
    files: list[Path]
    seconds: float
    load_average: list[float] = field(default_factory=list)

    @property
    def failed(self) -> list[RunKey]:
        return [k for k, s in self.status.items() if s.startswith("failed")]


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def _check_grid(
    strategies: Sequence[str], distributions: Sequence[str], seeds: Sequence[int], jobs: int
) -> None:
    if not strategies or not distributions or not seeds:
        raise UsageError("bench needs at least one strategy, one distribution and one seed")
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    for name, items in (("strategy", strategies), ("distribution", distributions)):
        dupes = sorted({x for x in items if list(items).count(x) > 1})
        if dupes:
            raise UsageError(f"{name} listed twice: {', '.join(dupes)}")


class _Progress:
    """Takes each task's outcome into the plan's status and prints one line for it."""

    def __init__(
        self,
        plan: Plan,
        configs: dict[RunKey, RunConfig],
        out: Path,
        echo: Callable[[str], None],
    ) -> None:
        self.plan, self.configs, self.out, self.echo = plan, configs, out, echo
        self.t0 = time.perf_counter()
        self.loads: list[float] = [_load1()]
        self.done = 0

    def copy_identical(self, primary: RunKey) -> None:
        """The runs identical to ``primary`` (just finished or done before) get its results."""
        for alias in self.plan.copies.get(primary, []):
            copy_run(primary.folder(self.out), alias.folder(self.out), self.configs[alias], primary)
            self.plan.status[alias] = "copied"
            self.echo(f"[same] {alias.label()}: identical to {primary.label()}, copied")

    def __call__(self, task: Task, result: dict[str, Any] | None, error: str | None) -> None:
        self.loads.append(_load1())
        elapsed = format_duration(time.perf_counter() - self.t0)
        if task.kind == "baseline":
            self._baseline(task, result, error, elapsed)
            return
        assert task.key is not None
        self.done += 1
        n_runs = self.plan.n_runs
        head = f"[{self.done:>{len(str(n_runs))}}/{n_runs}] {task.key.label()}"
        status = self.plan.status
        if result is None:
            status[task.key] = f"failed: {error}"
            for alias in self.plan.copies.get(task.key, []):
                status[alias] = f"failed: identical to {task.key.label()}, which failed"
            self.echo(f"{head}: FAILED: {error}")
            return
        status[task.key] = "ran"
        final = result["final"]
        score = ", ".join(
            f"{k} {final[k]:.4f}" for k in ("rouge_l_unseen", "rouge_l_seen") if k in final
        )
        self.echo(
            f"{head}: {score or 'no evaluation'} in {format_duration(result['seconds'])}"
            f"{' (resumed)' if result['resumed'] else ''} (elapsed {elapsed}, "
            f"load {self.loads[-1]:.1f})"
        )
        self.copy_identical(task.key)

    def _baseline(
        self, task: Task, result: dict[str, Any] | None, error: str | None, elapsed: str
    ) -> None:
        if result is None:
            self.echo(f"[base] seed {task.seed}: FAILED: {error}")
            return
        self.plan.baselines[task.seed] = result
        score = ", ".join(f"{k} {v:.4f}" for k, v in result["row"].items() if k.startswith("rouge"))
        self.echo(
            f"[base] seed {task.seed}: round-0 {score} in {format_duration(result['seconds'])} "
            f"(elapsed {elapsed}, load {self.loads[-1]:.1f})"
        )

    def record(self, started: str, jobs: int) -> dict[str, Any]:
        """This call's line in ``invocations.jsonl``."""
        status = self.plan.status.values()
        loads = [x for x in self.loads if math.isfinite(x)]
        return {
            "started": started,
            "seconds": round(time.perf_counter() - self.t0, 1),
            "ran": sum(s == "ran" for s in status),
            "failed": len([s for s in status if s.startswith("failed")]),
            "skipped": sum(s == "skipped" for s in status),
            "copied": sum(s == "copied" for s in status),
            "base_evals": self.plan.n_baselines,
            "jobs": jobs,
            "cpus": os.cpu_count(),
            "load_mean": round(sum(loads) / len(loads), 2) if loads else None,
            "load_min": min(loads, default=None),
            "load_max": max(loads, default=None),
        }


def run_bench(
    strategies: Sequence[str],
    distributions: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    *,
    base: RunConfig | None = None,
    jobs: int = 1,
    reference: str = "fedit-min",
    vary_data: bool = False,
    dataset: Any | None = None,
    model_factory: ModelFactory | None = None,
    echo: Callable[[str], None] = print,
) -> BenchResult:
    """Run (or finish) the grid and write ``results.csv``, ``summary.md`` and the plots.

    ``dataset`` (a :class:`~flexlora.data.types.FederatedDataset`) replaces loading
    ``cfg.data`` for every run, and ``model_factory(cfg)`` replaces loading ``cfg.model``;
    with ``jobs`` > 1 both must be picklable. Failed runs are reported and left out of the
    summary; the others go on.
    """
    from flexlora.server import build_aggregator, resolve_client_types

    _check_grid(strategies, distributions, seeds, jobs)
    out = Path(out)
    base = base if base is not None else load_config()
    keys = [RunKey(s, d, st) for s in seeds for d in distributions for st in strategies]
    configs = run_configs(base, keys, out, jobs, vary_data)
    for key in keys[: len(distributions) * len(strategies)]:
        # a typo in a name fails now, not after an hour of other runs
        build_aggregator(configs[key])
        resolve_client_types(configs[key], ["probe"])

    # 1. what is left: runs, base-model evaluations, runs identical to another (copied)
    plan = make_plan(configs, out, base.eval.at_start, dataset, model_factory)
    echo(
        f"bench: {len(keys)} runs ({len(strategies)} strategies x {len(distributions)} "
        f"distributions x {len(seeds)} seeds) in {out}; {len(plan.status)} already done, "
        f"{plan.n_runs} to run, {plan.n_baselines} base-model evaluations; "
        f"{plan.n_copies} identical to another run (copied, not run); {jobs} job(s)"
    )
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    progress = _Progress(plan, configs, out, echo)
    # 2. copies of runs finished before, then the work itself
    for primary in plan.copies:
        if plan.status.get(primary) == "skipped":
            progress.copy_identical(primary)
    run_tasks(plan.tasks, jobs, progress)

    # 3. the call's record, then the tables and plots of every finished run
    seconds = time.perf_counter() - progress.t0
    status = plan.status
    finished = [k for k in keys if status.get(k) in ("ran", "skipped", "copied")]
    missing = [f"{k.label()} ({status.get(k, 'not run')})" for k in keys if k not in finished]
    invocations = log_invocation(out, progress.record(started, jobs))
    ctx = BenchContext(
        strategies=list(strategies),
        distributions=list(distributions),
        seeds=list(seeds),
        base=base,
        reference=reference,
        vary_data=vary_data,
        missing=missing,
        invocations=invocations,
        data_label=f"{getattr(dataset, 'name', 'given')} (dataset object)" if dataset else None,
    )
    round0 = {
        s: plan.baselines[src]["row"] for s, src in plan.served_by.items() if src in plan.baselines
    }
    rows, summary, files = write_outputs(out, finished, round0, ctx)
    echo(summary)
    loads = [x for x in progress.loads if math.isfinite(x)]
    return BenchResult(out, status, rows, summary, files, seconds, loads)
