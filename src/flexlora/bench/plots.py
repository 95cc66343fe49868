"""The bench's figures: Rouge-L by round (one panel per distribution), the final Rouge-L as
grouped bars, and the paired gain over the reference strategy; each with 95 % Student-t
intervals over seeds and, on the bars, every seed's own value as a dot."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from flexlora.bench.stats import mean_ci

__all__ = ["plot_final", "plot_gain", "plot_rounds"]

LABELS = {"rouge_l_unseen": "Rouge-L, unseen tasks (zero-shot)", "rouge_l_seen": "Rouge-L, seen"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(strategies: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {s: cycle[i % len(cycle)] for i, s in enumerate(strategies)}


def _legend_below(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    rows = math.ceil(len(labels) / 4) if handles else 0
    fig.tight_layout(rect=(0, 0.07 * rows, 1, 1))


def plot_rounds(
    rows: Sequence[Mapping[str, Any]],
    strategies: Sequence[str],
    distributions: Sequence[str],
    metric: str,
    path: Path,
) -> Path:
    """One panel per distribution; per strategy the mean over seeds by round, CI as a band."""
    plt = _pyplot()
    colors = _colors(strategies)
    fig, axes = plt.subplots(
        1, len(distributions), figsize=(4.2 * len(distributions), 3.6), sharey=True, squeeze=False
    )
    for ax, dist in zip(axes[0], distributions, strict=True):
        for s in strategies:
            by_round: dict[int, list[float]] = {}
            for r in rows:
                if r["strategy"] == s and r["distribution"] == dist and r.get(metric) is not None:
                    by_round.setdefault(int(r["round"]), []).append(float(r[metric]))
            if not by_round:
                continue
            rounds = sorted(by_round)
            est = [mean_ci(by_round[x]) for x in rounds]
            mean = [e.mean for e in est]
            half = [0.0 if math.isnan(e.half_width) else e.half_width for e in est]
            ax.plot(rounds, mean, marker="o", color=colors[s], label=s)
            ax.fill_between(
                rounds,
                [m - h for m, h in zip(mean, half, strict=True)],
                [m + h for m, h in zip(mean, half, strict=True)],
                color=colors[s],
                alpha=0.15,
                linewidth=0,
            )
        ax.set_title(dist)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(LABELS.get(metric, metric))
    _legend_below(fig, axes[0][0])
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _grouped_bars(
    ax: Any,
    values: Mapping[tuple[str, str], Mapping[int, float]],
    strategies: Sequence[str],
    distributions: Sequence[str],
    colors: Mapping[str, Any],
) -> None:
    """Bars of the mean over seeds with CI error bars, and each seed's value as a dot."""
    width = 0.8 / len(strategies)
    for i, s in enumerate(strategies):
        est = [mean_ci(list(values.get((s, d), {}).values())) for d in distributions]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(distributions))]
        ax.bar(
            xs,
            [0.0 if math.isnan(e.mean) else e.mean for e in est],
            width,
            yerr=[0.0 if math.isnan(e.half_width) else e.half_width for e in est],
            capsize=3,
            color=colors[s],
            label=s,
        )
        for j, (x, d) in enumerate(zip(xs, distributions, strict=True)):
            seeds = list(values.get((s, d), {}).values())
            label = "one seed" if i == 0 and j == 0 else None
            ax.scatter([x] * len(seeds), seeds, s=12, color="black", zorder=3, label=label)
    ax.set_xticks(range(len(distributions)), list(distributions))
    ax.grid(axis="y", alpha=0.3)


def _bar_figure(n_bars: int) -> tuple[Any, Any]:
    return _pyplot().subplots(figsize=(max(6.5, 1.2 + 0.45 * n_bars), 3.8))


def plot_final(
    finals: Mapping[tuple[str, str], Mapping[int, float]],
    strategies: Sequence[str],
    distributions: Sequence[str],
    metric: str,
    path: Path,
    base: Mapping[int, float] | None = None,
) -> Path:
    """Grouped bars: x = distribution, one bar per strategy, 95 % CI error bars over seeds."""
    plt = _pyplot()
    fig, ax = _bar_figure(len(strategies) * len(distributions))
    _grouped_bars(ax, finals, strategies, distributions, _colors(strategies))
    if base:
        ax.axhline(
            mean_ci(list(base.values())).mean,
            color="black",
            linestyle="--",
            linewidth=1,
            label="base model (round 0)",
        )
    ax.set_ylabel(f"final {LABELS.get(metric, metric)}")
    _legend_below(fig, ax)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_gain(
    finals: Mapping[tuple[str, str], Mapping[int, float]],
    strategies: Sequence[str],
    distributions: Sequence[str],
    reference: str,
    path: Path,
) -> Path:
    """Per strategy and distribution, the per-seed difference to ``reference`` (paired by
    seed): its mean with a 95 % CI, and every seed's difference as a dot."""
    plt = _pyplot()
    others = [s for s in strategies if s != reference]
    gains: dict[tuple[str, str], dict[int, float]] = {}
    for s in others:
        for d in distributions:
            ref, own = finals.get((reference, d), {}), finals.get((s, d), {})
            gains[s, d] = {x: own[x] - ref[x] for x in own if x in ref}
    fig, ax = _bar_figure(len(others) * len(distributions))
    _grouped_bars(ax, gains, others, distributions, _colors(strategies))
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_ylabel(f"final Rouge-L minus {reference}'s")
    _legend_below(fig, ax)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
