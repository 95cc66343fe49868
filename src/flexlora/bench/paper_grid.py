"""The paper's comparison grid in its own shape (FlexLoRA, Bai et al. 2024, Tables 2, 3, 11).

Rows are the base methods FedAvg, FedIT and SLoRA, each at a homogeneous rank, with FlexLoRA
and with HetLoRA (strategy names ``METHOD+AGGREGATION``, :mod:`flexlora.methods.compose`);
columns are the resource distributions. Three tables:

- Table 2's form: final score, mean ± 95 % Student-t interval over seeds;
- Table 3's form: each baseline's improvement from FlexLoRA, in percent of the baseline's
  mean score, ``100·(mean(method+flexlora) − mean(method))/mean(method)``, with the seeds won;
- Table 11's form: the p-value of a paired two-sided t-test over seeds of method+flexlora
  against method (and against method+hetlora): a seed shares clients, ranks and data across
  strategies, so the pairing removes the spread both runs share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from flexlora.bench.stats import mean_ci, paired_diff, paired_t_test
from flexlora.errors import UsageError
from flexlora.methods.compose import parse_strategy
from flexlora.simulation.report import markdown_table

__all__ = ["GRID_METHODS", "grid_cell", "paper_grid_section"]

GRID_METHODS = {"fedavg": "FedAvg", "fedit": "FedIT", "slora": "SLoRA"}
_ROWS = {"homogeneous": "homogeneous rank", "flexlora": "+ FlexLoRA", "hetlora": "+ HetLoRA"}

Finals = Mapping[tuple[str, str], Mapping[int, float]]


def grid_cell(strategy: str) -> tuple[str, str] | None:
    """(method as written, aggregation) of a grid strategy; None for others (flora, ffa).

    Single names count as FedIT's: ``flexlora`` is FedIT + FlexLoRA, ``fedit-min`` FedIT at a
    homogeneous rank, ``slora`` SLoRA at a homogeneous rank.
    """
    try:
        plan = parse_strategy(strategy)
    except UsageError:
        return None
    canonical = plan.canonical
    if "+" not in canonical:
        return None
    method, _, aggregation = canonical.partition("+")
    if aggregation not in _ROWS:
        return None
    written = strategy.partition("+")[0] if "+" in strategy else method
    return (written if written in GRID_METHODS else method), aggregation


def _cells(strategies: Sequence[str]) -> dict[tuple[str, str], str]:
    cells: dict[tuple[str, str], str] = {}
    for s in strategies:
        cell = grid_cell(s)
        if cell is not None and cell not in cells:
            cells[cell] = s
    return cells


def _pvalue(p: float, n: int) -> str:
    if n < 2 or math.isnan(p):
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def paper_grid_section(
    finals: Finals, strategies: Sequence[str], distributions: Sequence[str]
) -> list[str]:
    """Markdown lines of the three tables; empty unless two grid rows are present."""
    cells = _cells(strategies)
    if len(cells) < 2:
        return []
    methods = [m for m in GRID_METHODS if any((m, a) in cells for a in _ROWS)]
    lines = [
        "",
        "## The paper's grid (Table 2's form): final score, mean ± 95 % CI over seeds",
        "",
    ]
    body = []
    for m in methods:
        for a, label in _ROWS.items():
            s = cells.get((m, a))
            if s is not None:
                scores = [mean_ci(list(finals.get((s, d), {}).values())) for d in distributions]
                body.append([f"{GRID_METHODS[m]} {label}", *(e.format() for e in scores)])
    lines += markdown_table(["method", *distributions], body)

    def compare(m: str, against: str) -> tuple[list[str], list[str]] | None:
        flex, other = cells.get((m, "flexlora")), cells.get((m, against))
        if flex is None or other is None:
            return None
        gains, pvals = [], []
        for d in distributions:
            a, b = finals.get((flex, d), {}), finals.get((other, d), {})
            ma, mb = mean_ci(list(a.values())), mean_ci(list(b.values()))
            _est, wins = paired_diff(a, b)
            n = len(set(a) & set(b))
            if ma.n and mb.n and mb.mean != 0:
                gains.append(f"{100 * (ma.mean - mb.mean) / abs(mb.mean):+.1f} % ({wins}/{n})")
            else:
                gains.append("—")
            _t, p, n = paired_t_test(a, b)
            pvals.append(_pvalue(p, n))
        return gains, pvals

    for against, title in (("homogeneous", "its homogeneous-rank form"), ("hetlora", "+ HetLoRA")):
        results = {m: compare(m, against) for m in methods}
        results = {m: r for m, r in results.items() if r is not None}
        if not results:
            continue
        lines += [
            "",
            f"Improvement from FlexLoRA over {title} (Table 3's form): 100·(mean with FlexLoRA "
            "− mean without) / mean without, per distribution (seeds won / seeds compared).",
            "",
        ]
        lines += markdown_table(
            ["method", *distributions], [[GRID_METHODS[m], *g] for m, (g, _) in results.items()]
        )
        lines += [
            "",
            f"Paired two-sided t-test over seeds, + FlexLoRA vs {title} (Table 11's form): "
            "p-values.",
            "",
        ]
        lines += markdown_table(
            ["method", *distributions], [[GRID_METHODS[m], *p] for m, (_, p) in results.items()]
        )
    return lines
