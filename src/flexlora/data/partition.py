"""Seeded subsampling, train/eval/test splitting and client partitioners (pure functions).

Every random choice draws from :func:`rng_for` keyed on ``(seed, purpose, name)``, so a task's
split does not depend on which other tasks are loaded, and a different seed gives a different
split.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from flexlora.data.types import ClientSplit, Example
from flexlora.errors import UsageError

__all__ = [
    "category_entropy",
    "dirichlet_partition",
    "meta_partition",
    "rng_for",
    "select_unseen",
    "shard",
    "split_examples",
    "split_sizes",
    "subsample_indices",
]


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """A generator determined by ``seed`` and ``keys`` (stable across runs and processes)."""
    digest = hashlib.blake2b(repr((int(seed), *keys)).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def subsample_indices(n: int, fraction: float, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the examples to keep: ``round(fraction·n)`` (at least 1), then ``cap``."""
    k = n if fraction >= 1 else max(1, _round(fraction * n))
    if cap:
        k = min(k, cap)
    if k >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


def split_sizes(n: int, ratios: Sequence[float]) -> tuple[int, int, int]:
    """(train, eval, test) counts of ``n`` examples; eval and test get at least one each when
    their share is positive and ``n`` is large enough for all three."""
    _, r_eval, r_test = ratios
    n_eval, n_test = _round(n * r_eval), _round(n * r_test)
    if n >= 3:
        n_eval = max(n_eval, 1) if r_eval > 0 else 0
        n_test = max(n_test, 1) if r_test > 0 else 0
    while n_eval + n_test >= n and n_eval + n_test > 0:  # train keeps at least one
        if n_eval >= n_test:
            n_eval -= 1
        else:
            n_test -= 1
    return n - n_eval - n_test, n_eval, n_test


def split_examples(
    examples: Sequence[Example],
    ratios: Sequence[float],
    rng: np.random.Generator,
    *,
    max_train: int = 0,
    max_test: int = 0,
    keep_train: bool = True,
) -> ClientSplit:
    """Shuffle and cut into train / eval / test; caps apply after the cut (0 = none).

    ``keep_train=False`` (an unseen client) drops the train part but keeps exactly the eval /
    test examples a seen client with the same data would have.
    """
    n_train, n_eval, _ = split_sizes(len(examples), ratios)
    order = rng.permutation(len(examples))
    shuffled = [examples[i] for i in order]
    train = shuffled[:n_train] if keep_train else []
    eval_ = shuffled[n_train : n_train + n_eval]
    test = shuffled[n_train + n_eval :]
    if max_train:
        train = train[:max_train]
    if max_test:
        eval_, test = eval_[:max_test], test[:max_test]
    return ClientSplit(tuple(train), tuple(eval_), tuple(test))


def shard(examples: Sequence[Example], k: int, rng: np.random.Generator) -> list[list[Example]]:
    """Shuffle and cut into ``min(k, n)`` near-equal non-empty shards."""
    order = rng.permutation(len(examples))
    parts = np.array_split(order, min(k, len(examples)))
    return [[examples[i] for i in part] for part in parts]


def select_unseen(units: Sequence[str], fraction: float, rng: np.random.Generator) -> set[str]:
    """A seeded ``round(fraction·n)`` of ``units``: at least 1 when fraction > 0, at most n-1."""
    n = len(units)
    k = _round(fraction * n)
    if fraction > 0:
        k = max(k, 1)
    k = min(k, max(n - 1, 0))
    order = rng.permutation(n)
    ordered = sorted(units)
    return {ordered[i] for i in order[:k]}


def meta_partition(categories: Sequence[str]) -> dict[str, list[int]]:
    """One client per category: category -> indices (categories sorted)."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        groups.setdefault(c, []).append(i)
    return {c: groups[c] for c in sorted(groups)}


def dirichlet_partition(
    categories: Sequence[str], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Category-skewed clients of near-equal size (Hsu et al. 2019's Dirichlet split).

    Client i draws category proportions ``q_i ~ Dir(alpha·C·p)``, where ``p`` is the global
    category share and C the number of categories (so balanced categories give
    ``Dir(alpha, ..., alpha)``), then takes its ``N / num_clients`` examples by ``q_i`` without
    replacement, moving to the categories still available when one runs out. Small ``alpha``:
    each client sees one or two categories; large ``alpha``: every client looks like the whole.
    """
    n = len(categories)
    if n < num_clients:
        raise UsageError(f"{n} examples cannot fill {num_clients} clients")
    names = sorted(set(categories))
    index = {c: j for j, c in enumerate(names)}
    labels = np.fromiter((index[c] for c in categories), dtype=np.int64, count=n)
    pools = [rng.permutation(np.flatnonzero(labels == j)) for j in range(len(names))]
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    concentration = alpha * len(names) * remaining / n
    taken = np.zeros(len(names), dtype=np.int64)
    sizes = [n // num_clients + (i < n % num_clients) for i in range(num_clients)]
    clients = []
    for size in sizes:
        q = rng.dirichlet(concentration)
        if not (np.all(np.isfinite(q)) and q.sum() > 0):  # underflow at tiny alpha
            q = np.eye(len(names))[rng.choice(len(names), p=concentration / concentration.sum())]
        counts = _draw_counts(size, q, remaining, rng)
        clients.append(
            np.concatenate([pools[j][taken[j] : taken[j] + counts[j]] for j in range(len(names))])
        )
        taken += counts
        remaining -= counts
    return clients


def _draw_counts(
    size: int, q: np.ndarray, remaining: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``size`` draws by proportions ``q`` capped by ``remaining``; the shortfall is redrawn
    over the categories that still have examples (each pass adds at least one)."""
    counts = np.minimum(rng.multinomial(size, q / q.sum()), remaining)
    while (deficit := size - int(counts.sum())) > 0:
        avail = remaining - counts
        w = np.where(avail > 0, q, 0.0)
        if w.sum() <= 0:
            w = (avail > 0).astype(np.float64)
        counts += np.minimum(rng.multinomial(deficit, w / w.sum()), avail)
    return counts


def category_entropy(examples: Iterable[Example]) -> float:
    """Shannon entropy (bits) of the category distribution of ``examples`` (0 when empty)."""
    counts = np.array(list(Counter(e.category for e in examples).values()), dtype=np.float64)
    if counts.sum() == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())
