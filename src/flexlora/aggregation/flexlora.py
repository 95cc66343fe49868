"""FlexLoRA (Bai et al., NeurIPS 2024): aggregate the full-size ΔW, give back its truncated SVD.

ΔW = Σ_i p_i·s_i·B_i·A_i with p_i ∝ example count and s_i the client's LoRA scaling. One thin
SVD per module per round serves every rank asked for: the best rank-r approximation of ΔW is
its first r singular triplets (Eckart–Young). Replies are folded as they arrive: per module
the server keeps either the stacked factors or a running dense sum, whichever is smaller
(:class:`FlexLoRAModule`), and the SVD is computed from the stacks without forming ΔW while
they are the smaller (see :mod:`flexlora.lora.svd`). The state keeps ``keep_rank`` triplets,
and only those are formed (from the stacks' Grams, or the dense sum's Gram); it also carries
the ‖·‖²_F the cut left out (``cut_energy``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from flexlora.aggregation.base import Aggregator, ModuleAccumulator, register
from flexlora.errors import UsageError
from flexlora.lora.products import squared_norm
from flexlora.lora.svd import (
    SVD_METHODS,
    canonical_signs,
    dense_cut_svd,
    factored_svd,
    gram_cut_svd,
    randomized_svd,
)
from flexlora.types import GlobalUpdate, LoRAFactors, ModuleDelta


class RowStack:
    """Row blocks appended into one buffer, so a stack is never concatenated: (len, width).

    ``reserve`` rows are reserved at the first append when the caller knows a bound (on the
    CPU only: the untouched rows of a ``torch.empty`` buffer are not resident, so what is
    held is what is filled); otherwise, or past the bound, the buffer doubles (one copy of the
    filled rows). Holds one (capacity, width) buffer in ``dtype`` on ``device``.
    """

    def __init__(
        self, width: int, dtype: torch.dtype, device: torch.device, reserve: int | None = None
    ) -> None:
        self.width = width
        self.dtype = dtype
        self.device = torch.device(device)
        self.reserve = reserve if self.device.type == "cpu" else None
        self.buffer: Tensor | None = None  # (capacity, width)
        self.len = 0

    def slot(self, rows: int) -> Tensor:
        """The next ``rows`` rows (rows, width), counted as filled: the caller writes them."""
        need = self.len + rows
        capacity = 0 if self.buffer is None else self.buffer.shape[0]
        if need > capacity:
            grown = max(need, 2 * capacity, self.reserve or 0)
            buffer = torch.empty(grown, self.width, dtype=self.dtype, device=self.device)
            if self.buffer is not None:
                buffer[: self.len] = self.buffer[: self.len]
            self.buffer = buffer
        assert self.buffer is not None
        out = self.buffer[self.len : need]
        self.len = need
        return out

    def rows(self) -> Tensor:
        """The filled rows (len, width), a view of the buffer."""
        if self.buffer is None:
            return torch.empty(0, self.width, dtype=self.dtype, device=self.device)
        return self.buffer[: self.len]


class FlexLoRAModule(ModuleAccumulator):
    """One module's Σ w_i·s_i·B_i·A_i, exactly, in the smaller of two forms.

    - stacks: the weighted B_iᵀ (r_i, m) and the A_i (r_i, n), R·(m + n) numbers for
      R = Σ r_i, each written once into a :class:`RowStack` as it arrives; the SVD then
      comes from the factors (ΔW is never formed);
    - dense: the running sum (m, n), m·n numbers, one client added at a time.

    ``auto`` starts with stacks and switches to the dense sum (adding the stacks into it and
    dropping them) when one more client would make R·(m + n) exceed m·n, so it never holds
    more than the dense sum; nothing is approximated. ``factored`` always stacks, ``dense``
    and ``randomized`` always sum. The stacks carry the weight w_i·s_i in B (``weight_in``
    ``"B"``), or s_i in B and w_i in A (``"A"``: FLoRA's own stacked factors, which it hands
    out as they are); the sum they make is the same. FLoRA, FedEx-LoRA's residual and the DP
    sum hold theirs in one of these.
    """

    def __init__(
        self,
        module: str,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        method: str,
        keep: int | None,
        niter: int,
        weight_in: str = "B",
    ) -> None:
        super().__init__(module, shape, dtype, device)
        if weight_in not in ("A", "B"):
            raise ValueError(f"weight_in must be 'A' or 'B', got {weight_in!r}")
        self.method = method
        self.weight_in = weight_in
        self.keep = keep
        self.niter = niter
        m, n = self.shape
        bound = None if method == "factored" else (m * n) // (m + n)  # most rows auto stacks
        self.Bt = RowStack(m, dtype, device, bound)  # (R, m): w_i·s_i·B_iᵀ (or s_i·B_iᵀ) blocks
        self.As = RowStack(n, dtype, device, bound)  # (R, n): A_i (or w_i·A_i) blocks
        self.delta: Tensor | None = None  # (m, n) once dense
        self.total_rank = 0

    @property
    def stacked(self) -> bool:
        return self.delta is None

    def stacks(self) -> tuple[Tensor, Tensor]:
        """The B stack (m, R), a column-major view, and the A stack (R, n) of the buffers;
        the weights are in one of them (``weight_in``)."""
        return self.Bt.rows().T, self.As.rows()

    def tensors(self) -> list[Tensor]:
        return list(self.stacks()) if self.delta is None else [self.delta]

    def work(self) -> float:
        """Stacks: two Grams ((m + n)·R²) and the core's eigensolver (~R³ at a few times
        below the gemm's rate); dense: an SVD of the (m, n) sum."""
        m, n = self.shape
        if self.delta is None:
            return float((m + n) * self.total_rank**2 + 8 * self.total_rank**3)
        return float(m * n * min(m, n))

    def fold(self, client_id: str, f: LoRAFactors, weight: float) -> None:
        m, n = self.shape
        A, B = self.load(f)
        w = weight * f.scaling
        self.total_rank += f.rank
        stacks_fit = self.total_rank * (m + n) <= m * n
        if self.method == "factored" or (self.method == "auto" and stacks_fit):
            # copies: the client's factors are never kept
            if self.weight_in == "B":
                torch.mul(B.T, w, out=self.Bt.slot(f.rank))  # (r_i, m)
                self.As.slot(f.rank).copy_(A)  # (r_i, n)
            else:
                torch.mul(B.T, f.scaling, out=self.Bt.slot(f.rank))  # (r_i, m)
                torch.mul(A, weight, out=self.As.slot(f.rank))  # (r_i, n)
            return
        if self.delta is None:
            self.delta = torch.zeros(m, n, dtype=self.dtype, device=self.device)  # (m, n)
            if self.Bt.len:
                self.delta.addmm_(*self.stacks())
            self.Bt = RowStack(m, self.dtype, self.device)
            self.As = RowStack(n, self.dtype, self.device)
        self.delta.addmm_(B, A, alpha=w)

    def result(self, total_weight: float) -> ModuleDelta:
        m, n = self.shape
        keep = self.keep
        energy: float | None = None  # ‖ΔW‖²_F when the SVD below forms only the kept triplets
        if self.delta is None:
            B, A = self.stacks()  # (m, R), (R, n)
            if keep is not None and keep < self.total_rank < min(m, n):
                # only the kept triplets are formed; the core gives the whole ‖ΔW‖²_F
                (U, S, Vh), energy = gram_cut_svd(B, A, keep)
            else:  # every triplet is kept: Householder QR and a float32 core SVD are cheaper
                U, S, Vh = factored_svd(B, A)
        elif self.method == "randomized":
            U, S, Vh = randomized_svd(
                self.delta, keep if keep is not None else min(self.total_rank, m, n), self.niter
            )
            energy = squared_norm(self.delta)
        else:  # a small keep: only its triplets, from the sum's Gram; else the full SVD
            (U, S, Vh), energy = dense_cut_svd(self.delta, keep)
        # rank(ΔW) <= R: a dense SVD's further triplets are zeros, cut so both forms agree
        k = self.total_rank if keep is None else min(keep, self.total_rank)
        whole = float(S.double().square().sum()) if energy is None else energy
        cut = cut_energy(whole, float(S[:k].double().square().sum()))
        U, S, Vh = canonical_signs(U[:, :k], S[:k], Vh[:k])
        return ModuleDelta(
            U=U.contiguous(),
            S=(S / total_weight).contiguous(),
            Vh=Vh.contiguous(),
            truncation="svd",
            cut_energy=cut / total_weight**2,
        )


#: a cut that leaves out less than this share of ‖ΔW‖²_F left out nothing float32 resolves
CUT_ENERGY_FLOOR = 1e-6


def cut_energy(whole: float, kept: float) -> float:
    """The ‖·‖²_F a cut left out, ``whole − kept``, as 0.0 below CUT_ENERGY_FLOOR·whole: a
    difference of two float32-rounded totals (a rank-deficient sum's zero tail read 1e-7·whole)."""
    cut = whole - kept
    return cut if cut > CUT_ENERGY_FLOOR * whole else 0.0


def _keep_value(k: object) -> int | None:
    """One ``keep_rank`` value: a positive integer (also as text), or ``None`` / ``"all"``."""
    if k is None:
        return None
    if isinstance(k, str):
        text = k.strip().lower()
        if text == "all":
            return None
        if text == "max":
            raise UsageError(
                "keep_rank = 'max' needs the clients' ranks: pass the largest rank any client "
                "receives (federation.keep_rank = 'max' resolves it from the rank types)"
            )
        if text.isdigit():
            k = int(text)
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise UsageError(f"keep_rank must be a positive integer or 'all', got {k!r}")
    return k


@register
class FlexLoRA(Aggregator):
    """Weighted sum of full-size updates, redistributed by truncated SVD at each client's rank.

    Parameters
    ----------
    svd:
        ``auto`` (stacks and the factored SVD while they are smaller than ΔW, else the dense
        sum and SVD), ``factored``, ``dense`` or ``randomized`` (``torch.svd_lowrank`` on the
        formed ΔW, keeping ``keep_rank``).
    keep_rank:
        Keep only this many singular triplets per module in the global state: one number, or
        a number per module (the largest rank any client can receive there: then every
        client gets exactly what the full state would give it). ``None`` or ``"all"`` (also
        as a module's value) keeps them all, so the state is exactly ΔW.
    dtype, device:
        Compute dtype (float32 or float64) and device of the server step.
    """

    name = "flexlora"

    def __init__(
        self,
        svd: str = "auto",
        keep_rank: int | str | Mapping[str, int | str | None] | None = None,
        niter: int = 4,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(dtype, device)
        if svd not in SVD_METHODS:
            raise UsageError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        if isinstance(keep_rank, Mapping):
            keep_rank = {m: _keep_value(k) for m, k in keep_rank.items()}
        else:
            keep_rank = _keep_value(keep_rank)
        self.svd = svd
        self.keep_rank = keep_rank
        self.niter = niter

    def keep_for(self, module: str) -> int | None:
        """How many triplets the state keeps for ``module`` (``None``: all)."""
        if isinstance(self.keep_rank, Mapping):
            if module not in self.keep_rank:
                raise UsageError(f"keep_rank gives no rank for module {module}")
            return self.keep_rank[module]  # a positive int, or None for "all"
        return self.keep_rank

    def start_module(
        self, module: str, shape: tuple[int, int], previous: GlobalUpdate | None
    ) -> ModuleAccumulator:
        return FlexLoRAModule(
            module, shape, self.dtype, self.device, self.svd, self.keep_for(module), self.niter
        )
