"""A bench's outputs: ``results.csv`` (one row per run and round), ``summary.md`` and plots.

The summary compares the final zero-shot Rouge-L of each strategy with a mean and a 95 %
Student-t interval over seeds, and its gain over the reference strategy (``fedit-min``) as a
paired difference: seed ``s`` of every strategy shares clients, ranks and data, so the paired
interval removes the seed-to-seed spread that both runs share.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexlora.bench.stats import Estimate, mean_ci, paired_diff
from flexlora.config import RunConfig
from flexlora.simulation.report import markdown_table

if TYPE_CHECKING:
    from flexlora.bench.runner import RunKey

__all__ = [
    "COLUMNS",
    "BenchContext",
    "final_scores",
    "format_duration",
    "read_rows",
    "round0_scores",
    "summarize",
    "write_outputs",
]

COLUMNS = [
    "strategy",
    "distribution",
    "seed",
    "round",
    "rouge_l_unseen",
    "rouge_l_seen",
    "train_loss",
    "seconds_train",
    "seconds_aggregate",
    "seconds_eval",
    "bytes_up",
    "bytes_down",
    "train_tokens",
    "clients",
    "aggregated",
]
MIB = 2**20


def read_rows(
    out: Path, keys: Sequence[RunKey], baselines: Mapping[int, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One flat row per finished run and round; round 0 is the seed's base-model evaluation."""
    from flexlora.simulation.report import read_metrics

    rows: list[dict[str, Any]] = []
    for key in keys:
        cell = {"strategy": key.strategy, "distribution": key.distribution, "seed": key.seed}
        base = baselines.get(key.seed)
        if base is not None:
            rows.append(
                {
                    **cell,
                    "round": 0,
                    **{k: v for k, v in base.items() if k.startswith("rouge_l_")},
                    "seconds_train": 0.0,
                    "bytes_up": 0,
                    "bytes_down": 0,
                }
            )
        for m in read_metrics(key.folder(out)):
            row = {**cell, **{c: m.get(c) for c in COLUMNS[3:] if not isinstance(m.get(c), list)}}
            row["clients"] = len(m.get("clients") or [])
            row["aggregated"] = len(m.get("aggregated") or [])
            rows.append(row)
    return rows


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in COLUMNS})


def metric_of(rows: Sequence[Mapping[str, Any]]) -> str:
    """The compared metric: unseen-task Rouge-L when evaluated, else seen-task Rouge-L."""
    has_unseen = any(r.get("rouge_l_unseen") is not None for r in rows)
    return "rouge_l_unseen" if has_unseen else "rouge_l_seen"


def final_scores(
    rows: Sequence[Mapping[str, Any]], metric: str
) -> dict[tuple[str, str], dict[int, float]]:
    """(strategy, distribution) -> seed -> the metric at that run's last evaluated round > 0."""
    last: dict[tuple[str, str, int], tuple[int, float]] = {}
    for r in rows:
        value = r.get(metric)
        if r["round"] == 0 or value is None:
            continue
        k = (r["strategy"], r["distribution"], r["seed"])
        if k not in last or r["round"] > last[k][0]:
            last[k] = (r["round"], float(value))
    out: dict[tuple[str, str], dict[int, float]] = {}
    for (s, d, seed), (_, value) in sorted(last.items()):
        out.setdefault((s, d), {})[seed] = value
    return out


def round0_scores(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[int, float]:
    """Seed -> the base model's score (the same in every run of that seed)."""
    return {
        int(r["seed"]): float(r[metric])
        for r in rows
        if r["round"] == 0 and r.get(metric) is not None
    }


def _per_run(rows: Sequence[Mapping[str, Any]], strategy: str, column: str) -> Estimate:
    """Mean over the strategy's runs of the column's sum over rounds."""
    totals: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["strategy"] == strategy and r["round"] > 0 and r.get(column) is not None:
            k = (r["distribution"], r["seed"])
            totals[k] = totals.get(k, 0.0) + float(r[column])
    return mean_ci(list(totals.values()))


@dataclass
class BenchContext:
    """What the summary says besides the rows: the grid, the settings, this invocation."""

    strategies: Sequence[str]
    distributions: Sequence[str]
    seeds: Sequence[int]
    base: RunConfig
    reference: str = "fedit-min"
    vary_data: bool = False  # data.seed = the seed (else the config's, for every seed)
    missing: Sequence[str] = ()
    #: one record per call of the command on this folder, the current one last (see runner)
    invocations: Sequence[Mapping[str, Any]] = ()
    data_label: str | None = None  # shown instead of data.source (a dataset object)


def summarize(
    rows: Sequence[Mapping[str, Any]],
    ctx: BenchContext,
    wall: Mapping[RunKey, float] | None = None,
) -> str:
    """The Markdown summary: final score, gain over the reference, per-seed values, cost."""
    strategies, distributions, seeds = ctx.strategies, ctx.distributions, ctx.seeds
    base, reference = ctx.base, ctx.reference
    metric = metric_of(rows)
    finals = final_scores(rows, metric)
    last_round = max((int(r["round"]) for r in rows), default=0)
    label = "unseen-task (zero-shot)" if metric == "rouge_l_unseen" else "seen-task"
    fed, tr = base.federation, base.train
    lines = [
        "# flexlora bench",
        "",
        f"Final {label} Rouge-L after round {last_round}: mean ± 95 % CI (Student t) over "
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}).",
        "",
    ]
    body = []
    for s in strategies:
        body.append(
            [s, *(mean_ci(list(finals.get((s, d), {}).values())).format() for d in distributions)]
        )
    round0 = round0_scores(rows, metric)
    if round0:
        est = mean_ci(list(round0.values())).format()
        body.append(["base model (round 0)", *([est] * len(distributions))])
    lines += markdown_table(["strategy", *distributions], body)

    if reference in strategies:
        lines += [
            "",
            f"Gain over {reference}, paired by seed: mean ± 95 % CI of the per-seed difference "
            "(seeds won / seeds compared).",
            "",
        ]
        body = []
        for s in strategies:
            if s == reference:
                continue
            cells = []
            for d in distributions:
                ref = finals.get((reference, d), {})
                est, wins = paired_diff(finals.get((s, d), {}), ref)
                cells.append(f"{est.format(signed=True)} ({wins}/{est.n})" if est.n else "—")
            body.append([s, *cells])
        lines += markdown_table(["strategy", *distributions], body)

    lines += ["", f"Per-seed values (seeds {', '.join(map(str, seeds))}):", ""]
    body = []
    for s in strategies:
        cells = []
        for d in distributions:
            vals = finals.get((s, d), {})
            cells.append(" / ".join(f"{vals[x]:.4f}" if x in vals else "—" for x in seeds))
        body.append([s, *cells])
    lines += markdown_table(["strategy", *distributions], body)

    lines += ["", "Cost per run (mean over distributions and seeds):", ""]
    body = []
    for s in strategies:
        up, down = _per_run(rows, s, "bytes_up"), _per_run(rows, s, "bytes_down")
        w = [v for k, v in (wall or {}).items() if k.strategy == s]
        body.append(
            [
                s,
                f"{_per_run(rows, s, 'seconds_train').mean:.0f}",
                f"{_per_run(rows, s, 'seconds_aggregate').mean:.2f}",
                f"{up.mean / MIB:.2f}" if up.n else "—",
                f"{down.mean / MIB:.2f}" if down.n else "—",
                f"{sum(w) / len(w):.0f}" if w else "—",
            ]
        )
    lines += markdown_table(
        ["strategy", "train s", "aggregate s", "upload MiB", "download MiB", "run wall s"], body
    )

    local = f"{tr.local_steps} local steps" if tr.local_steps else f"{tr.local_epochs} epochs"
    every = f"every {base.eval.every} round(s)" if base.eval.every else "after the last round"
    lines += [
        "",
        f"Settings: model {base.model.name}, data {ctx.data_label or base.data.source}, "
        f"{fed.rounds} rounds x {fed.clients_per_round} clients x {local} "
        f"(batch {tr.batch_size}, lr {tr.lr:g}); evaluated {every}, on "
        f"{base.eval.max_examples_per_client or 'all'} test examples per client; "
        + (
            "data.seed = the seed (each seed holds out other unseen tasks)."
            if ctx.vary_data
            else f"data.seed {base.data.seed} in every seed (the same unseen tasks)."
        ),
    ]
    if ctx.missing:
        lines += ["", f"Not in the tables ({len(ctx.missing)}): " + "; ".join(ctx.missing)]
    if ctx.invocations:
        lines += ["", "Wall time of the calls that ran something on this folder:", ""]
        shown = [
            x for x in ctx.invocations if x.get("ran") or x.get("base_evals") or x.get("copied")
        ]
        lines += [f"- {_invocation(x)}" for x in shown]
        if ctx.invocations[-1] not in shown:
            lines.append(f"- {_invocation(ctx.invocations[-1])}")
    return "\n".join(lines) + "\n"


def _invocation(x: Mapping[str, Any]) -> str:
    """One call of the command: what it ran, its wall time, jobs and the machine's load."""
    load = ""
    if x.get("load_mean") is not None:
        load = (
            f"; 1-min load average {x['load_mean']:.1f} mean ({x['load_min']:.1f}-"
            f"{x['load_max']:.1f}, sampled after each task) on {x.get('cpus')} CPUs"
        )
    failed = f", {x['failed']} failed" if x.get("failed") else ""
    copied = f", {x['copied']} copied from an identical run" if x.get("copied") else ""
    return (
        f"{x.get('started', '?')}: {x.get('ran', 0)} runs and {x.get('base_evals', 0)} base-model "
        f"evaluations ({x.get('skipped', 0)} runs already done{failed}{copied}) in "
        f"{format_duration(float(x.get('seconds', 0.0)))} with {x.get('jobs', 1)} job(s){load}"
    )


def format_duration(s: float) -> str:
    """``1h02m03s`` / ``2m03s``."""
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def write_outputs(
    out: Path,
    finished: Sequence[RunKey],
    baselines: Mapping[int, Mapping[str, Any]],
    ctx: BenchContext,
) -> tuple[list[dict[str, Any]], str, list[Path]]:
    """Write results.csv, summary.md and the plots; return the rows, the summary, the files."""
    from flexlora.bench.plots import plot_final, plot_gain, plot_rounds
    from flexlora.bench.runner import MARKER, read_json

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
