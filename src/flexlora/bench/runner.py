"""``flexlora bench``: every strategy x distribution x seed as its own simulated run.

Each run is a :class:`~flexlora.simulation.runner.FederatedRun` in
``DIR/runs/<distribution>/<strategy>/seed-<s>/``; seed ``s`` sets ``federation.seed`` (client
sampling, rank draw, initialisation, example order), so within a seed every strategy sees the
same clients, ranks and data. The data split, and so the held-out unseen tasks, stays the
config's ``data.seed`` for every seed: the seed-to-seed spread is then the federation's own
randomness, not which few tasks happen to be held out (``vary_data`` sets ``data.seed`` to the
seed as well). A run
that finished gets ``DONE.json`` (written last, atomically) and is skipped when the command is
repeated; an unfinished one resumes from its checkpoint, or starts afresh when that is missing
or unusable.

The round-0 evaluation (the base model) depends on the data and eval settings only, so it runs
once for all seeds that share them (``DIR/baseline/seed-<s>.json``, the first such seed) and
every run reuses it. With ``jobs`` > 1 the
runs go to that many worker processes with one torch thread each: on a few shared cores,
several single-threaded processes are much more robust than one multi-threaded one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora.bench.presets import BenchPreset
from flexlora.bench.results import BenchContext, format_duration, write_outputs
from flexlora.config import RunConfig, load_config
from flexlora.config_io import load_toml, to_dict
from flexlora.errors import FlexLoRAError, UsageError

log = logging.getLogger(__name__)

__all__ = [
    "MARKER",
    "BenchResult",
    "RunKey",
    "base_config",
    "read_json",
    "run_bench",
    "run_configs",
]

MARKER = "DONE.json"
#: config keys that may differ between a finished run and a repeated command
IGNORED_CHANGES = ("output.dir", "output.progress", "model.threads", "model.device")

ModelFactory = Callable[[RunConfig], tuple[Any, Any]]


@dataclass(frozen=True, order=True)
class RunKey:
    """One cell of the grid."""

    seed: int
    distribution: str
    strategy: str

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.distribution / self.strategy / f"seed-{self.seed}"

    def label(self) -> str:
        return f"{self.distribution} {self.strategy} seed {self.seed}"


@dataclass
class BenchResult:
    """What one ``run_bench`` call did and wrote."""

    out: Path
    status: dict[RunKey, str]  # "ran", "skipped" or "failed: <reason>"
    rows: list[dict[str, Any]]
    summary: str
    files: list[Path]
    seconds: float
    load_average: list[float] = field(default_factory=list)

    @property
    def failed(self) -> list[RunKey]:
        return [k for k, s in self.status.items() if s.startswith("failed")]


# ---------------------------------------------------------------------- configuration
def _deep_merge(into: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def base_config(
    config: str | Path | None = None,
    preset: BenchPreset | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Defaults, then the preset's values, then the CONFIG file, then ``--set`` overrides."""
    values = copy.deepcopy(preset.values) if preset is not None else {}
    if config is not None:
        _deep_merge(values, load_toml(config))
    cfg = load_config(None, overrides, values)
    for key in preset.requires if preset is not None else ():
        section, _, name = key.partition(".")
        if not getattr(getattr(cfg, section), name):
            raise UsageError(f"preset {preset.name} needs {key}: pass --set {key}=...")
    return cfg


def run_configs(
    base: RunConfig,
    keys: Sequence[RunKey],
    out: Path,
    jobs: int = 1,
    vary_data: bool = False,
) -> dict[RunKey, RunConfig]:
    """Each run's config: the base with its strategy, distribution, seeds and folder."""
    configs = {}
    for key in keys:
        cfg = copy.deepcopy(base)
        cfg.federation.strategy = key.strategy
        cfg.federation.distribution = key.distribution
        cfg.federation.seed = key.seed
        if vary_data:
            cfg.data.seed = key.seed
        cfg.eval.at_start = False  # round 0 is evaluated once per seed (the baseline)
        cfg.output.dir = str(key.folder(out))
        cfg.output.progress = False
        if jobs > 1:
            cfg.model.threads = 1
        configs[key] = cfg
    return configs


def _jsonable(cfg: RunConfig) -> dict[str, Any]:
    return json.loads(json.dumps(to_dict(cfg)))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping) and not prefix:
            yield from _flatten(value, f"{key}.")
        else:
            yield f"{prefix}{key}", value


def _config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    before, after = dict(_flatten(saved)), dict(_flatten(current))
    return [
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
        for k in sorted(set(before) | set(after))
        if k not in IGNORED_CHANGES and before.get(k) != after.get(k)
    ]


def _baseline_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What the base model's evaluation depends on: model, data and eval settings.

    Generation is greedy, so the federation's seed matters only where it samples the
    evaluation clients (``eval.max_clients``).
    """
    d = _jsonable(cfg)
    return {
        "model": {k: v for k, v in d["model"].items() if k not in ("threads", "device")},
        "data": d["data"],
        "eval": {k: v for k, v in d["eval"].items() if k not in ("every", "at_start", "patience")},
        "cutoff_len": d["train"]["cutoff_len"],
        "seed": d["federation"]["seed"] if cfg.eval.max_clients else None,
    }


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    from flexlora.simulation.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


# ---------------------------------------------------------------------- one task
@dataclass
class _Task:
    """A unit of work for a worker: a run, or the base-model evaluation of one seed."""

    kind: str  # "run" or "baseline"
    key: RunKey | None
    seed: int
    cfg: RunConfig
    path: Path  # the run folder, or the baseline JSON file
    dataset: Any | None = None
    model_factory: ModelFactory | None = None


def _model(task: _Task) -> tuple[Any, Any] | None:
    # get_peft_model wraps a model in place: every run needs a fresh one.
    return task.model_factory(task.cfg) if task.model_factory is not None else None


def _execute(task: _Task) -> dict[str, Any]:
    """Do one task; return what the progress line and the summary need."""
    from flexlora.simulation.runner import FederatedRun

    t0 = time.perf_counter()
    if task.kind == "baseline":
        run = FederatedRun(task.cfg, dataset=task.dataset, model_and_tokenizer=_model(task))
        row = run.evaluate(None)
        seconds = time.perf_counter() - t0
        row["seconds_eval"] = round(seconds, 3)
        _write_json(
            task.path,
            {"fingerprint": _baseline_fingerprint(task.cfg), "row": row, "seconds": seconds},
        )
        return {"row": row, "seconds": seconds}

    from flexlora.simulation.checkpoint import STATE, CheckpointError

    folder = task.path
    resumed = (folder / "checkpoint" / STATE).is_file()
    try:
        rows = FederatedRun(task.cfg, dataset=task.dataset, model_and_tokenizer=_model(task)).run(
            resume=resumed
        )
    except CheckpointError as exc:
        log.warning("%s: checkpoint unusable (%s); starting the run afresh", folder, exc)
        shutil.rmtree(folder)
        resumed = False
        rows = FederatedRun(task.cfg, dataset=task.dataset, model_and_tokenizer=_model(task)).run()
    seconds = time.perf_counter() - t0
    last = next((r for r in reversed(rows) if "rouge_l_unseen" in r or "rouge_l_seen" in r), {})
    _write_json(
        folder / MARKER,
        {
            "config": _jsonable(task.cfg),
            "seconds": seconds,
            "resumed": resumed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    return {"seconds": seconds, "resumed": resumed, "final": last}


def _init_worker() -> None:
    """A worker process: one torch thread (each run also sets ``model.threads=1``); it prints
    only warnings and errors, no loading bars, so the parent's progress lines stay readable."""
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # refused once parallel work has run
        torch.set_num_interop_threads(1)
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------- the grid
def _plan(
    configs: Mapping[RunKey, RunConfig], out: Path, want_round0: bool
) -> tuple[list[_Task], dict[RunKey, str], dict[int, dict[str, Any]], dict[int, int]]:
    """Tasks still to do, runs already done, baselines already evaluated (by the seed that
    evaluates them), and for each seed the seed whose base-model evaluation serves it: the
    first with the same fingerprint (greedy generation on the same data gives the same row).

    A finished run whose recorded config differs from this command's is refused: its numbers
    would be mixed with others made under other settings.
    """
    tasks: list[_Task] = []
    status: dict[RunKey, str] = {}
    baselines: dict[int, dict[str, Any]] = {}
    served_by: dict[int, int] = {}
    refused = []
    for key, cfg in sorted(configs.items()):
        marker = read_json(key.folder(out) / MARKER)
        if marker is None:
            tasks.append(_Task("run", key, key.seed, cfg, key.folder(out)))
            continue
        changes = _config_changes(marker.get("config", {}), _jsonable(cfg))
        if changes:
            refused.append(f"{key.folder(out)}: {'; '.join(changes[:4])}")
        status[key] = "skipped"
    if refused:
        raise UsageError(
            "finished runs in this folder used other settings; use another --out or delete "
            "them:\n  " + "\n  ".join(refused)
        )
    if want_round0:
        first_of_seed: dict[int, RunConfig] = {}
        for key, cfg in sorted(configs.items()):
            first_of_seed.setdefault(key.seed, cfg)
        first_of_fp: dict[str, int] = {}  # fingerprint -> the first seed that has it
        for seed, cfg in first_of_seed.items():
            fp = _baseline_fingerprint(cfg)
            source = first_of_fp.setdefault(json.dumps(fp, sort_keys=True), seed)
            served_by[seed] = source
            if source != seed:
                continue
            path = out / "baseline" / f"seed-{seed}.json"
            saved = read_json(path)
            if saved is not None and saved.get("fingerprint") == fp:
                baselines[seed] = saved
            else:
                bcfg = copy.deepcopy(cfg)
                bcfg.output.dir = str(path.parent)
                tasks.append(_Task("baseline", None, seed, bcfg, path))
    # baselines first, then seed by seed: after each seed the summary has every cell
    tasks.sort(key=lambda t: (t.kind != "baseline", t.seed, t.key or RunKey(t.seed, "", "")))
    return tasks, status, baselines, served_by


def _identical_runs(
    configs: Mapping[RunKey, RunConfig], dataset: Any | None
) -> dict[RunKey, RunKey]:
    """Runs that would repeat another one exactly: alias -> the run whose results it takes.

    A run is determined by its config and its clients' resource types; the distribution only
    matters through those types. Strategies that hold every client to one type (``fedit-min``,
    ``fedit-max``) therefore give the same run under every distribution in which that type is
    the smallest (largest) present. Other strategies are never merged.
    """
    from flexlora.server import plan_strategy, resolve_client_types

    held = [k for k, c in configs.items() if plan_strategy(c.federation.strategy).hold_to]
    if len({k.distribution for k in held}) < 2:
        return {}
    seen: dict[str, list[str]] = {}  # data config -> its seen clients
    groups: dict[str, RunKey] = {}
    aliases: dict[RunKey, RunKey] = {}
    for key in sorted(held):
        cfg = configs[key]
        d = _jsonable(cfg)
        data_key = json.dumps(d["data"], sort_keys=True)
        if data_key not in seen:
            from flexlora.data import load_federated_dataset

            data = dataset if dataset is not None else load_federated_dataset(cfg.data)
            seen[data_key] = list(data.seen)
        types = resolve_client_types(cfg, seen[data_key])
        for k in ("distribution", "client_types"):
            d["federation"].pop(k, None)
        d["output"].pop("dir", None)
        signature = json.dumps([d, sorted(types.items())], sort_keys=True)
        if signature in groups:
            aliases[key] = groups[signature]
        else:
            groups[signature] = key
    return aliases


def _copy_run(source: Path, target: Path, cfg: RunConfig, same_as: RunKey) -> None:
    """Give ``target`` the finished run in ``source`` (same metrics and adapters), marked so."""
    marker = read_json(source / MARKER) or {}
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(MARKER, "checkpoint"))
    (target / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    _write_json(
        target / MARKER,
        {
            "config": _jsonable(cfg),
            "seconds": marker.get("seconds", 0.0),
            "resumed": False,
            "same_as": same_as.label(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


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

    if not strategies or not distributions or not seeds:
        raise UsageError("bench needs at least one strategy, one distribution and one seed")
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    for name, items in (("strategy", strategies), ("distribution", distributions)):
        dupes = sorted({x for x in items if list(items).count(x) > 1})
        if dupes:
            raise UsageError(f"{name} listed twice: {', '.join(dupes)}")
    out = Path(out)
    base = base if base is not None else load_config()
    keys = [RunKey(s, d, st) for s in seeds for d in distributions for st in strategies]
    configs = run_configs(base, keys, out, jobs, vary_data)
    for key in keys[: len(distributions) * len(strategies)]:
        # a typo in a name fails now, not after an hour of other runs
        build_aggregator(configs[key])
        resolve_client_types(configs[key], ["probe"])

    tasks, status, baselines, served_by = _plan(configs, out, base.eval.at_start)
    # a run that would repeat another exactly is not run: it gets a copy of the other's folder
    same_as = {a: p for a, p in _identical_runs(configs, dataset).items() if a not in status}
    copies: dict[RunKey, list[RunKey]] = {}  # a run -> the runs identical to it
    for alias, primary in same_as.items():
        copies.setdefault(primary, []).append(alias)
    tasks = [t for t in tasks if t.key not in same_as]
    for t in tasks:
        t.dataset, t.model_factory = dataset, model_factory
    n_runs = sum(t.kind == "run" for t in tasks)
    echo(
        f"bench: {len(keys)} runs ({len(strategies)} strategies x {len(distributions)} "
        f"distributions x {len(seeds)} seeds) in {out}; {len(status)} already done, "
        f"{n_runs} to run, {sum(t.kind == 'baseline' for t in tasks)} base-model evaluations; "
        f"{len(same_as)} identical to another run (copied, not run); {jobs} job(s)"
    )
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M")
    loads: list[float] = [_load1()]
    done = 0

    def copy_identical(primary: RunKey) -> None:
        """The runs identical to ``primary`` (just finished or done before) get its results."""
        for alias in copies.get(primary, []):
            _copy_run(primary.folder(out), alias.folder(out), configs[alias], primary)
            status[alias] = "copied"
            echo(f"[same] {alias.label()}: identical to {primary.label()}, copied")

    for primary in copies:
        if status.get(primary) == "skipped":
            copy_identical(primary)

    def report(task: _Task, result: dict[str, Any] | None, error: str | None) -> None:
        nonlocal done
        loads.append(_load1())
        elapsed = format_duration(time.perf_counter() - t0)
        if task.kind == "baseline":
            if result is not None:
                baselines[task.seed] = result
                score = ", ".join(
                    f"{k} {v:.4f}" for k, v in result["row"].items() if k.startswith("rouge")
                )
                took = format_duration(result["seconds"])
                echo(
                    f"[base] seed {task.seed}: round-0 {score} in {took} "
                    f"(elapsed {elapsed}, load {loads[-1]:.1f})"
                )
            else:
                echo(f"[base] seed {task.seed}: FAILED: {error}")
            return
        assert task.key is not None
        done += 1
        head = f"[{done:>{len(str(n_runs))}}/{n_runs}] {task.key.label()}"
        if result is None:
            status[task.key] = f"failed: {error}"
            for alias in copies.get(task.key, []):
                status[alias] = f"failed: identical to {task.key.label()}, which failed"
            echo(f"{head}: FAILED: {error}")
            return
        status[task.key] = "ran"
        final = result["final"]
        score = ", ".join(
            f"{k} {final[k]:.4f}" for k in ("rouge_l_unseen", "rouge_l_seen") if k in final
        )
        echo(
            f"{head}: {score or 'no evaluation'} in {format_duration(result['seconds'])}"
            f"{' (resumed)' if result['resumed'] else ''} (elapsed {elapsed}, "
            f"load {loads[-1]:.1f})"
        )
        copy_identical(task.key)

    if jobs == 1:
        for task in tasks:
            try:
                result = _execute(task)
            except FlexLoRAError as exc:
                report(task, None, str(exc))
            except Exception as exc:  # a failed run must not stop the others
                log.exception("%s failed", task.key.label() if task.key else "base model")
                report(task, None, f"{type(exc).__name__}: {exc}")
            else:
                report(task, result, None)
    elif tasks:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker) as pool:
            futures: dict[Future, _Task] = {pool.submit(_execute, t): t for t in tasks}
            try:
                for fut in as_completed(futures):
                    try:
                        report(futures[fut], fut.result(), None)
                    except Exception as exc:  # a failed run must not stop the others
                        report(futures[fut], None, f"{type(exc).__name__}: {exc}")
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    seconds = time.perf_counter() - t0
    finished = [k for k in keys if status.get(k) in ("ran", "skipped", "copied")]
    missing = [f"{k.label()} ({status.get(k, 'not run')})" for k in keys if k not in finished]
    loads = [x for x in loads if math.isfinite(x)]
    invocations = _log_invocation(
        out,
        {
            "started": started,
            "seconds": round(seconds, 1),
            "ran": sum(s == "ran" for s in status.values()),
            "failed": len([s for s in status.values() if s.startswith("failed")]),
            "skipped": sum(s == "skipped" for s in status.values()),
            "copied": sum(s == "copied" for s in status.values()),
            "base_evals": sum(t.kind == "baseline" for t in tasks),
            "jobs": jobs,
            "cpus": os.cpu_count(),
            "load_mean": round(sum(loads) / len(loads), 2) if loads else None,
            "load_min": min(loads, default=None),
            "load_max": max(loads, default=None),
        },
    )
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
    round0 = {s: baselines[src]["row"] for s, src in served_by.items() if src in baselines}
    rows, summary, files = write_outputs(out, finished, round0, ctx)
    echo(summary)
    return BenchResult(out, status, rows, summary, files, seconds, loads)


def _log_invocation(out: Path, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Append this call to ``DIR/invocations.jsonl``; return every call recorded there."""
    path = out / "invocations.jsonl"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    history = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash: the others still count
        if isinstance(item, dict):
            history.append(item)
    return history
