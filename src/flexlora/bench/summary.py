"""A bench's ``summary.md``: the final score of each strategy with a mean and a 95 % Student-t
interval over seeds, and its gain over the reference strategy (``fedit-min``) as a paired
difference: seed ``s`` of every strategy shares clients, ranks and data, so the paired
interval removes the seed-to-seed spread that both runs share. Then per-seed values, the cost
per run, the settings and the wall time of each call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flexlora.bench.layout import RunKey
from flexlora.bench.paper_grid import paper_grid_section
from flexlora.bench.results import (
    MIB,
    final_scores,
    harness_columns,
    mean_over_rounds,
    metric_of,
    per_run,
    round0_scores,
)
from flexlora.bench.stats import mean_ci, paired_diff
from flexlora.config import RunConfig
from flexlora.simulation.report import markdown_table

__all__ = ["BenchContext", "format_duration", "summarize"]


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

    lines += paper_grid_section(finals, strategies, distributions)  # when the grid is there

    lines += ["", f"Per-seed values (seeds {', '.join(map(str, seeds))}):", ""]
    body = []
    for s in strategies:
        cells = []
        for d in distributions:
            vals = finals.get((s, d), {})
            cells.append(" / ".join(f"{vals[x]:.4f}" if x in vals else "—" for x in seeds))
        body.append([s, *cells])
    lines += markdown_table(["strategy", *distributions], body)

    lines += _harness_section(rows, strategies, distributions)

    lines += ["", "Cost per run (mean over distributions and seeds):", ""]
    body = []
    for s in strategies:
        up, down = per_run(rows, s, "bytes_up"), per_run(rows, s, "bytes_down")
        w = [v for k, v in (wall or {}).items() if k.strategy == s]
        body.append(
            [
                s,
                f"{per_run(rows, s, 'seconds_train').mean:.0f}",
                f"{per_run(rows, s, 'seconds_aggregate').mean:.2f}",
                f"{up.mean / MIB:.2f}" if up.n else "—",
                f"{down.mean / MIB:.2f}" if down.n else "—",
                f"{sum(w) / len(w):.0f}" if w else "—",
            ]
        )
    lines += markdown_table(
        ["strategy", "train s", "aggregate s", "upload MiB", "download MiB", "run wall s"], body
    )

    lines += rank_energy_section(rows, strategies)

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


def _harness_section(
    rows: Sequence[Mapping[str, Any]], strategies: Sequence[str], distributions: Sequence[str]
) -> list[str]:
    """lm-evaluation-harness scores of the final global model (eval.harness_tasks)."""
    columns = harness_columns(rows)
    if not columns:
        return []
    lines = [
        "",
        "lm-evaluation-harness scores of the final global model (eval.harness_tasks): mean ± "
        "95 % CI over seeds.",
        "",
    ]
    finals = {c: final_scores(rows, c) for c in columns}
    body = [
        [s, d, *(mean_ci(list(finals[c].get((s, d), {}).values())).format() for c in columns)]
        for s in strategies
        for d in distributions
    ]
    header = ["strategy", "distribution", *(c.removeprefix("harness/") for c in columns)]
    return lines + markdown_table(header, body)


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


def rank_energy_section(rows: Sequence[Mapping[str, Any]], strategies: Sequence[str]) -> list[str]:
    """The rank-energy diagnostics per strategy (see flexlora.diagnostics), when the runs have
    them: what the worst-served rank type keeps of ΔW and of its clients' own updates."""
    cols = ("energy_kept_min", "update_survival_min", "effective_rank")
    body = []
    for s in strategies:
        est = [mean_over_rounds(rows, s, c) for c in cols]
        if any(e.n for e in est):
            body.append([s, *(e.format() if e.n else "—" for e in est)])
    if not body:
        return []
    return [
        "",
        "Rank energy, mean over rounds (then ± over runs): the share of ‖ΔW‖²_F the rank type "
        "that keeps least receives, the share ‖P(ΔW_i)‖/‖ΔW_i‖ of a client's own update that "
        "survives redistribution (worst rank type), the effective rank of ΔW.",
        "",
        *markdown_table(
            ["strategy", "ΔW kept (worst type)", "own update kept", "effective rank"], body
        ),
    ]
