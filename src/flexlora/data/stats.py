"""Summary numbers of a federated dataset (what ``flexlora data stats`` prints)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from flexlora.data.partition import category_entropy
from flexlora.data.types import FederatedDataset

__all__ = ["DatasetStats", "dataset_stats", "format_stats"]


def _spread(values: Sequence[int]) -> tuple[int, float, int]:
    return (min(values), statistics.median(values), max(values)) if values else (0, 0.0, 0)


@dataclass(frozen=True)
class DatasetStats:
    """Counts of clients and examples; ``(min, median, max)`` triples over clients."""

    name: str
    clients: int
    seen: int
    unseen: int
    tasks: int
    train: int
    eval: int
    test: int
    per_client: tuple[int, float, int]
    train_per_seen: tuple[int, float, int]
    test_per_client: tuple[int, float, int]
    categories: dict[str, int]
    mean_category_entropy: float


def dataset_stats(data: FederatedDataset) -> DatasetStats:
    """Walk every client once."""
    splits = [data.split(c) for c in data.clients]
    categories: Counter[str] = Counter()
    tasks: set[str] = set()
    entropies = []
    for s in splits:
        examples = [*s.train, *s.eval, *s.test]
        categories.update(e.category for e in examples)
        tasks.update(e.task for e in examples if e.task)
        entropies.append(category_entropy(examples))
    return DatasetStats(
        name=data.name,
        clients=len(data.clients),
        seen=len(data.seen),
        unseen=len(data.unseen),
        tasks=len(tasks),
        train=sum(len(s.train) for s in splits),
        eval=sum(len(s.eval) for s in splits),
        test=sum(len(s.test) for s in splits),
        per_client=_spread([len(s) for s in splits]),
        train_per_seen=_spread([len(data.train(c)) for c in data.seen]),
        test_per_client=_spread([len(s.test) for s in splits]),
        categories=dict(categories.most_common()),
        mean_category_entropy=statistics.fmean(entropies) if entropies else 0.0,
    )


def format_stats(s: DatasetStats, top: int = 12) -> str:
    """A short human-readable report."""

    def spread(t: tuple[int, float, int]) -> str:
        return f"{t[0]:,} / {t[1]:,g} / {t[2]:,}"

    lines = [
        f"source: {s.name}",
        f"clients: {s.clients:,} (seen {s.seen:,}, unseen {s.unseen:,}); tasks: {s.tasks:,}",
        f"examples kept: {s.train + s.eval + s.test:,} "
        f"(train {s.train:,}, eval {s.eval:,}, test {s.test:,}; unseen clients have no train)",
        f"examples per client (min / median / max): {spread(s.per_client)}",
        f"train examples per seen client (min / median / max): {spread(s.train_per_seen)}",
        f"test examples per client (min / median / max): {spread(s.test_per_client)}",
        f"mean per-client category entropy: {s.mean_category_entropy:.3f} bits",
        f"categories: {len(s.categories)}",
    ]
    for name, n in list(s.categories.items())[:top]:
        lines.append(f"  {name}: {n:,}")
    if len(s.categories) > top:
        lines.append(f"  ... {len(s.categories) - top} more")
    return "\n".join(lines)
