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

Replies are folded one at a time (:meth:`Aggregator.start` -> :class:`Accumulator`): see
:class:`ModuleAccumulator` for how a strategy implements the streaming protocol.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from flexlora.aggregation.parallel import map_modules, one_blas_thread
from flexlora.errors import InvalidUpdateError, UsageError
from flexlora.lora.finite import all_finite
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors, ModuleDelta

__all__ = [
    "AGGREGATORS",
    "Accumulator",
    "Aggregator",
    "BufferedAccumulator",
    "ModuleAccumulator",
    "check_updates",
    "get_aggregator",
    "normalize_weights",
    "register",
    "resolve_device",
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
                if not all_finite(t):
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


def check_factors(cid: str, module: str, f: object, shape: tuple[int, int]) -> None:
    """One module of one reply fits the round: LoRA factors of ``shape``, float and finite."""
    if not isinstance(f, LoRAFactors):
        raise InvalidUpdateError(cid, module, "type", f"expected LoRAFactors, got {type(f)}")
    for label, t in (("A", f.A), ("B", f.B)):
        if not t.dtype.is_floating_point:
            raise InvalidUpdateError(
                cid, module, "dtype", f"lora_{label} has dtype {t.dtype}, not float"
            )
        if not all_finite(t):
            raise InvalidUpdateError(
                cid, module, "nonfinite", f"lora_{label} holds NaN or Inf values"
            )
    if f.shape != tuple(shape):
        raise InvalidUpdateError(
            cid,
            module,
            "shape",
            f"adapts a {f.shape[0]}x{f.shape[1]} weight (B {tuple(f.B.shape)}, A "
            f"{tuple(f.A.shape)}) but the round adapts {shape[0]}x{shape[1]}",
        )


def check_weight(cid: str, weight: float) -> float:
    """A client's raw aggregation weight: a finite number > 0."""
    w = float(weight)
    if not (math.isfinite(w) and w > 0):
        raise InvalidUpdateError(cid, None, "weight", f"weight must be > 0, got {weight}")
    return w


class ModuleAccumulator(ABC):
    """One module's aggregation in progress: what a strategy keeps of the replies folded so far.

    The streaming protocol (fedjax's init / apply, Flower's ``aggregate_inplace``), per module:

    1. :meth:`Aggregator.start_module` builds it (``init``), holding nothing client-sized;
    2. :meth:`check` looks at one client's factors and raises
       :class:`~flexlora.errors.InvalidUpdateError` for a strategy-level rejection (FedIT's
       mixed ranks, FFA-LoRA's moved A). It must change nothing;
    3. :meth:`fold` adds them with the client's *raw* weight ``w_i`` (an example count, or the
       ``--client DIR:W`` weight): p_i = w_i / Σ w_j is known only at the end, so a strategy
       accumulates unnormalised sums and divides once in :meth:`result`. After ``fold`` the
       caller may drop the factors: an accumulator copies what it keeps;
    4. :meth:`result` (``finalize``) gets ``total_weight = Σ w_j`` and returns the module's
       :class:`~flexlora.types.ModuleDelta` (on any device; :class:`Accumulator` moves it to
       the CPU); then :meth:`frozen` gives the module's frozen part, if the strategy has one.

    What an accumulator holds must not grow with the number of clients: a running sum, or
    stacks only while they are smaller than the module's m×n (FlexLoRA's and FLoRA's
    :class:`~flexlora.aggregation.flexlora.FlexLoRAModule`). Say in the subclass docstring
    what it holds. The tensors it keeps are in ``dtype`` on ``device``.
    """

    def __init__(
        self, module: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.module = module
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.device = device

    def check(self, client_id: str, f: LoRAFactors) -> None:  # noqa: B027 - optional hook
        """Raise ``InvalidUpdateError`` if the strategy refuses these factors (no state change)."""

    @abstractmethod
    def fold(self, client_id: str, f: LoRAFactors, weight: float) -> None:
        """Add one client's factors with raw weight ``weight`` (checked before)."""

    @abstractmethod
    def result(self, total_weight: float) -> ModuleDelta:
        """The module's global update; ``total_weight`` is the sum of the folded weights."""

    def frozen(self) -> ModuleDelta | None:
        """The module's frozen part (:attr:`GlobalUpdate.frozen`, FedEx-LoRA's residual), asked
        for after :meth:`result`; ``None`` (the default): the strategy has none."""
        return None

    def work(self) -> float:
        """A relative estimate of :meth:`result`'s cost, to schedule the costliest modules
        first; the default, m·n, suits a strategy whose result is a pass over the module."""
        return float(self.shape[0] * self.shape[1])

    def tensors(self) -> list[Tensor]:
        """The tensors this accumulator holds now (to report its memory)."""
        held = [v for v in vars(self).values() if isinstance(v, Tensor)]
        for v in vars(self).values():
            if isinstance(v, list):
                held += [t for t in v if isinstance(t, Tensor)]
        return held

    def num_bytes(self) -> int:
        """Bytes held by :meth:`tensors`."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def load(self, f: LoRAFactors) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of ``f`` in this accumulator's dtype and device (copies only if needed)."""
        return (
            f.A.to(device=self.device, dtype=self.dtype),  # (r, n)
            f.B.to(device=self.device, dtype=self.dtype),  # (m, r)
        )


class Accumulator:
    """A round's aggregation in progress: one :class:`ModuleAccumulator` per module.

    ``add(update, weight)`` folds one reply as it arrives and the caller drops it; memory is
    the module accumulators' (bounded by the adapted weights for the streaming strategies),
    never the list of replies. A reply is checked whole before any module is folded (shape,
    dtype, finite values, a module missing or extra, a client seen twice, then every module's
    strategy-level :meth:`~ModuleAccumulator.check`), so a rejected reply raises
    :class:`~flexlora.errors.InvalidUpdateError` and leaves the accumulator exactly as it was:
    the caller records the rejection and goes on with the next reply.
    """

    def __init__(
        self,
        strategy: str,
        shapes: Mapping[str, tuple[int, int]],
        modules: Mapping[str, ModuleAccumulator],
    ) -> None:
        self.strategy = strategy
        self.shapes = {name: (int(m), int(n)) for name, (m, n) in shapes.items()}
        self.modules = dict(modules)
        self.device = next((acc.device for acc in self.modules.values()), torch.device("cpu"))
        self.clients: list[str] = []
        self.total_weight = 0.0

    def add(self, update: ClientUpdate, weight: float | None = None) -> None:
        """Fold one client's reply with raw weight ``weight`` (default: its example count)."""
        if not isinstance(update, ClientUpdate):
            raise InvalidUpdateError(None, None, "type", f"expected a ClientUpdate: {update!r}")
        cid = update.client_id
        w = check_weight(cid, update.num_examples if weight is None else weight)
        if cid in self.clients:
            raise InvalidUpdateError(cid, None, "duplicate", "client sent two updates")
        if not update.factors:
            raise InvalidUpdateError(cid, None, "empty", "update has no modules")
        for name in self.shapes:
            if name not in update.factors:
                raise InvalidUpdateError(cid, name, "missing_module", "module is missing")
        for name in update.factors:
            if name not in self.shapes:
                raise InvalidUpdateError(cid, name, "extra_module", "module is not adapted here")

        def check(name: str, shape: tuple[int, int]) -> None:
            check_factors(cid, name, update.factors[name], shape)
            if name in self.modules:
                self.modules[name].check(cid, update.factors[name])

        map_modules(check, self.shapes, self.device)  # the first bad module, in order, raises
        self.fold(update, w)
        self.clients.append(cid)
        self.total_weight += w

    def fold(self, update: ClientUpdate, weight: float) -> None:
        """Fold a checked reply into every module's accumulator (modules side by side)."""
        map_modules(
            lambda name, acc: acc.fold(update.client_id, update.factors[name], weight),
            self.modules,
            self.device,
        )

    def result(self) -> GlobalUpdate:
        """The global update of everything folded, on the CPU.

        On the CPU the modules are decomposed on torch's threads side by side, one thread each
        and the costliest first (:func:`~flexlora.aggregation.parallel.map_modules`,
        :meth:`ModuleAccumulator.work`): the workspaces of that many modules are held at once.
        """
        if not self.clients:
            raise InvalidUpdateError(None, None, "empty", "no client updates to aggregate")
        with one_blas_thread(self.device):
            modules = map_modules(
                lambda _, acc: _to_cpu(acc.result(self.total_weight)),
                self.modules,
                self.device,
                cost=lambda acc: acc.work(),  # the strategy's own estimate
            )
        frozen = {name: acc.frozen() for name, acc in self.modules.items()}
        frozen_cpu = {name: _to_cpu(d) for name, d in frozen.items() if d is not None}
        return GlobalUpdate(modules=modules, strategy=self.strategy, frozen=frozen_cpu)

    def num_bytes(self) -> int:
        """Bytes the module accumulators hold now."""
        return sum(acc.num_bytes() for acc in self.modules.values())


class BufferedAccumulator(Accumulator):
    """For a strategy that implements only the batch form (:meth:`Aggregator.aggregate_module`,
    or its own :meth:`Aggregator.aggregate`): correct, but not streaming.

    Holds every added reply (checked as :class:`Accumulator` does) and their raw weights until
    :meth:`result`, which calls the strategy's ``aggregate``: memory grows with the clients.
    Port such a strategy to :meth:`Aggregator.start_module` to stream. Every registered
    strategy streams; this is for a strategy written against the batch form only.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        shapes: Mapping[str, tuple[int, int]],
        previous: GlobalUpdate | None,
    ) -> None:
        super().__init__(aggregator.name, shapes, {})
        self.aggregator = aggregator
        self.previous = previous
        self.updates: list[ClientUpdate] = []
        self.weights: list[float] = []

    def fold(self, update: ClientUpdate, weight: float) -> None:
        self.updates.append(update)
        self.weights.append(weight)

    def result(self) -> GlobalUpdate:
        if not self.updates:
            raise InvalidUpdateError(None, None, "empty", "no client updates to aggregate")
        return self.aggregator.aggregate(self.updates, self.weights, self.previous)

    def num_bytes(self) -> int:
        return sum(u.num_bytes() for u in self.updates)


def _to_cpu(d: ModuleDelta) -> ModuleDelta:
    if d.U.device.type == "cpu":
        return d
    return dataclasses.replace(d, U=d.U.cpu(), S=d.S.cpu(), Vh=d.Vh.cpu())


class Aggregator:
    """One federated aggregation strategy for LoRA factors.

    A strategy implements :meth:`start_module`, returning its :class:`ModuleAccumulator`
    (the streaming protocol, documented there); :meth:`start` and :meth:`aggregate` are built
    on it. A strategy that only implements the batch :meth:`aggregate_module` (or overrides
    :meth:`aggregate`) still works: :meth:`start` then returns a
    :class:`BufferedAccumulator`, which holds the round's replies until the end.

    ``device`` is where the server step computes (``federation.server_device``); results are
    always handed back on the CPU.
    """

    name: ClassVar[str] = ""
    freeze_lora_A: ClassVar[bool] = False
    merges_into_base: ClassVar[bool] = False
    needs_uniform_rank: ClassVar[bool] = False
    reads_previous: ClassVar[bool] = False
    keeps_local_B: ClassVar[bool] = False

    def __init__(
        self, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        self.dtype = _as_dtype(dtype)
        self.device = resolve_device(device)

    def start(
        self, shapes: Mapping[str, tuple[int, int]], previous: GlobalUpdate | None = None
    ) -> Accumulator:
        """An empty round over modules ``shapes`` (name -> (m, n)); fold replies with ``add``.

        ``previous`` is the last global update (only strategies that accumulate use it).
        """
        if not self.streams:
            return BufferedAccumulator(self, shapes, previous)
        modules = {name: self.start_module(name, shape, previous) for name, shape in shapes.items()}
        return Accumulator(self.name, shapes, modules)

    @property
    def streams(self) -> bool:
        """Whether this strategy folds replies as they come (it implements start_module)."""
        return type(self).start_module is not Aggregator.start_module

    def check(self, update: ClientUpdate, state: GlobalUpdate | None) -> None:
        """Raise :class:`InvalidUpdateError` if this strategy cannot use ``update``.

        ``state`` is the global state the client started from. Called per client before
        aggregation, so one unusable reply drops that client only. Default: accept.
        """
        return None

    def start_module(
        self, module: str, shape: tuple[int, int], previous: GlobalUpdate | None
    ) -> ModuleAccumulator:
        """The accumulator of one module: what a streaming strategy implements."""
        raise NotImplementedError(f"{type(self).__name__} does not stream (no start_module)")

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float] | None = None,
        previous: GlobalUpdate | None = None,
    ) -> GlobalUpdate:
        """The new global update from this round's client updates (all at hand).

        ``weights`` default to the clients' example counts; they are normalised to sum to 1.
        ``previous`` is the last global update (only strategies that accumulate use it).
        Nothing is modified in place: on error, the caller's state is untouched. The updates
        are checked together first (so a shape error blames the odd client out), then folded
        one by one through :meth:`start`: the same path as a streaming server.
        """
        updates = list(updates)
        shapes = check_updates(updates)
        p = normalize_weights(updates, weights)  # also checks their count and signs
        if not self.streams:
            p = self.client_weights(updates, p)
            modules = {name: self.aggregate_module(name, updates, p, previous) for name in shapes}
            return GlobalUpdate(modules=modules, strategy=self.name)
        raw = [u.num_examples for u in updates] if weights is None else list(weights)
        acc = self.start(shapes, previous)
        for u, w in zip(updates, raw, strict=True):
            acc.add(u, w)
        return acc.result()

    def client_weights(self, updates: Sequence[ClientUpdate], p: list[float]) -> list[float]:
        """Batch form: the per-client weights the modules are aggregated with (default ``p``)."""
        return p

    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> ModuleDelta:
        """Batch form: aggregate one module; ``p`` are the normalised weights.

        Only used by strategies without :meth:`start_module`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} implements neither start_module nor aggregate_module"
        )

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


def resolve_device(device: torch.device | str) -> torch.device:
    """``cpu``, ``cuda`` (an error without a GPU), ``cuda:N`` or ``auto`` (CUDA when present)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"server device must be cpu, cuda or auto, got {device!r}") from None
    if out.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"server device {device!r}: torch sees no CUDA device")
    if out.type == "cuda" and out.index is not None and out.index >= torch.cuda.device_count():
        raise UsageError(
            f"server device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    if out.type not in ("cpu", "cuda"):
        raise UsageError(f"server device must be cpu, cuda or auto, got {device!r}")
    return out


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
