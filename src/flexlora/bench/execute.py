"""Doing a bench's work: one task (a run or a base-model evaluation), in this process or in
worker processes with one torch thread each, and copying a finished run to an identical one.

On a few shared cores several single-threaded processes are much more robust than one
multi-threaded one. A failed task is reported and the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from flexlora.bench.layout import MARKER, RunKey, read_json, write_json
from flexlora.bench.plan import Task
from flexlora.bench.settings import baseline_fingerprint, config_json
from flexlora.config import RunConfig
from flexlora.errors import FlexLoRAError
from flexlora.simulation.rundir import LOCK

log = logging.getLogger(__name__)

__all__ = ["Report", "copy_run", "execute", "run_tasks"]

#: called once per task with its result, or None and the error text
Report = Callable[[Task, dict[str, Any] | None, str | None], None]


def _model(task: Task) -> tuple[Any, Any] | None:
    # get_peft_model wraps a model in place: every run needs a fresh one.
    return task.model_factory(task.cfg) if task.model_factory is not None else None


def execute(task: Task) -> dict[str, Any]:
    """Do one task; return what the progress line and the summary need."""
    from flexlora.simulation.runner import FederatedRun

    t0 = time.perf_counter()
    if task.kind == "baseline":
        run = FederatedRun(task.cfg, dataset=task.dataset, model_and_tokenizer=_model(task))
        row = run.evaluate(None)
        seconds = time.perf_counter() - t0
        row["seconds_eval"] = round(seconds, 3)
        write_json(
            task.path,
            {"fingerprint": baseline_fingerprint(task.cfg), "row": row, "seconds": seconds},
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
    write_json(
        folder / MARKER,
        {
            "config": config_json(task.cfg),
            "seconds": seconds,
            "resumed": resumed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    return {"seconds": seconds, "resumed": resumed, "final": last}


def copy_run(source: Path, target: Path, cfg: RunConfig, same_as: RunKey) -> None:
    """Give ``target`` the finished run in ``source`` (same metrics and adapters), marked so."""
    marker = read_json(source / MARKER) or {}
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(MARKER, LOCK, "checkpoint"))
    (target / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    write_json(
        target / MARKER,
        {
            "config": config_json(cfg),
            "seconds": marker.get("seconds", 0.0),
            "resumed": False,
            "same_as": same_as.label(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


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


def run_tasks(tasks: Sequence[Task], jobs: int, report: Report) -> None:
    """Do every task (in order with ``jobs`` == 1, else in ``jobs`` spawned workers)."""
    if jobs == 1:
        for task in tasks:
            try:
                result = execute(task)
            except FlexLoRAError as exc:
                report(task, None, str(exc))
            except Exception as exc:  # a failed run must not stop the others
                log.exception("%s failed", task.key.label() if task.key else "base model")
                report(task, None, f"{type(exc).__name__}: {exc}")
            else:
                report(task, result, None)
        return
    if not tasks:
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker) as pool:
        futures: dict[Future, Task] = {pool.submit(execute, t): t for t in tasks}
        try:
            for fut in as_completed(futures):
                try:
                    report(futures[fut], fut.result(), None)
                except Exception as exc:  # a failed run must not stop the others
                    report(futures[fut], None, f"{type(exc).__name__}: {exc}")
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
