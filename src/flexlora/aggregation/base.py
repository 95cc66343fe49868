"""The aggregator protocol, its registry and the checks every strategy shares.

An aggregator turns the round's client updates into a :class:`~flexlora.types.GlobalUpdate`.
It is pure: no model, no network, no file. Strategies differ in three declared traits that
the drivers (simulator, Flower) read instead of special-casing names:

- ``freeze_lora_A``: clients train only B (FFA-LoRA);
- ``merges_into_base``: clients add the global ΔW to their frozen weights and start a fresh
  adapter each round (FLoRA), instead of starting from the global factors;
- ``needs_uniform_rank``: every client must use one rank per module (FedIT);
- ``reads_previous``: :meth:`Aggregator.aggregate` needs the previous global state (FFA-LoRA's
  frozen A lives there);
- ``keeps_local_B``: each client keeps its own B across rounds and starts from the global A
  and that B (FedSA-LoRA; see :mod:`flexlora.client_state`).

Before aggregating, the drivers call :meth:`Aggregator.check` on each valid update: a strategy
that cannot use one client's reply rejects that client (by name and reason) and the round goes
on with the others, as validation failures do.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from flexlora.errors import InvalidUpdateError, UsageError
from flexlora.types import ClientUpdate, GlobalUpdate, ModuleDelta

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "check_updates",
    "get_aggregator",
    "normalize_weights",
    "register",
]

AGGREGATORS: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: add a strategy to the registry under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not name or name in AGGREGATORS:
        raise ValueError(f"aggregator name {name!r} is empty or already registered")
    AGGREGATORS[name] = cls
    return cls


def get_aggregator(name: str, **options: Any) -> Aggregator:
    """Build the strategy registered as ``name`` with its options."""
    try:
        cls = AGGREGATORS[name]
    except KeyError:
        raise UsageError(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(AGGREGATORS))}"
        ) from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise UsageError(f"strategy {name!r}: {exc}") from None


def normalize_weights(
    updates: Sequence[ClientUpdate], weights: Sequence[float] | None
) -> list[float]:
    """p_i ∝ the given weights (default: each client's example count), summing to 1."""
    raw = (
        [float(u.num_examples) for u in updates] if weights is None else [float(w) for w in weights]
    )
    if len(raw) != len(updates):
        raise UsageError(f"{len(raw)} weights for {len(updates)} client updates")
    for u, w in zip(updates, raw, strict=True):
        if not (math.isfinite(w) and w > 0):
            raise InvalidUpdateError(u.client_id, None, "weight", f"weight must be > 0, got {w}")
    total = math.fsum(raw)
    return [w / total for w in raw]


def majority_shapes(
    updates: Sequence[ClientUpdate], modules: Iterable[str]
) -> dict[str, tuple[tuple[int, int], str]]:
    """Per module, the (m, n) most clients agree on (the first seen on a tie) and one such client.

    A shape error then blames the odd client out rather than whoever happened to come first.
    """
    out: dict[str, tuple[tuple[int, int], str]] = {}
    for name in modules:
        votes = Counter(u.factors[name].shape for u in updates if name in u.factors)
        shape = votes.most_common(1)[0][0]
        witness = next(
            u.client_id for u in updates if name in u.factors and u.factors[name].shape == shape
        )
        out[name] = (shape, witness)
    return out


def check_updates(updates: Sequence[ClientUpdate]) -> dict[str, tuple[int, int]]:
    """Check that the updates can be aggregated together; return each module's (m, n).

    Raises :class:`InvalidUpdateError` naming the client and module for an empty round, a
    module one client has and another lacks, shapes that disagree, non-float or non-finite
    values.
    """
    if not updates:
        raise InvalidUpdateError(None, None, "empty", "no client updates to aggregate")
    seen_ids: set[str] = set()
    for u in updates:
        if u.client_id in seen_ids:
            raise InvalidUpdateError(u.client_id, None, "duplicate", "client sent two updates")
        seen_ids.add(u.client_id)
    all_modules: dict[str, str] = {}
    for u in updates:
        if not u.factors:
            raise InvalidUpdateError(u.client_id, None, "empty", "update has no modules")
        for name in u.factors:
            all_modules.setdefault(name, u.client_id)
    shapes = majority_shapes(updates, all_modules)
    for u in updates:
        for name, owner in all_modules.items():
            f = u.factors.get(name)
            if f is None:
                raise InvalidUpdateError(
                    u.client_id,
                    name,
                    "missing_module",
                    f"module is missing here but client {owner} sent it",
                )
            for label, t in (("A", f.A), ("B", f.B)):
                if not t.dtype.is_floating_point:
                    raise InvalidUpdateError(
                        u.client_id, name, "dtype", f"lora_{label} has dtype {t.dtype}, not float"
                    )
                if not bool(torch.isfinite(t).all()):
                    raise InvalidUpdateError(
                        u.client_id, name, "nonfinite", f"lora_{label} holds NaN or Inf values"
                    )
            expected, witness = shapes[name]
            if f.shape != expected:
                raise InvalidUpdateError(
                    u.client_id,
                    name,
                    "shape",
                    f"adapts a {f.shape[0]}x{f.shape[1]} weight (B {tuple(f.B.shape)}, A "
                    f"{tuple(f.A.shape)}) but client {witness} adapts {expected[0]}x{expected[1]}",
                )
    return {name: shape for name, (shape, _) in shapes.items()}


class Aggregator(ABC):
    """One federated aggregation strategy for LoRA factors."""

    name: ClassVar[str] = ""
    freeze_lora_A: ClassVar[bool] = False
    merges_into_base: ClassVar[bool] = False
    needs_uniform_rank: ClassVar[bool] = False
    reads_previous: ClassVar[bool] = False
    keeps_local_B: ClassVar[bool] = False

    def __init__(self, dtype: torch.dtype | str = torch.float32) -> None:
        self.dtype = _as_dtype(dtype)

    def check(self, update: ClientUpdate, state: GlobalUpdate | None) -> None:
        """Raise :class:`InvalidUpdateError` if this strategy cannot use ``update``.

        ``state`` is the global state the client started from. Called per client before
        aggregation, so one unusable reply drops that client only. Default: accept.
        """
        return None

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float] | None = None,
        previous: GlobalUpdate | None = None,
    ) -> GlobalUpdate:
        """The new global update from this round's client updates.

        ``weights`` default to the clients' example counts; they are normalised to sum to 1.
        ``previous`` is the last global update (only strategies that accumulate use it).
        Nothing is modified in place: on error, the caller's state is untouched.
        """
        updates = list(updates)
        shapes = check_updates(updates)
        p = self.client_weights(updates, normalize_weights(updates, weights))
        modules = {name: self.aggregate_module(name, updates, p, previous) for name in shapes}
        return GlobalUpdate(modules=modules, strategy=self.name)

    def client_weights(self, updates: Sequence[ClientUpdate], p: list[float]) -> list[float]:
        """The per-client weights the modules are aggregated with (default: ``p`` itself)."""
        return p

    @abstractmethod
    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> ModuleDelta:
        """Aggregate one module; ``p`` are the normalised weights."""

    def initial_state(
        self,
        shapes: Mapping[str, tuple[int, int]],
        max_ranks: Mapping[str, int],
        generator: torch.Generator,
    ) -> GlobalUpdate:
        """The round-0 global state every client starts from: ΔW = 0 with a shared A.

        A is drawn like PEFT's default LoRA init (uniform in ±1/sqrt(n)) at the largest rank
        and B is zero, so every client, whatever its rank, starts from the same adapter
        prefix and the same (zero) update.
        """
        modules: dict[str, ModuleDelta] = {}
        for name, (m, n) in shapes.items():
            r = int(max_ranks[name])
            bound = 1.0 / math.sqrt(n)
            A0 = (torch.rand(r, n, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            modules[name] = ModuleDelta(
                U=torch.zeros(m, r, dtype=self.dtype),  # (m, r): B = 0
                S=torch.ones(r, dtype=self.dtype),
                Vh=A0.to(self.dtype),  # (r, n)
                truncation="prefix",
            )
        return GlobalUpdate(modules=modules, strategy=self.name)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64}
    if dtype not in table:
        raise UsageError(f"aggregation dtype must be float32 or float64, got {dtype!r}")
    return table[dtype]


def pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad a (m, r) tensor to (m, width)."""
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


def pad_rows(t: torch.Tensor, height: int) -> torch.Tensor:
    """Zero-pad a (r, n) tensor to (height, n)."""
    return torch.nn.functional.pad(t, (0, 0, 0, height - t.shape[0]))
