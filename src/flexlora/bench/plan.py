"""What a bench call still has to do: runs to run, base-model evaluations, runs to copy.

A finished run (``DONE.json``) is skipped, and refused when its recorded config differs from
this command's (its numbers would be mixed with others made under other settings). The
round-0 evaluation depends on the data and eval settings only, so the first seed with a given
fingerprint evaluates it for all. A run identical to another (same config, same resource type
for every client) is copied from it, not run again.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora.bench.layout import MARKER, RunKey, read_json
from flexlora.bench.settings import baseline_fingerprint, config_changes, config_json
from flexlora.config import RunConfig
from flexlora.errors import UsageError

__all__ = ["ModelFactory", "Plan", "Task", "identical_runs", "make_plan"]

ModelFactory = Callable[[RunConfig], tuple[Any, Any]]


@dataclass
class Task:
    """A unit of work for a worker: a run, or the base-model evaluation of one seed."""

    kind: str  # "run" or "baseline"
    key: RunKey | None
    seed: int
    cfg: RunConfig
    path: Path  # the run folder, or the baseline JSON file
    dataset: Any | None = None
    model_factory: ModelFactory | None = None


@dataclass
class Plan:
    """The work of one call, in the order it is done (baselines first, then seed by seed)."""

    tasks: list[Task]
    #: runs already done: "skipped" (later also "ran", "copied" or "failed: ...")
    status: dict[RunKey, str]
    #: seed -> its saved base-model evaluation (for the seeds that evaluate one)
    baselines: dict[int, dict[str, Any]]
    #: seed -> the seed whose base-model evaluation serves it
    served_by: dict[int, int]
    #: a run -> the runs identical to it (they get a copy of its folder)
    copies: dict[RunKey, list[RunKey]] = field(default_factory=dict)

    @property
    def n_runs(self) -> int:
        return sum(t.kind == "run" for t in self.tasks)

    @property
    def n_baselines(self) -> int:
        return sum(t.kind == "baseline" for t in self.tasks)

    @property
    def n_copies(self) -> int:
        return sum(len(v) for v in self.copies.values())


def make_plan(
    configs: Mapping[RunKey, RunConfig],
    out: Path,
    want_round0: bool,
    dataset: Any | None = None,
    model_factory: ModelFactory | None = None,
) -> Plan:
    """Everything still to do for ``configs`` in ``out`` (raises on changed finished runs)."""
    tasks: list[Task] = []
    status: dict[RunKey, str] = {}
    refused = []
    for key, cfg in sorted(configs.items()):
        marker = read_json(key.folder(out) / MARKER)
        if marker is None:
            tasks.append(Task("run", key, key.seed, cfg, key.folder(out)))
            continue
        changes = config_changes(marker.get("config", {}), config_json(cfg))
        if changes:
            refused.append(f"{key.folder(out)}: {'; '.join(changes[:4])}")
        status[key] = "skipped"
    if refused:
        raise UsageError(
            "finished runs in this folder used other settings; use another --out or delete "
            "them:\n  " + "\n  ".join(refused)
        )
    baselines: dict[int, dict[str, Any]] = {}
    served_by: dict[int, int] = {}
    if want_round0:
        tasks += _baseline_tasks(configs, out, baselines, served_by)
    # baselines first, then seed by seed: after each seed the summary has every cell
    tasks.sort(key=lambda t: (t.kind != "baseline", t.seed, t.key or RunKey(t.seed, "", "")))

    copies: dict[RunKey, list[RunKey]] = {}
    for alias, primary in identical_runs(configs, dataset).items():
        if alias not in status:
            copies.setdefault(primary, []).append(alias)
    aliases = {a for group in copies.values() for a in group}
    tasks = [t for t in tasks if t.key not in aliases]
    for t in tasks:
        t.dataset, t.model_factory = dataset, model_factory
    return Plan(tasks, status, baselines, served_by, copies)


def _baseline_tasks(
    configs: Mapping[RunKey, RunConfig],
    out: Path,
    baselines: dict[int, dict[str, Any]],
    served_by: dict[int, int],
) -> list[Task]:
    """Base-model evaluations still to do; fills ``baselines`` (saved) and ``served_by``."""
    first_of_seed: dict[int, RunConfig] = {}
    for key, cfg in sorted(configs.items()):
        first_of_seed.setdefault(key.seed, cfg)
    first_of_fp: dict[str, int] = {}  # fingerprint -> the first seed that has it
    tasks = []
    for seed, cfg in first_of_seed.items():
        fp = baseline_fingerprint(cfg)
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
            tasks.append(Task("baseline", None, seed, bcfg, path))
    return tasks


def identical_runs(
    configs: Mapping[RunKey, RunConfig], dataset: Any | None
) -> dict[RunKey, RunKey]:
    """Runs that would repeat another one exactly: alias -> the run whose results it takes.

    A run is determined by its config and its clients' resource types; the distribution only
    matters through those types. Strategies that hold every client to one type (``fedit-min``,
    ``fedit-max``) therefore give the same run under every distribution in which that type is
    the smallest (largest) present; names of one computation (``fedit+flexlora`` and
    ``flexlora``, see :mod:`flexlora.methods.compose`) give the same run under one
    distribution. Other runs are never merged: ``fedavg+X`` (local SGD) and ``fedit+X``
    (AdamW) are two computations.
    """
    from flexlora.server import plan_strategy, resolve_client_types

    plans = {k: plan_strategy(c.federation.strategy) for k, c in configs.items()}
    names: dict[str, set[str]] = {}  # canonical computation -> the names it runs under
    for k, p in plans.items():
        names.setdefault(p.canonical, set()).add(k.strategy)
    # aliases of one computation (fedit+flexlora, flexlora) are the same run too
    aliased = [k for k, p in plans.items() if len(names[p.canonical]) > 1]
    held = [k for k, p in plans.items() if p.hold_to]
    if len({k.distribution for k in held}) < 2 and not aliased:
        return {}
    held = sorted(set(held) | set(aliased))
    seen: dict[str, list[str]] = {}  # data config -> its seen clients
    groups: dict[str, RunKey] = {}
    aliases: dict[RunKey, RunKey] = {}
    for key in sorted(held):
        cfg = configs[key]
        d = config_json(cfg)
        data_key = json.dumps(d["data"], sort_keys=True)
        if data_key not in seen:
            from flexlora.data import load_federated_dataset

            data = dataset if dataset is not None else load_federated_dataset(cfg.data)
            seen[data_key] = list(data.seen)
        types = resolve_client_types(cfg, seen[data_key])
        for k in ("distribution", "client_types"):
            d["federation"].pop(k, None)
        d["federation"]["strategy"] = plans[key].canonical
        d["output"].pop("dir", None)
        signature = json.dumps([d, sorted(types.items())], sort_keys=True)
        if signature in groups:
            aliases[key] = groups[signature]
        else:
            groups[signature] = key
    return aliases
