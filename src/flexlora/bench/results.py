"""A bench's rows: one per finished run and round (``results.csv``), and the scores the
summary and the plots compare (final score per run, the base model's round 0, per-run sums).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flexlora.bench.layout import RunKey
from flexlora.bench.stats import Estimate, mean_ci

__all__ = [
    "COLUMNS",
    "final_scores",
    "harness_columns",
    "metric_of",
    "per_run",
    "read_rows",
    "round0_scores",
    "write_csv",
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
    "energy_kept_min",  # rank-energy diagnostics: the rank type that keeps least of ΔW
    "update_survival_min",  # the rank type whose own updates survive least
    "effective_rank",
]
MIB = 2**20
HARNESS_PREFIX = "harness/"


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
            for key in ("energy_kept", "update_survival"):  # per rank type -> the worst type
                values = [v for v in (m.get(key) or {}).values() if v is not None]
                row[f"{key}_min"] = min(values) if values else None
            row["aggregated"] = len(m.get("aggregated") or [])
            row.update({k: v for k, v in m.items() if k.startswith(HARNESS_PREFIX)})
            rows.append(row)
    return rows


def harness_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lm-eval scores in the rows (``harness/<task>/<metric>``, eval.harness_tasks)."""
    return sorted({k for r in rows for k in r if k.startswith(HARNESS_PREFIX)})


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns = [*COLUMNS, *harness_columns(rows)]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})


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


def mean_over_rounds(rows: Sequence[Mapping[str, Any]], strategy: str, column: str) -> Estimate:
    """Mean over the strategy's runs of the column's mean over rounds (None where absent)."""
    values: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r["strategy"] == strategy and r["round"] > 0 and r.get(column) is not None:
            values.setdefault((r["distribution"], r["seed"]), []).append(float(r[column]))
    return mean_ci([sum(v) / len(v) for v in values.values()])


def per_run(rows: Sequence[Mapping[str, Any]], strategy: str, column: str) -> Estimate:
    """Mean over the strategy's runs of the column's sum over rounds."""
    totals: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["strategy"] == strategy and r["round"] > 0 and r.get(column) is not None:
            k = (r["distribution"], r["seed"])
            totals[k] = totals.get(k, 0.0) + float(r[column])
    return mean_ci(list(totals.values()))
