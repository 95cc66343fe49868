"""HetLoRA's local rank self-pruning (Cho et al., 2024): a client shrinks its own rank.

During local training the client adds to its loss the regulariser

    λ · Σ_modules ‖B[:, t:r]‖_F · ‖A[t:r, :]‖_F,        t = ⌊γ·r⌋

which pulls the last (1 − γ)·r components of its adapter toward zero. After training it
compares the same sum (without λ) on its trained factors with the sum on the factors it started
from: when training made the tail smaller, the client prunes every module to rank
max(``min_rank``, ⌊γ·r⌋), sends the pruned factors and keeps that rank in its later rounds
(the drivers store it per client, :mod:`flexlora.client_state`).

Where we differ from the paper, and why:

- **Per-module ranks** (PEFT's ``rank_pattern``, the paper's clients have one rank): the decision
  is one per client, on the regulariser summed over its modules (the paper's sum when every
  module shares a rank), and each module's rank r becomes ⌊γ·r⌋.
- **LoRA scaling.** The paper writes ΔW = B·A. With PEFT's s = alpha/r a rank-r' prefix of a
  rank-r adapter would change its update by s_r'/s_r, so the kept columns of B are rescaled by
  s_r/s_r': the pruned adapter's update is exactly the prefix s_r·B[:, :r']·A[:r'] of the
  trained one. The same rule cuts the factors a pruned client receives from the server.
- ``min_rank`` (default 1) is our floor; the paper bounds ranks from below without a name.
- The loss reported in the metrics is the data loss, without the regulariser.

Everything here is tensors in, tensors out: no model, no scheduling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from flexlora.errors import UsageError
from flexlora.types import LoRAFactors, lora_scaling

__all__ = [
    "SelfPruning",
    "keep_prefix",
    "pruned_ranks",
    "self_prune",
    "tail_penalty",
    "tail_start",
    "tail_value",
]


@dataclass(frozen=True)
class SelfPruning:
    """The settings of HetLoRA's self-pruning: ``weight`` λ, decay ``gamma`` γ, ``min_rank``."""

    weight: float = 1e-3
    gamma: float = 0.9
    min_rank: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise UsageError(f"hetlora self-pruning weight must be >= 0, got {self.weight}")
        if not 0 < self.gamma < 1:
            raise UsageError(f"hetlora self-pruning gamma must be in (0, 1), got {self.gamma}")
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int):
            raise UsageError(f"hetlora min_rank must be an integer, got {self.min_rank!r}")
        if self.min_rank < 1:
            raise UsageError(f"hetlora min_rank must be >= 1, got {self.min_rank}")


def tail_start(rank: int, gamma: float) -> int:
    """t = ⌊γ·r⌋: the first component of the penalised tail (t == r: no tail)."""
    return min(rank, math.floor(gamma * rank + 1e-9))


def tail_penalty(pairs: Iterable[tuple[Tensor, Tensor, int]], gamma: float) -> Tensor:
    """Σ ‖B[:, t:r]‖_F·‖A[t:r]‖_F over ``(A (≥ r, n), B (m, ≥ r), r)``, differentiable.

    Only components below ``r`` are read, so zero padding beyond a client's rank (the batched
    trainer's stacks) never enters. The norm's gradient at zero is taken as zero (torch's).
    """
    total: Tensor | None = None
    for A, B, r in pairs:
        t = tail_start(r, gamma)
        if t >= r:
            continue
        term = torch.linalg.vector_norm(B[:, t:r]) * torch.linalg.vector_norm(A[t:r])
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total


def tail_value(factors: Mapping[str, LoRAFactors], gamma: float) -> float:
    """The regulariser's sum (without λ) on ``factors``, in float64 (the pruning test)."""
    with torch.no_grad():
        pairs = ((f.A.double(), f.B.double(), f.rank) for f in factors.values())
        return float(tail_penalty(pairs, gamma))


def pruned_ranks(ranks: Mapping[str, int], cfg: SelfPruning) -> dict[str, int]:
    """Each module's rank after one pruning step: max(min_rank, ⌊γ·r⌋), never above r."""
    return {m: min(r, max(cfg.min_rank, tail_start(r, cfg.gamma))) for m, r in ranks.items()}


def keep_prefix(f: LoRAFactors, rank: int) -> LoRAFactors:
    """The first ``rank`` components of ``f`` as a rank-``rank`` adapter with the same update.

    B's columns are rescaled by s_r/s_rank, so ``s_rank·B'·A' = s_r·B[:, :rank]·A[:rank]``.
    """
    if rank == f.rank:
        return f
    if not 0 < rank < f.rank:
        raise ValueError(f"cannot keep {rank} of {f.rank} components")
    ratio = f.scaling / lora_scaling(f.alpha, rank, f.use_rslora)
    return LoRAFactors(
        A=f.A[:rank].clone(),  # (rank, n)
        B=(f.B[:, :rank] * ratio).contiguous(),  # (m, rank)
        alpha=f.alpha,
        use_rslora=f.use_rslora,
    )


def self_prune(
    start: Mapping[str, LoRAFactors], trained: Mapping[str, LoRAFactors], cfg: SelfPruning
) -> tuple[dict[str, LoRAFactors], bool]:
    """The factors a client sends after training, and whether it pruned its rank.

    It prunes (every module one step, :func:`pruned_ranks`) when the tail of its trained
    factors is smaller than the tail of the factors it started from; otherwise it sends
    ``trained`` as they are. Holds only the factors it is given (and the pruned copies).
    """
    ranks = {m: f.rank for m, f in trained.items()}
    target = pruned_ranks(ranks, cfg)
    if target == ranks or tail_value(trained, cfg.gamma) >= tail_value(start, cfg.gamma):
        return dict(trained), False
    return {m: keep_prefix(f, target[m]) for m, f in trained.items()}, True
