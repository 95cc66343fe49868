"""SLoRA (Babakniya et al., 2023): a sparse first stage, then LoRA initialised from its SVD.

The model-free half: masks, messages, the server's streaming average and the SVD
initialisation. The client half (training a sparse additive delta) is
:mod:`flexlora.training.sparse`; the round logic is the :class:`~flexlora.server.Coordinator`.

What the paper does as we read it (its abstract reports updates of ~1 % density), and what we
follow:

1. **Stage 1, federated sparse fine-tuning.** A random sparse mask of density d (≈ 1 %, a
   *random* mask fixed for the whole stage) selects the entries of the weights that clients
   train. Each round a client starts from the global sparse update, trains only the masked
   entries, and sends them; the server averages them, weighted by example counts (FedAvg
   over the masked entries). We run ``federation.slora_rounds`` such rounds.
2. **Initialisation.** ΔW = W_{T1} − W_0 (the accumulated sparse update) is decomposed by SVD
   and the LoRA factors start from its truncated SVD: a client of rank r starts from the best
   rank-r approximation of ΔW (B = U_r·S_r / s, A = Vh_r; the base stays W_0).
3. **Stage 2, federated LoRA** for the remaining rounds, with any aggregation: the paper's
   SLoRA uses one rank (FedAvg of A and B: ``slora+homogeneous``); FlexLoRA's Table 2 plugs
   FlexLoRA and HetLoRA into it (``slora+flexlora``, ``slora+hetlora``), each client then
   initialised *at its own rank* from the same SVD.

Where we choose:

- the paper's stage 1 fine-tunes the whole model sparsely; we sparsify only the weights that
  get LoRA adapters (``lora.target_modules``), so the SVD initialisation carries all of stage
  1 and the frozen rest of the model is never sent;
- the mask is keyed on ``(federation.seed, module)``: server and clients rebuild it from the
  seed, so a stage-1 message holds the **values only** (4 bytes per masked entry, counted so
  in ``bytes_up`` / ``bytes_down``); sending the int32 indices once would add 4·nnz bytes per
  module for a deployment that cannot trust both sides to rebuild it. The FlexLoRA reference
  code draws a fresh mask for every client and round instead;
- a density per rank type (``federation.slora_density`` as a table, or ``"paper"``: the
  FlexLoRA reference code's ``get_density``, 0.0012 / 0.0246 / 0.0822 / 0.1222 for the rank 8
  / 30 / 30-200 / 200 types) gives nested masks: one random draw per module at the largest
  density present, each type's mask the first round(d·m·n) entries of that draw (a uniformly
  random subset of its density), so the union is the densest type's mask. The global update
  lives on the union: every client is sent all of it (its model is the global model, as the
  reference code's clients load the whole global model), trains and sends back only its own
  type's entries; the server averages the clients' models (:class:`SparseAverage`): at an
  entry outside its mask a client counts the value it started from, with its full weight
  (the reference code's FedAvg of whole weights), not only the clients covering the entry;
- stage 1 uses the run's ``train`` settings (the paper tunes a separate learning rate);
- the rounds of stage 1 count within ``federation.rounds``;
- the SVD is dense and exact, one module at a time, once per run (``federation.svd =
  "randomized"`` uses ``torch.svd_lowrank`` on the sparse matrix instead, for large layers).

Memory: the server holds one sparse update (nnz values per module of the union mask), one
accumulator of the same size and the masks (int64 indices and int32 draw order per union
entry, plus each smaller type's int64 positions in the union), whatever the number of clients;
nothing dense is sent or kept per client.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flexlora.errors import InvalidUpdateError, UsageError
from flexlora.lora.finite import all_finite
from flexlora.schedule import derive_seed
from flexlora.types import GlobalUpdate, ModuleDelta

__all__ = [
    "SparseAverage",
    "SparseDelta",
    "SparseMask",
    "SparseState",
    "SparseUpdate",
    "make_masks",
    "mask_nnz",
    "sub_masks",
    "sub_positions",
    "svd_init",
    "validate_sparse",
]

STATE_KIND = "slora-sparse"


@dataclass(frozen=True)
class SparseMask:
    """Which entries of an (m, n) weight stage 1 trains: sorted flat indices, ``(nnz,)`` int64.

    ``priority`` (``(nnz,)`` int32, a permutation of ``0..nnz-1``, when the mask was drawn
    here) is each entry's place in the random draw: the entries of priority < k are a
    uniformly random k-subset, the mask of a smaller density (:meth:`sub`).
    """

    index: Tensor  # (nnz,) sorted, in [0, m*n)
    shape: tuple[int, int]
    priority: Tensor | None = None  # (nnz,) int32 (int64 beyond 2^31 entries)

    @property
    def nnz(self) -> int:
        return int(self.index.numel())

    @property
    def rows(self) -> Tensor:
        return self.index // self.shape[1]  # (nnz,)

    @property
    def cols(self) -> Tensor:
        return self.index % self.shape[1]  # (nnz,)

    def positions(self, nnz: int) -> Tensor:
        """Where the nested sub-mask of ``nnz`` entries sits in this one: ``(nnz,)`` ascending."""
        if self.priority is None:
            raise ValueError("this mask carries no draw order, so it has no nested sub-masks")
        if not 0 < nnz <= self.nnz:
            raise ValueError(f"a sub-mask of {nnz} entries in a mask of {self.nnz}")
        return torch.nonzero(self.priority < nnz).flatten()

    def sub(self, nnz: int) -> SparseMask:
        """The nested sub-mask of ``nnz`` entries (this mask itself when ``nnz`` is all)."""
        if nnz == self.nnz:
            return self
        pos = self.positions(nnz)
        assert self.priority is not None
        return SparseMask(self.index[pos], self.shape, self.priority[pos])


def mask_nnz(shape: tuple[int, int], density: float) -> int:
    """Entries a mask of ``density`` holds on an (m, n) weight: ``round(d·m·n)``, at least 1."""
    total = int(shape[0]) * int(shape[1])
    return min(total, max(1, round(density * total)))


def _mask(shape: tuple[int, int], density: float, generator: torch.Generator) -> SparseMask:
    """``round(density·m·n)`` distinct entries drawn uniformly, in O(nnz) memory.

    The draw's order is kept as the mask's ``priority``: any prefix of it is a uniformly
    random subset too, so the masks of smaller densities nest inside this one.
    """
    m, n = shape
    total = m * n
    nnz = mask_nnz(shape, density)
    if 2 * nnz >= total:  # dense enough: a permutation is cheap and exact
        idx = torch.randperm(total, generator=generator)[:nnz]
    else:
        picked = torch.empty(0, dtype=torch.int64)
        while picked.numel() < nnz:
            draw = torch.randint(0, total, (nnz + nnz // 4 + 16,), generator=generator)
            picked = torch.unique(torch.cat([picked, draw]))  # sorted, distinct
        # keep a uniformly random nnz-subset of the distinct draws, in random order
        idx = picked[torch.randperm(picked.numel(), generator=generator)[:nnz]]
    ordered = torch.sort(idx)
    order = ordered.indices.to(torch.int32) if nnz < 2**31 else ordered.indices  # half the memory
    return SparseMask(index=ordered.values, shape=(m, n), priority=order)


def make_masks(
    shapes: Mapping[str, tuple[int, int]], density: float, seed: int
) -> dict[str, SparseMask]:
    """One fixed random mask per module, keyed on ``(seed, module)``: the same for every client.

    With one density per rank type, ``density`` is the largest present: each type's mask is
    the nested sub-mask of its density (:func:`sub_masks`), so these masks are their union.
    """
    if not 0 < density <= 1:
        raise UsageError(f"federation.slora_density must be in (0, 1], got {density}")
    return {
        name: _mask(
            (int(m), int(n)),
            density,
            torch.Generator().manual_seed(derive_seed(seed, "slora-mask", name)),
        )
        for name, (m, n) in shapes.items()
    }


def sub_masks(masks: Mapping[str, SparseMask], density: float) -> dict[str, SparseMask]:
    """Each module's nested sub-mask at ``density`` (at most the masks' own density)."""
    return {name: k.sub(mask_nnz(k.shape, density)) for name, k in masks.items()}


def sub_positions(masks: Mapping[str, SparseMask], density: float) -> dict[str, Tensor] | None:
    """Where the sub-masks at ``density`` sit in ``masks``, per module; ``None``: all of them."""
    sizes = {name: mask_nnz(k.shape, density) for name, k in masks.items()}
    if all(sizes[name] == k.nnz for name, k in masks.items()):
        return None
    return {name: k.positions(sizes[name]) for name, k in masks.items()}


@dataclass(frozen=True)
class SparseDelta:
    """One module's sparse update: ``values`` at the mask's entries, zero elsewhere."""

    mask: SparseMask
    values: Tensor  # (nnz,)

    def __post_init__(self) -> None:
        if tuple(self.values.shape) != (self.mask.nnz,):
            raise ValueError(f"values {tuple(self.values.shape)} for a mask of {self.mask.nnz}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape

    def dense(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The full ``ΔW`` (m, n): for evaluation merges and the SVD, one module at a time."""
        m, n = self.shape
        out = torch.zeros(m * n, dtype=dtype)
        out[self.mask.index] = self.values.to(dtype)
        return out.view(m, n)  # (m, n)

    def sparse(self) -> Tensor:
        """The same ΔW as a coalesced sparse COO tensor (m, n)."""
        idx = torch.stack([self.mask.rows, self.mask.cols])  # (2, nnz)
        return torch.sparse_coo_tensor(
            idx, self.values, self.shape, is_coalesced=True, check_invariants=False
        )


@dataclass(frozen=True)
class SparseState:
    """The server's global state during stage 1: one :class:`SparseDelta` per adapted module."""

    modules: Mapping[str, SparseDelta]
    strategy: str = ""

    @classmethod
    def zeros(cls, masks: Mapping[str, SparseMask], strategy: str = "") -> SparseState:
        return cls(
            {n: SparseDelta(k, torch.zeros(k.nnz, dtype=torch.float32)) for n, k in masks.items()},
            strategy,
        )

    def __getitem__(self, module: str) -> SparseDelta:
        return self.modules[module]

    def names(self) -> list[str]:
        return list(self.modules)

    def values(self) -> dict[str, Tensor]:
        """What the server sends each client at the start of a stage-1 round."""
        return {name: d.values for name, d in self.modules.items()}

    def delta(self, module: str, dtype: torch.dtype = torch.float64) -> Tensor:
        """The whole global ΔW of ``module`` (m, n), for the evaluation merge."""
        return self.modules[module].dense(dtype)

    def frozen_part(self) -> None:
        """Nothing sits outside an adapter in stage 1 (the drivers ask every state)."""
        return None

    def num_bytes(self) -> int:
        """Bytes of the values (the message; the mask is rebuilt from the seed)."""
        return sum(d.values.numel() * d.values.element_size() for d in self.modules.values())

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """safetensors-ready: values and mask indices per module (a checkpoint keeps both)."""
        tensors: dict[str, Tensor] = {}
        meta = {"kind": STATE_KIND, "strategy": self.strategy, "modules": json.dumps(self.names())}
        for name, d in self.modules.items():
            tensors[f"{name}.values"] = d.values.contiguous()
            tensors[f"{name}.index"] = d.mask.index.contiguous()
            meta[f"shape:{name}"] = json.dumps(list(d.shape))
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> SparseState:
        """Inverse of :meth:`to_tensors`; ``KeyError`` / ``ValueError`` on a damaged file."""
        if meta.get("kind") != STATE_KIND:
            raise ValueError(f"not a sparse SLoRA state (kind {meta.get('kind')!r})")
        modules = {}
        for name in json.loads(meta["modules"]):
            m, n = (int(v) for v in json.loads(meta[f"shape:{name}"]))
            index = tensors[f"{name}.index"]
            if index.dtype != torch.int64 or index.ndim != 1 or bool((index >= m * n).any()):
                raise ValueError(f"module {name}: mask indices do not fit a {m}x{n} weight")
            modules[name] = SparseDelta(SparseMask(index, (m, n)), tensors[f"{name}.values"])
        return cls(modules, meta.get("strategy", ""))


@dataclass(frozen=True)
class SparseUpdate:
    """A client's stage-1 reply: its trained values at the shared mask, per module."""

    client_id: str
    num_examples: int
    values: Mapping[str, Tensor]  # module -> (nnz,)
    metrics: Mapping[str, float] = field(default_factory=dict)

    def num_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values.values())


def validate_sparse(
    updates: Sequence[object],
    masks: Mapping[str, SparseMask],
    expected: Sequence[str],
    masks_of: Mapping[str, Mapping[str, SparseMask]] | None = None,
) -> tuple[list[SparseUpdate], dict[str, str]]:
    """Split stage-1 replies into valid ones and ``client -> reason`` for the rest.

    Checked: the type, an expected and unrepeated client id, a positive int example count,
    exactly the masked modules, 1-D float values of the size of the client's own mask
    (``masks_of[client]`` when given, else ``masks``), all finite.
    """
    valid: list[SparseUpdate] = []
    rejected: dict[str, str] = {}
    counts: dict[str, int] = {}
    for u in updates:
        cid = getattr(u, "client_id", None)
        if isinstance(cid, str):
            counts[cid] = counts.get(cid, 0) + 1
    for i, u in enumerate(updates):
        cid = getattr(u, "client_id", None)
        try:
            if not isinstance(u, SparseUpdate):
                raise InvalidUpdateError(None, None, "type", f"not a sparse update: {type(u)}")
            if counts.get(cid, 0) > 1:
                raise InvalidUpdateError(cid, None, "duplicate", "client sent two updates")
            if cid not in expected:
                raise InvalidUpdateError(cid, None, "unknown_client", "not sampled this round")
            n = u.num_examples
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10**9:
                raise InvalidUpdateError(cid, None, "num_examples", f"num_examples is {n!r}")
            own = masks_of.get(cid, masks) if masks_of is not None else masks
            extra = sorted(set(u.values) - set(own))
            if extra:
                raise InvalidUpdateError(cid, extra[0], "extra_module", "not a masked module")
            for name, mask in own.items():
                v = u.values.get(name)
                if v is None:
                    raise InvalidUpdateError(cid, name, "missing_module", "no values")
                if not isinstance(v, Tensor) or not v.dtype.is_floating_point:
                    raise InvalidUpdateError(cid, name, "dtype", "values must be a float tensor")
                if tuple(v.shape) != (mask.nnz,):
                    raise InvalidUpdateError(
                        cid, name, "shape", f"{tuple(v.shape)} values for a mask of {mask.nnz}"
                    )
                if not all_finite(v):
                    raise InvalidUpdateError(cid, name, "nonfinite", "values hold NaN or Inf")
        except InvalidUpdateError as exc:
            key = cid if isinstance(cid, str) and cid not in rejected else f"#{i}"
            rejected[key] = str(exc)
            continue
        valid.append(u)
    return valid, rejected


class SparseAverage:
    """Streaming FedAvg of stage-1 replies: ``start``, ``add`` one reply at a time, ``result``.

    With one mask for everyone: the example-weighted average of the replies' values. With
    nested per-type masks (``add(..., positions=)``: where a client's entries sit in the union
    mask) it is what the FlexLoRA reference code computes, FedAvg of the clients' whole models:
    at an entry outside its mask a client counts, with its full weight, the value it started
    from (``previous``, the global update it was sent). That is ΔW = Σ_i p_i·ΔW_i with ΔW_i the
    client's model on the union mask, not an average over only the clients whose mask covers
    the entry. Holds one float64 sum per union entry, whatever the number of replies.
    """

    def __init__(
        self, masks: Mapping[str, SparseMask], previous: SparseState | None = None
    ) -> None:
        self.masks = dict(masks)
        self.previous = previous
        self.start()

    def start(self) -> None:
        self.sums = {n: torch.zeros(k.nnz, dtype=torch.float64) for n, k in self.masks.items()}
        self.total = 0.0

    def add(
        self,
        update: SparseUpdate,
        weight: float | None = None,
        positions: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Fold one reply; ``positions[module]`` places its values in the union mask."""
        w = float(update.num_examples if weight is None else weight)
        if not (math.isfinite(w) and w > 0):
            raise InvalidUpdateError(update.client_id, None, "weight", f"weight {w} is not > 0")
        for name, acc in self.sums.items():
            values = update.values[name].to(torch.float64)  # (nnz of the client's mask,)
            pos = positions.get(name) if positions is not None else None
            if pos is not None:
                if self.previous is None:
                    raise ValueError("a reply on a sub-mask needs the state it started from")
                whole = self.previous[name].values.to(torch.float64, copy=True)  # (nnz,)
                whole[pos] = values  # the client's model on the union mask
                values = whole
            acc.add_(values, alpha=w)  # (nnz,)
        self.total += w

    def result(self, strategy: str = "") -> SparseState:
        if self.total <= 0:
            raise InvalidUpdateError(None, None, "empty", "no stage-1 updates to average")
        return SparseState(
            {
                n: SparseDelta(self.masks[n], (acc / self.total).to(torch.float32))
                for n, acc in self.sums.items()
            },
            strategy,
        )


def svd_init(
    state: SparseState,
    max_ranks: Mapping[str, int],
    *,
    dtype: torch.dtype = torch.float32,
    randomized: bool = False,
    generator: torch.Generator | None = None,
    strategy: str = "",
) -> GlobalUpdate:
    """The truncated SVD of each module's accumulated sparse update, at the largest client rank.

    A client of rank r then gets the first r triplets (:meth:`ModuleDelta.factors`): the best
    rank-r approximation of ΔW (Eckart–Young), at its own rank. Dense and exact by default,
    one module at a time; ``randomized`` uses ``torch.svd_lowrank`` on the sparse matrix.
    """
    modules: dict[str, ModuleDelta] = {}
    for name, delta in state.modules.items():
        m, n = delta.shape
        k = min(int(max_ranks[name]), m, n)
        if randomized:
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            q = min(k + 8, m, n)
            U, S, V = torch.svd_lowrank(delta.sparse().to(torch.float64), q=q, niter=4)
            Vh = V.T  # (q, n)
        else:
            U, S, Vh = torch.linalg.svd(delta.dense(torch.float64), full_matrices=False)
        modules[name] = ModuleDelta(
            U=U[:, :k].to(dtype).contiguous(),  # (m, k)
            S=S[:k].to(dtype).contiguous(),  # (k,)
            Vh=Vh[:k].to(dtype).contiguous(),  # (k, n)
            truncation="svd",
        )
    return GlobalUpdate(modules=modules, strategy=strategy)
