"""Scoring a model on lm-evaluation-harness tasks, offline.

The model object is passed in (lm-eval's ``HFLM(pretrained=<model>, tokenizer=...)``), so an
adapter on a quantized base, or the simulator's global model merged into its base, is scored
exactly as it is held in memory. With an include path only its tasks are indexed
(``TaskManager(include_path=..., include_defaults=False)``: the ~14k built-in tasks are
skipped) and relative ``data_files`` in its YAMLs are read relative to that folder. The hub
and ``datasets`` are put offline while scoring: a dataset that is not on disk or in the local
cache is a clear error, never a download.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flexlora.errors import UsageError

log = logging.getLogger(__name__)

__all__ = [
    "LM_EVAL_HINT",
    "TaskScores",
    "flat_scores",
    "offline",
    "parse_tasks",
    "score",
    "task_manager",
]

#: task -> metric (``acc``, ``exact_match``, ``acc_norm``; ``metric,filter`` when filtered)
TaskScores = dict[str, dict[str, float]]

LM_EVAL_HINT = "install lm-evaluation-harness: pip install 'flexlora[eval]' (lm-eval>=0.4.13,<0.5)"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError(f"scoring lm-eval tasks needs lm-eval; {LM_EVAL_HINT}")


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (a task listed twice is an error)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = [t for t in names if t]
    if not names:
        raise UsageError("no lm-eval task given (--tasks T1,T2 or eval.harness_tasks)")
    twice = sorted({t for t in names if names.count(t) > 1})
    if twice:
        raise UsageError(f"lm-eval task listed twice: {', '.join(twice)}")
    return names


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The hub and ``datasets`` offline (env vars and the already imported modules' flags)."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_VARS}
    os.environ.update(dict.fromkeys(OFFLINE_VARS, "1"))
    flags: list[tuple[Any, str, Any]] = []
    for module, name in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ):
        with contextlib.suppress(ImportError, AttributeError):
            mod = importlib.import_module(module)
            flags.append((mod, name, getattr(mod, name)))
            setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in flags:
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(include_path: str | Path | None = None) -> Any:
    """lm-eval's TaskManager: only ``include_path``'s tasks when given, else the built-in ones."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not include_path:
        return TaskManager()
    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--include-path {include_path}: no such folder of lm-eval task YAMLs")
    return TaskManager(include_path=str(folder.resolve()), include_defaults=False)


def check_tasks(manager: Any, names: Sequence[str], include_path: str | Path | None) -> None:
    """Every name is a task, group or tag lm-eval knows (else a UsageError with suggestions)."""
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    missing = [n for n in names if n not in known]
    if not missing:
        return
    where = f"in {include_path} (include_defaults off)" if include_path else "in lm-eval"
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, sorted(known), n=3)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    shown = ", ".join(sorted(known)[:20]) + (" ..." if len(known) > 20 else "")
    raise UsageError(
        f"unknown lm-eval task(s) {'; '.join(hints)} {where}; known: {shown or 'none'}"
    )


def _is_data_error(exc: BaseException) -> bool:
    """An exception raised while a task's dataset loads (missing file, offline hub, ...)."""
    if isinstance(exc, (FileNotFoundError, ConnectionError)):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("datasets", "huggingface_hub", "requests", "urllib3", "fsspec"))


def score(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int = 0,
    batch_size: int = 8,
    manager: Any | None = None,
) -> tuple[TaskScores, dict[str, int]]:
    """Score ``model`` on ``tasks``; return the scores and each task's number of examples.

    ``limit`` > 0 takes the first ``limit`` examples of every task (lm-eval's ``--limit``).
    The global RNGs are left as they were (lm-eval seeds them).
    """
    import torch

    _require_lm_eval()
    manager = manager if manager is not None else task_manager(include_path)
    check_tasks(manager, tasks, include_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    folder = Path(include_path).expanduser().resolve() if include_path else None
    was_training = model.training
    model.eval()
    try:
        with (
            offline(),
            torch.random.fork_rng(devices=[]),
            contextlib.chdir(folder) if folder else contextlib.nullcontext(),
        ):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            try:
                out = simple_evaluate(
                    model=lm,
                    tasks=list(tasks),
                    task_manager=manager,
                    limit=limit or None,
                    log_samples=False,
                    bootstrap_iters=0,
                )
            except Exception as exc:
                if not _is_data_error(exc):
                    raise
                raise UsageError(
                    f"lm-eval task(s) {', '.join(tasks)}: a dataset could not be loaded offline "
                    f"(HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1; local data_files are read "
                    f"relative to {folder or os.getcwd()}): {type(exc).__name__}: {exc}"
                ) from exc
    finally:
        model.train(was_training)
    assert out is not None  # only None on non-zero ranks of a distributed run
    scores: TaskScores = {}
    for task, values in out["results"].items():
        scores[task] = {
            (k.removesuffix(",none")): float(v)
            for k, v in values.items()
            if "," in k and "_stderr" not in k and isinstance(v, (int, float))
        }
    samples = {
        t: int(n.get("effective", n.get("original", 0))) for t, n in out["n-samples"].items()
    }
    return scores, samples


def flat_scores(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{"harness/<task>/<metric>": value}``, the keys of a ``metrics.jsonl`` row."""
    return {f"harness/{t}/{m}": v for t, ms in scores.items() for m, v in ms.items()}
