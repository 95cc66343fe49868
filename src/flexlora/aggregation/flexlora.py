"""FlexLoRA (Bai et al., NeurIPS 2024): aggregate the full-size ΔW, give back its truncated SVD.

ΔW = Σ_i p_i·s_i·B_i·A_i with p_i ∝ example count and s_i the client's LoRA scaling. One thin
SVD per module per round serves every rank asked for: the best rank-r approximation of ΔW is
its first r singular triplets (Eckart–Young). The SVD is computed from the stacked factors
without forming ΔW when Σ r_i < min(m, n) (see :mod:`flexlora.lora.svd`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.aggregation.base import Aggregator, register
from flexlora.errors import UsageError
from flexlora.lora.svd import SVD_METHODS, low_rank_sum_svd
from flexlora.types import ClientUpdate, GlobalUpdate, ModuleDelta


@register
class FlexLoRA(Aggregator):
    """Weighted sum of full-size updates, redistributed by truncated SVD at each client's rank.

    Parameters
    ----------
    svd:
        ``auto`` (factored when Σ r_i < min(m, n), else dense), ``factored``, ``dense`` or
        ``randomized`` (``torch.svd_lowrank`` on the formed ΔW, keeping ``keep_rank``).
    keep_rank:
        Keep only this many singular triplets in the global state (memory); ``None`` keeps
        them all, so the state is exactly ΔW.
    dtype:
        Compute dtype of the server step (float32 or float64).
    """

    name = "flexlora"

    def __init__(
        self,
        svd: str = "auto",
        keep_rank: int | None = None,
        niter: int = 4,
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__(dtype)
        if svd not in SVD_METHODS:
            raise UsageError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        if keep_rank is not None and keep_rank <= 0:
            raise UsageError(f"keep_rank must be positive, got {keep_rank}")
        self.svd = svd
        self.keep_rank = keep_rank
        self.niter = niter

    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> ModuleDelta:
        factors = [u.factors[module] for u in updates]
        weights = [pi * f.scaling for pi, f in zip(p, factors, strict=True)]
        U, S, Vh = low_rank_sum_svd(
            [f.B for f in factors],
            [f.A for f in factors],
            weights,
            method=self.svd,
            dtype=self.dtype,
            randomized_rank=self.keep_rank,
            niter=self.niter,
        )
        if self.keep_rank is not None:
            U, S, Vh = U[:, : self.keep_rank], S[: self.keep_rank], Vh[: self.keep_rank]
        return ModuleDelta(U=U.contiguous(), S=S.contiguous(), Vh=Vh.contiguous(), truncation="svd")
