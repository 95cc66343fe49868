"""Writing a bench's outputs: ``results.csv``, ``summary.md`` and the plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flexlora.bench.layout import MARKER, RunKey, read_json
from flexlora.bench.results import final_scores, metric_of, read_rows, round0_scores, write_csv
from flexlora.bench.summary import BenchContext, summarize

__all__ = ["write_outputs"]


def write_outputs(
    out: Path,
    finished: Sequence[RunKey],
    baselines: Mapping[int, Mapping[str, Any]],
    ctx: BenchContext,
) -> tuple[list[dict[str, Any]], str, list[Path]]:
    """Write results.csv, summary.md and the plots; return the rows, the summary, the files."""
    from flexlora.bench.plots import plot_final, plot_gain, plot_rounds

    rows = read_rows(out, finished, baselines)
    wall = {}
    for key in finished:
        marker = read_json(key.folder(out) / MARKER) or {}
        if isinstance(marker.get("seconds"), (int, float)):
            wall[key] = float(marker["seconds"])
    write_csv(out / "results.csv", rows)
    summary = summarize(rows, ctx, wall)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    files = [out / "results.csv", out / "summary.md"]
    metric = metric_of(rows)
    files.append(
        plot_rounds(rows, ctx.strategies, ctx.distributions, metric, out / "rouge_by_round.png")
    )
    finals = final_scores(rows, metric)
    files.append(
        plot_final(
            finals,
            ctx.strategies,
            ctx.distributions,
            metric,
            out / "final_rouge.png",
            base=round0_scores(rows, metric),
        )
    )
    if ctx.reference in ctx.strategies and len(ctx.strategies) > 1:
        path = out / f"gain_over_{ctx.reference}.png"
        files.append(plot_gain(finals, ctx.strategies, ctx.distributions, ctx.reference, path))
    return rows, summary, files
