"""``load_federated_dataset``: a :class:`DataConfig` -> a :class:`FederatedDataset`.

Steps: (1) open the source; (2) choose the unseen (held-out) units: tasks for the task
partitioner, categories for meta, clients for dirichlet; (3) read each task, keeping a seeded
subsample; (4) cut into clients; (5) split each client 8:1:1 (seeded per client), dropping the
train part of unseen clients.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from flexlora.data.accounting import ClientCount, LoadAccount
from flexlora.data.config import DataConfig
from flexlora.data.jsonl import DOLLY_FIELDS, FieldMap, read_hub, read_jsonl
from flexlora.data.natural_instructions import NaturalInstructionsV1, NaturalInstructionsV2
from flexlora.data.offline import ensure_ni_v1
from flexlora.data.partition import (
    dirichlet_partition,
    meta_partition,
    rng_for,
    select_unseen,
    shard,
    split_examples,
    split_sizes,
    subsample_indices,
)
from flexlora.data.sources import InMemorySource, KeepFn, TaskSource
from flexlora.data.templates import get_template
from flexlora.data.types import ClientSplit, Example, FederatedDataset

__all__ = ["load_federated_dataset", "open_source"]

log = logging.getLogger(__name__)


def open_source(cfg: DataConfig) -> TaskSource:
    """The reader for ``cfg.source`` (the offline default is extracted here at first use)."""
    if cfg.source == "natural-instructions-v1-offline":
        path = Path(cfg.path).expanduser() if cfg.path else None
        folder = path if path is not None and path.is_dir() else ensure_ni_v1(path)
        return NaturalInstructionsV1(folder)
    if cfg.source == "natural-instructions":
        return NaturalInstructionsV2(Path(cfg.path).expanduser(), cfg.positive_examples)
    if cfg.source == "dolly":
        return InMemorySource(cfg.path, read_jsonl(Path(cfg.path).expanduser(), DOLLY_FIELDS))
    fields = FieldMap(
        cfg.instruction_field, cfg.input_field, cfg.output_field, cfg.category_field, cfg.task_field
    )
    if cfg.source == "jsonl":
        return InMemorySource(cfg.path, read_jsonl(Path(cfg.path).expanduser(), fields))
    return InMemorySource(cfg.path, read_hub(cfg.path, cfg.hub_split, fields))


def load_federated_dataset(cfg: DataConfig, account: LoadAccount | None = None) -> FederatedDataset:
    """Read, subsample, partition and split the data ``cfg`` describes (all seeded).

    ``account`` (optional) is filled with what was read, kept and dropped, and why.
    """
    template = get_template(cfg.template)  # fail on a bad template before reading data
    source = open_source(cfg)
    acc = account if account is not None else LoadAccount()
    acc.source = source.name
    with _gc_paused():
        if cfg.resolved_partitioner() == "task":
            splits, unseen = _by_task(source, cfg, acc)
        else:
            splits, unseen = _pooled(source, cfg, acc)
    data = FederatedDataset(splits, unseen, name=source.name, template=template)
    log.info("%s", data)
    return data


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building ~10^5 long-lived objects (JSON trees have no cycles):
    its repeated passes over the growing heap cost more than the parsing itself."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _keep(cfg: DataConfig, task: str, acc: LoadAccount) -> KeepFn:
    rng = rng_for(cfg.seed, "subsample", task)

    def keep(n: int) -> np.ndarray:
        idx = subsample_indices(n, cfg.subsample_fraction, cfg.max_examples_per_task, rng)
        acc.read_task(task, n, len(idx))
        return idx

    return keep


def _split(
    cfg: DataConfig,
    cid: str,
    examples: list[Example],
    seen: bool,
    acc: LoadAccount,
    task: str = "",
) -> ClientSplit:
    split = split_examples(
        examples,
        cfg.split_ratios,
        rng_for(cfg.seed, "split", cid),
        max_train=cfg.max_train_per_client,
        max_test=cfg.max_test_per_client,
        keep_train=seen,
    )
    n_train, n_eval, n_test = split_sizes(len(examples), cfg.split_ratios)
    acc.clients[cid] = ClientCount(
        task=task,
        seen=seen,
        train=len(split.train),
        eval=len(split.eval),
        test=len(split.test),
        unseen_train=0 if seen else n_train,
        train_cap=n_train - len(split.train) if seen else 0,
        test_cap=n_eval + n_test - len(split.eval) - len(split.test),
    )
    return split


def _by_task(
    source: TaskSource, cfg: DataConfig, acc: LoadAccount
) -> tuple[dict[str, ClientSplit], list[str]]:
    """One client per task (or ``clients_per_task`` shards of it); unseen tasks are chosen
    from the names alone, before any task file is read."""
    names = source.task_names()
    if cfg.resolved_unseen() == "official":
        seen_tasks, unseen_tasks = source.official_split()
        tasks = sorted([*seen_tasks, *unseen_tasks])
        held_out = set(unseen_tasks)
        if len(tasks) < len(names):
            acc.not_in_split = len(names) - len(tasks)
            log.info("%d tasks are in neither split file; skipped", acc.not_in_split)
    else:
        tasks = names
        held_out = select_unseen(names, cfg.unseen_fraction, rng_for(cfg.seed, "unseen"))
    k = cfg.clients_per_task
    splits: dict[str, ClientSplit] = {}
    unseen: list[str] = []
    short = 0
    for task in tqdm(tasks, desc="reading tasks", unit="task", disable=None):
        examples = source.read_task(task, _keep(cfg, task, acc))
        shards = [examples] if k == 1 else shard(examples, k, rng_for(cfg.seed, "shard", task))
        short += len(shards) < k
        for j, part in enumerate(shards):
            cid = task if k == 1 else f"{task}.{j}"
            splits[cid] = _split(cfg, cid, part, task not in held_out, acc, task)
            if task in held_out:
                unseen.append(cid)
    if short:
        warnings.warn(
            f"{short} tasks have fewer examples than clients_per_task={k}; "
            "they were split into fewer clients",
            stacklevel=3,
        )
    return splits, unseen


def _pooled(
    source: TaskSource, cfg: DataConfig, acc: LoadAccount
) -> tuple[dict[str, ClientSplit], list[str]]:
    """All (subsampled) examples pooled, then cut by category: dirichlet or meta."""
    examples = [e for t in source.task_names() for e in source.read_task(t, _keep(cfg, t, acc))]
    categories = [e.category for e in examples]
    if cfg.resolved_partitioner() == "meta":
        groups = meta_partition(categories)
    else:
        parts = dirichlet_partition(
            categories,
            cfg.num_clients,
            cfg.dirichlet_alpha,
            rng_for(cfg.seed, "dirichlet"),
        )
        width = len(str(cfg.num_clients - 1))
        groups = {f"client_{i:0{width}d}": list(p) for i, p in enumerate(parts)}
    held_out = select_unseen(list(groups), cfg.unseen_fraction, rng_for(cfg.seed, "unseen"))
    splits = {
        cid: _split(cfg, cid, [examples[i] for i in idx], cid not in held_out, acc)
        for cid, idx in groups.items()
    }
    return splits, [cid for cid in splits if cid in held_out]
