"""Who trains when, at which rank: client resource types and per-round client sampling.

Every random choice is keyed on the run's seed (and the round), never on global RNG state, so
every strategy sees the same clients and ranks, and a resumed run equals an uninterrupted one.
The simulator and the Flower server both call these functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from flexlora.errors import UsageError

__all__ = [
    "DISTRIBUTIONS",
    "assign_rank_types",
    "derive_seed",
    "module_ranks",
    "sample_clients",
]

#: Share of clients of each paper rank type (names of ``PAPER_RANK_TYPES``).
DISTRIBUTIONS: dict[str, dict[str, float]] = {
    "uniform": {"8": 0.25, "30": 0.25, "30-200": 0.25, "200": 0.25},
    "heavy-tail-light": {"8": 0.80, "200": 0.10, "30-200": 0.05, "30": 0.05},
    "heavy-tail-strong": {"200": 0.80, "30-200": 0.10, "30": 0.05, "8": 0.05},
    # "most clients in the middle types": a discretised bell over the four types ordered by size
    "normal": {"8": 0.10, "30": 0.40, "30-200": 0.40, "200": 0.10},
}


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of keys (seed, round, client, purpose), stable across runs."""
    words: list[int] = []
    for key in keys:
        if isinstance(key, str):
            words.extend(key.encode("utf-8"))
            words.append(0x1F)
        else:
            words.append(int(key) & 0xFFFFFFFF)
            words.append((int(key) >> 32) & 0xFFFFFFFF)
    return int(
        np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
        >> np.uint64(1)
    )


def _allocate(n: int, shares: Mapping[str, float]) -> list[str]:
    """Exactly n labels in the given proportions (largest remainder), in a fixed order."""
    total = sum(shares.values())
    exact = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(np.floor(x)) for k, x in exact.items()}
    left = n - sum(counts.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(shares).index(k)))[:left]:
        counts[k] += 1
    return [k for k in shares for _ in range(counts[k])]


def assign_rank_types(
    clients: Sequence[str],
    distribution: str,
    seed: int,
    rank_types: Mapping[str, Sequence[int]],
    explicit: Sequence[str] = (),
) -> dict[str, str]:
    """Each client's resource type, fixed for the whole run.

    Named distributions allocate the exact proportions over the population (largest
    remainder) and shuffle the allocation with ``seed``; ``explicit`` lists types in client
    order (cycled when shorter than the population).
    """
    if not clients:
        return {}
    if distribution == "explicit":
        if not explicit:
            raise UsageError("distribution 'explicit' needs federation.client_types")
        labels = [explicit[i % len(explicit)] for i in range(len(clients))]
    elif distribution in DISTRIBUTIONS:
        labels = _allocate(len(clients), DISTRIBUTIONS[distribution])
        rng = np.random.default_rng(derive_seed(seed, "rank-types"))
        labels = [labels[i] for i in rng.permutation(len(labels))]
    elif distribution in rank_types:
        labels = [distribution] * len(clients)
    else:
        known = ", ".join([*DISTRIBUTIONS, "explicit", *rank_types])
        raise UsageError(f"unknown distribution {distribution!r}; choose one of: {known}")
    for label in set(labels):
        if label not in rank_types:
            raise UsageError(
                f"rank type {label!r} is not defined in federation.rank_types "
                f"({', '.join(rank_types)})"
            )
    return dict(zip(clients, labels, strict=True))


def sample_clients(clients: Sequence[str], k: int, seed: int, round_: int) -> list[str]:
    """The round's clients: ``k`` drawn without replacement, keyed on (seed, round).

    Every client can be drawn (the reference implementation never sampled its last client).
    """
    if k >= len(clients):
        return list(clients)
    rng = np.random.default_rng(derive_seed(seed, round_, "sample"))
    picked = rng.choice(len(clients), size=k, replace=False)
    return [clients[i] for i in sorted(picked.tolist())]


def module_ranks(
    modules: Sequence[str],
    rank_type: Sequence[int],
    ffn_modules: Sequence[str],
) -> dict[str, int]:
    """Per-module rank for one resource type: FFN modules take the second rank.

    A module is feed-forward when its path is, or ends with ``"." +``, one of ``ffn_modules``
    (``up_proj`` matches ``model.layers.0.mlp.up_proj``; ``mlp.c_proj`` GPT-2's MLP output
    but not its attention's ``attn.c_proj``).
    """
    attention_rank, ffn_rank = int(rank_type[0]), int(rank_type[1])
    suffixes = tuple("." + f for f in ffn_modules)
    return {
        m: ffn_rank if m in ffn_modules or m.endswith(suffixes) else attention_rank for m in modules
    }


def unused_ffn_ranks(
    modules: Sequence[str], rank_types: Mapping[str, Sequence[int]], ffn_modules: Sequence[str]
) -> str | None:
    """Why the rank types' feed-forward ranks mean nothing here, or ``None``: some type gives
    feed-forward modules their own rank but no target matches ``ffn_modules`` (another
    architecture's names, e.g. ``w1`` / ``w2``, or default targets without the MLP)."""
    mixed = sorted(t for t, (attn, ffn) in rank_types.items() if attn != ffn)
    if not mixed or any(module_ranks(modules, [0, 1], ffn_modules).values()):
        return None
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return (
        f"rank types {mixed} give feed-forward modules their own rank, but no target module "
        f"{leaves} matches lora.ffn_modules {list(ffn_modules)}: every module takes the "
        "attention rank; name this model's feed-forward layers in lora.ffn_modules"
    )
