"""The small typed vocabulary shared by every layer of flexlora.

Conventions (PEFT's): a LoRA adapter of rank r on a linear layer W (out=m, in=n) has
``A: (r, n)`` and ``B: (m, r)``; its update is ``ΔW = s·B·A`` with scaling ``s = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). A client's update maps module names to such factors, and
ranks may differ per module (PEFT's ``rank_pattern``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flexlora.errors import InvalidUpdateError, RankError
from flexlora.lora.svd import factored_svd

__all__ = [
    "ClientUpdate",
    "FactorState",
    "GlobalUpdate",
    "LoRAFactors",
    "ModuleDelta",
    "SVDState",
    "lora_scaling",
    "match_pattern",
    "resolve_ranks",
]


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling of a rank-``rank`` adapter: ``alpha/r`` or ``alpha/sqrt(r)`` (rsLoRA)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoRAFactors:
    """One module's LoRA factors. ``A: (r, n)``, ``B: (m, r)``; ``ΔW = scaling·B·A``."""

    A: Tensor  # (r, n)
    B: Tensor  # (m, r)
    alpha: float
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ValueError(
                f"LoRA factors must be 2-D, got A{tuple(self.A.shape)} B{tuple(self.B.shape)}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"rank mismatch: A is {tuple(self.A.shape)} (r, n) but B is "
                f"{tuple(self.B.shape)} (m, r)"
            )
        if self.A.shape[0] == 0:
            raise ValueError("rank must be positive")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora alpha must be a positive finite number, got {self.alpha}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(m, n)`` of the weight this adapter updates."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def delta(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense update ``s·B·A`` (m, n). Slow and large: for tests and small layers."""
        dtype = dtype or self.A.dtype
        return self.scaling * (self.B.to(dtype) @ self.A.to(dtype))  # (m, n)

    def num_bytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after local training."""

    client_id: str
    num_examples: int
    factors: Mapping[str, LoRAFactors]
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_examples, bool) or not isinstance(self.num_examples, int):
            raise InvalidUpdateError(
                self.client_id, None, "num_examples", "num_examples must be an int"
            )
        if self.num_examples <= 0:
            raise InvalidUpdateError(
                self.client_id,
                None,
                "num_examples",
                f"num_examples must be positive, got {self.num_examples}",
            )

    @property
    def ranks(self) -> dict[str, int]:
        return {name: f.rank for name, f in self.factors.items()}

    def num_bytes(self) -> int:
        return sum(f.num_bytes() for f in self.factors.values())


def match_pattern(patterns: Iterable[str], module: str) -> str | None:
    """The first pattern that names ``module`` the way PEFT's ``rank_pattern`` keys do.

    A key matches when it is the module's full name or a dotted suffix of it, or a regex whose
    match ends at the end of the name (``(.*\\.)?KEY$``).
    """
    for key in patterns:
        if module == key or module.endswith("." + key):
            return key
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


def resolve_ranks(
    modules: Iterable[str], r: int, rank_pattern: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Per-module ranks: ``rank_pattern`` where a key matches, ``r`` elsewhere."""
    pattern = dict(rank_pattern or {})
    out: dict[str, int] = {}
    for module in modules:
        key = match_pattern(pattern, module)
        out[module] = int(pattern[key]) if key is not None else int(r)
    return out


Truncation = str  # "svd" | "prefix" | "exact"
TRUNCATIONS = ("svd", "prefix", "exact")


@dataclass(frozen=True)
class SVDState:
    """One module's global update ``ΔW = U·diag(S)·Vh`` with ``U: (m, k)``, ``Vh: (k, n)``.

    Two kinds of state share this layout (and its serialization, ``U`` / ``S`` / ``Vh``), each
    with its own type so that a name says what it holds:

    - :class:`SVDState` (``truncation="svd"``): a thin SVD with S descending; the first r
      triplets are the best rank-r approximation (Eckart–Young). FlexLoRA, FLoRA, FedEx-LoRA's
      residual.
    - :class:`FactorState` (``truncation="prefix"`` or ``"exact"``): averaged LoRA factors,
      ``B`` (m, k) in update units (the LoRA scaling folded in) and ``A`` (k, n), S all ones;
      a rank-r piece is the first r columns / rows (HetLoRA, FFA-LoRA, FedEx-LoRA, FedSA-LoRA),
      or only r == k may be asked for (``exact``: FedIT).

    The common protocol: ``.rank``, ``.shape``, ``.dense()``, ``.factors(rank, alpha, ...)``.
    Constructing ``SVDState`` (or its old name :data:`ModuleDelta`) with a ``prefix`` / ``exact``
    truncation gives a :class:`FactorState`, so older code that builds states by truncation
    gets the right type.
    """

    U: Tensor  # (m, k)
    S: Tensor  # (k,)
    Vh: Tensor  # (k, n)
    truncation: Truncation = "svd"
    #: ‖·‖²_F of the triplets a cap left out when this state was made (FlexLoRA's keep_rank):
    #: the round's whole ΔW has ‖ΔW‖²_F = Σ S² + cut_energy. A diagnostic of the round that
    #: made the state (:mod:`flexlora.diagnostics`); not stored in checkpoints or records
    cut_energy: float = 0.0

    def __new__(cls, *args: object, **kwargs: object) -> SVDState:
        truncation = kwargs.get("truncation", args[3] if len(args) > 3 else "svd")
        if cls is SVDState and truncation in ("prefix", "exact"):
            cls = FactorState
        return object.__new__(cls)

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        k = self.S.shape[0] if self.S.ndim == 1 else -1
        if self.U.ndim != 2 or self.Vh.ndim != 2 or self.U.shape[1] != k or self.Vh.shape[0] != k:
            raise ValueError(
                f"inconsistent module delta: U{tuple(self.U.shape)} S{tuple(self.S.shape)} "
                f"Vh{tuple(self.Vh.shape)}"
            )

    @property
    def rank(self) -> int:
        """How many components are stored (an upper bound on rank(ΔW))."""
        return int(self.S.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.Vh.shape[1])

    def dense(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The full ``ΔW`` (m, n), for tests, evaluation of tiny models and exports."""
        return (self.U.to(dtype) * self.S.to(dtype)) @ self.Vh.to(dtype)  # (m, n)

    def side_factors(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(U·diag(S), Vh) in float32 on ``device``, (m, k) and (k, n): ΔW as the term a hook
        adds beside a frozen layer (:func:`flexlora.lora.products.low_rank_output`)."""
        B = (self.U.to(torch.float32) * self.S.to(torch.float32)).to(device)  # (m, k)
        return B, self.Vh.to(device, torch.float32)  # (k, n)

    def for_rank(self, rank: int, padded: bool = False) -> ModuleDelta:
        """This ΔW ready to be cut at ``rank``: an ``exact`` stack (FLoRA's first-round
        stack, FedIT's average) asked for fewer components than it stores becomes its thin
        SVD, so the cut is the best approximation instead of an error; with ``padded`` (an
        output that extends the state with zero-B components, FLoRA's) one asked for more
        does too, since an exact state refuses any rank but its own; else itself."""
        if self.truncation != "exact" or rank == self.rank or (rank > self.rank and not padded):
            return self
        U, S, Vh = factored_svd(self.U * self.S, self.Vh)  # (m, k), (k,), (k, n)
        return ModuleDelta(U=U, S=S, Vh=Vh, truncation="svd")

    def factors(
        self,
        rank: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        split: str = "B",
        pad: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        module: str | None = None,
    ) -> LoRAFactors:
        """Rank-``rank`` LoRA factors of this ΔW for a client with scaling ``alpha/rank``.

        The client's update is ``s·B·A``, so its own scaling is divided out of B: the
        receiving adapter reproduces the truncated ΔW exactly. ``split="B"`` puts the singular
        values into B (the reference's convention); ``"balanced"`` puts ``sqrt(S)`` in each.
        ``split`` applies to ``svd`` truncations only: a ``prefix`` or ``exact`` state stores
        the strategy's own A (FFA-LoRA's frozen A, FedIT's average), which is handed back as is.
        Asking for more than ``self.rank`` components is an error unless ``pad`` is given:
        then the extra rows of A are drawn like PEFT's initialisation from that generator and
        the extra columns of B are zero, which leaves ΔW unchanged and keeps every component
        trainable.
        """
        if rank <= 0:
            raise RankError(f"module {module}: rank must be positive, got {rank}")
        if self.truncation == "exact" and rank != self.rank:
            raise RankError(
                f"module {module}: this global state has rank {self.rank} and cannot be cut "
                f"to rank {rank} (the strategy needs every client at one rank)"
            )
        if rank > self.rank and pad is None:
            raise RankError(
                f"module {module}: rank {rank} was asked for but the global update has only "
                f"{self.rank} components (at most the sum of the clients' ranks and min(m, n), "
                "or the state's keep_rank cap)"
            )
        if split not in ("B", "balanced"):
            raise ValueError(f"split must be 'B' or 'balanced', got {split!r}")
        dtype = dtype or self.U.dtype
        keep = min(rank, self.rank)
        s = lora_scaling(alpha, rank, use_rslora)
        U = self.U[:, :keep].to(dtype)  # (m, keep)
        S = self.S[:keep].to(dtype)  # (keep,)
        Vh = self.Vh[:keep].to(dtype)  # (keep, n)
        if split == "B" or self.truncation != "svd":
            B = U * (S / s)  # (m, keep)
            # (keep, n) in its own storage: a view of the first rows would keep the whole
            # (rank, n) Vh alive for as long as the factors live (an export held every one)
            A = Vh.clone() if Vh.data_ptr() == self.Vh.data_ptr() else Vh
        else:
            root = torch.sqrt(S / s)
            B = U * root  # (m, keep)
            A = root[:, None] * Vh  # (keep, n)
        if keep < rank:
            m, n = self.shape
            extra = rank - keep
            bound = 1.0 / math.sqrt(n)
            A_pad = (torch.rand(extra, n, generator=pad, dtype=torch.float64) * 2 - 1) * bound
            A = torch.cat([A, A_pad.to(dtype)], dim=0)  # (rank, n)
            B = torch.cat([B, torch.zeros(m, extra, dtype=dtype)], dim=1)  # (m, rank)
        return LoRAFactors(A=A.contiguous(), B=B.contiguous(), alpha=alpha, use_rslora=use_rslora)


#: Key prefix of the frozen part's tensors in :meth:`GlobalUpdate.to_tensors` and records.
FROZEN_PREFIX = "frozen:"


@dataclass(frozen=True)
class FactorState(SVDState):
    """Averaged LoRA factors of one module: ``ΔW = B·A``, B (m, k) with the scaling folded in.

    Stored as ``U = B``, ``S = 1``, ``Vh = A`` (checkpoints and Flower records are those of
    :class:`SVDState`); a client of rank r receives ``B[:, :r] / s_r`` and ``A[:r]``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.truncation == "svd":
            raise ValueError("a FactorState is cut by prefix or exact truncation, not svd")

    @classmethod
    def of(cls, B: Tensor, A: Tensor, *, exact: bool = False) -> FactorState:
        """The state of factors ``B`` (m, k), in update units, and ``A`` (k, n)."""
        ones = torch.ones(B.shape[1], dtype=B.dtype)
        return cls(U=B, S=ones, Vh=A, truncation="exact" if exact else "prefix")

    @property
    def B(self) -> Tensor:
        return self.U  # (m, k)

    @property
    def A(self) -> Tensor:
        return self.Vh  # (k, n)


#: The old name of :class:`SVDState` (and, by truncation, of :class:`FactorState`).
ModuleDelta = SVDState


@dataclass(frozen=True)
class GlobalUpdate:
    """The server's global update: one :class:`ModuleDelta` per adapted module.

    ``frozen`` (FedEx-LoRA's residual) is a part of the global ΔW that no adapter carries: the
    clients hold it outside their adapters (in, or next to, their frozen weights). The global
    model is ``W0 + frozen + modules`` (:meth:`delta`).
    """

    modules: Mapping[str, ModuleDelta]
    strategy: str = ""
    frozen: Mapping[str, ModuleDelta] = field(default_factory=dict)

    def __getitem__(self, module: str) -> ModuleDelta:
        return self.modules[module]

    def delta(self, module: str, dtype: torch.dtype = torch.float64) -> Tensor:
        """The whole global ΔW of ``module`` (m, n): its adapter part plus its frozen part."""
        out = self.modules[module].dense(dtype)  # (m, n)
        if module in self.frozen:
            out = out + self.frozen[module].dense(dtype)
        return out

    def frozen_part(self) -> GlobalUpdate | None:
        """The frozen part alone, as an update (``None`` when there is none)."""
        if not self.frozen:
            return None
        return GlobalUpdate(modules=dict(self.frozen), strategy=self.strategy)

    def names(self) -> list[str]:
        return list(self.modules)

    def max_rank(self) -> int:
        return max((d.rank for d in self.modules.values()), default=0)

    def factors(
        self,
        ranks: int | Mapping[str, int],
        alpha: float | Mapping[str, float],
        *,
        use_rslora: bool = False,
        split: str = "B",
        pad: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, LoRAFactors]:
        """Factors for every module at ``ranks`` (one int, or per module)."""
        out: dict[str, LoRAFactors] = {}
        for name, delta in self.modules.items():
            r = ranks if isinstance(ranks, int) else ranks[name]
            a = alpha if isinstance(alpha, (int, float)) else alpha[name]
            out[name] = delta.factors(
                r, float(a), use_rslora=use_rslora, split=split, pad=pad, dtype=dtype, module=name
            )
        return out

    def num_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for part in (self.modules, self.frozen)
            for d in part.values()
            for t in (d.U, d.S, d.Vh)
        )

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Flatten to a safetensors-ready dict plus string metadata (no pickle).

        The module order is stored too (``modules``, a JSON list): safetensors hands metadata
        back in no particular order, and code that walks the modules (drawing padding from a
        generator, say) must see them in the same order after a reload.
        """
        tensors: dict[str, Tensor] = {}
        meta: dict[str, str] = {
            "strategy": self.strategy,
            "modules": json.dumps(list(self.modules)),
        }
        for name, d in self.modules.items():
            tensors[f"{name}.U"] = d.U.contiguous()
            tensors[f"{name}.S"] = d.S.contiguous()
            tensors[f"{name}.Vh"] = d.Vh.contiguous()
            meta[f"truncation:{name}"] = d.truncation
        if self.frozen:
            meta["frozen_modules"] = json.dumps(list(self.frozen))
        for name, d in self.frozen.items():
            tensors[f"{FROZEN_PREFIX}{name}.U"] = d.U.contiguous()
            tensors[f"{FROZEN_PREFIX}{name}.S"] = d.S.contiguous()
            tensors[f"{FROZEN_PREFIX}{name}.Vh"] = d.Vh.contiguous()
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> GlobalUpdate:
        """Inverse of :meth:`to_tensors`, in the stored module order (sorted when none is stored).

        Raises ``KeyError`` for a missing tensor and ``ValueError`` for inconsistent metadata.
        """
        truncations = {
            key[len("truncation:") :]: trunc
            for key, trunc in meta.items()
            if key.startswith("truncation:")
        }
        order = json.loads(meta["modules"]) if "modules" in meta else sorted(truncations)
        if not isinstance(order, list) or sorted(order) != sorted(truncations):
            raise ValueError(
                f"metadata lists modules {order!r} but has truncations for {sorted(truncations)}"
            )
        modules = {
            name: ModuleDelta(
                U=tensors[f"{name}.U"],
                S=tensors[f"{name}.S"],
                Vh=tensors[f"{name}.Vh"],
                truncation=truncations[name],
            )
            for name in order
        }
        frozen = {
            name: ModuleDelta(
                U=tensors[f"{FROZEN_PREFIX}{name}.U"],
                S=tensors[f"{FROZEN_PREFIX}{name}.S"],
                Vh=tensors[f"{FROZEN_PREFIX}{name}.Vh"],
            )
            for name in json.loads(meta.get("frozen_modules", "[]"))
        }
        return cls(modules=modules, strategy=meta.get("strategy", ""), frozen=frozen)
