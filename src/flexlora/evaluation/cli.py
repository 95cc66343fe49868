"""``flexlora eval TARGET --tasks T1,T2``: lm-evaluation-harness scores of adapters and base.

TARGET is one adapter folder, or a run folder: then the base model and every exported adapter
are scored on the same prompts, side by side (a Markdown table, and JSON). Importing this
module stays cheap: torch, PEFT and lm-eval are imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["add_eval_command", "format_scores", "run_eval"]

log = logging.getLogger(__name__)

BASE_LABEL = "base model"


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score adapters (and their base) on lm-evaluation-harness tasks, offline",
        description=__doc__,
    )
    p.add_argument("target", help="an adapter folder, or a run folder (DIR/adapters/rank-R/)")
    p.add_argument(
        "--tasks", required=True, help="comma list of lm-eval task (or group) names, e.g. mmlu"
    )
    p.add_argument(
        "--include-path",
        default=None,
        help="folder of task YAMLs; only its tasks are indexed (relative data_files are read "
        "from it)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model (name, folder, hub id or .gguf; default: the adapters' "
        "base_model_name_or_path)",
    )
    p.add_argument("--limit", type=int, default=0, help="first N examples of each task (0: all)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, ...: the whole base there, the run's model.device_map dropped "
        "(default: the run's model.device and device_map)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON file of the scores (default: DIR/eval.json for a run folder)",
    )
    p.add_argument("--no-base", action="store_true", help="score the adapters only")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from flexlora.errors import UsageError

    if args.limit < 0 or args.batch_size < 1:
        raise UsageError("--limit must be >= 0 and --batch-size >= 1")
    if logging.getLogger().level > logging.DEBUG:  # lm-eval's per-step notes only with -v
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    report = run_eval(
        args.target,
        args.tasks,
        include_path=args.include_path,
        base=args.base,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        score_base=not args.no_base,
    )
    print(format_scores(report))
    out = Path(args.out) if args.out else None
    if out is None and report["run_dir"]:
        out = Path(report["run_dir"]) / "eval.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"scores in {out}")
    return 0


def run_eval(
    target: str | Path,
    tasks: str | list[str],
    *,
    include_path: str | Path | None = None,
    base: str | None = None,
    limit: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    score_base: bool = True,
) -> dict[str, Any]:
    """Score the base and every adapter of ``target``; return the JSON report."""
    from peft import PeftModel

    from flexlora.evaluation.harness import check_tasks, parse_tasks, score, task_manager
    from flexlora.evaluation.targets import (
        add_frozen_delta,
        check_fits,
        load_base,
        resolve_target,
    )

    names = parse_tasks(tasks)
    tgt = resolve_target(target, base)
    manager = task_manager(include_path)  # unknown tasks fail before the model loads
    check_tasks(manager, names, include_path)
    model, tokenizer = load_base(tgt, device)
    for folder in tgt.adapters.values():
        check_fits(model, folder, tgt.base)

    scores: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, int] = {}
    seconds: dict[str, float] = {}

    def run(label: str, m: Any) -> None:
        t0 = time.perf_counter()
        scores[label], n = score(
            m,
            tokenizer,
            names,
            include_path=include_path,
            limit=limit,
            batch_size=batch_size,
            manager=manager,
        )
        samples.update(n)
        seconds[label] = round(time.perf_counter() - t0, 2)
        log.info("%s: %s (%.1fs)", label, scores[label], seconds[label])

    if score_base:
        run(BASE_LABEL, model)
    residual = add_frozen_delta(model, tgt)  # the adapters' base is W0 + U·S·Vh (FedEx-LoRA)
    if residual is not None:
        log.info("adapters scored on the base plus the residual in %s", residual)
    peft_model = None
    for label, folder in tgt.adapters.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, folder, adapter_name=label)
        else:
            peft_model.load_adapter(folder, adapter_name=label)
        peft_model.set_adapter(label)
        run(label, peft_model)

    import lm_eval

    return {
        "target": str(target),
        "run_dir": str(tgt.run_dir) if tgt.run_dir else None,
        "base": tgt.base,
        "adapters": {k: str(v) for k, v in tgt.adapters.items()},
        "frozen_delta": str(residual) if residual is not None else None,
        "tasks": names,
        "include_path": str(include_path) if include_path else None,
        "limit": limit,
        "samples": samples,
        "scores": scores,
        "seconds": seconds,
        "lm_eval_version": getattr(lm_eval, "__version__", "?"),
    }


def format_scores(report: Mapping[str, Any]) -> str:
    """A Markdown table: one row per model (base first), one column per task metric."""
    from flexlora.simulation.report import markdown_table

    scores: Mapping[str, Mapping[str, Mapping[str, float]]] = report["scores"]
    columns: list[tuple[str, str]] = []
    for per_task in scores.values():
        for task, metrics in per_task.items():
            columns += [(task, m) for m in metrics if (task, m) not in columns]
    header = ["model", *(f"{t} {m}" for t, m in columns)]
    body = [
        [label, *(f"{per_task.get(t, {}).get(m, float('nan')):.4f}" for t, m in columns)]
        for label, per_task in scores.items()
    ]
    n = ", ".join(f"{t}: {k}" for t, k in report.get("samples", {}).items())
    lines = markdown_table(header, body, rule=" ---: ")
    return "\n".join([*lines, "", f"examples per task: {n}; base: {report['base']}"])
