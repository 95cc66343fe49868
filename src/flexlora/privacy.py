"""Client-level differential privacy for FlexLoRA: clip each client's ΔW, noise the sum, account.

The mechanism is DP-FedAvg's (McMahan et al., ICLR 2018) applied to FlexLoRA's aggregate:

1. clip: client i's whole update ΔW_i = {s_i·B_i·A_i per module} is scaled by
   ``c_i = min(1, C / ‖ΔW_i‖_F)`` (the Frobenius norm over all modules). Scaling B_i by c_i
   clips the product exactly, so a clipped update is still a rank-r_i LoRA update;
2. noise the sum: per module, ``ΔW = (Σ_i c_i·ΔW_i + σ·C·Z) / K`` with ``Z`` dense standard
   Gaussian (m, n) and ``K`` the fixed cohort size (clients_per_round). Weights are uniform
   and the denominator is fixed, so adding or removing one client moves the sum by at most C
   whatever the others sent: example counts are private data and are not used as weights;
3. the server's truncated SVD then acts on the noised, full-rank ΔW: post-processing, which
   costs no privacy. The state keeps the top ``keep_ranks`` triplets, the most any client or
   exported adapter receives;
4. account: (ε, δ) after T rounds from Opacus's RDP accountant for the subsampled Gaussian
   mechanism with sample rate ``q = K / population`` and T steps (every round counts, also one
   whose state was kept).

Only FlexLoRA supports this (:data:`DP_STRATEGIES`): FedIT, HetLoRA, FFA-LoRA and FLoRA
average or stack the factors themselves, and a norm bound on ΔW_i does not bound what one
client moves in averaged A and B.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from flexlora.aggregation.flexlora import FlexLoRAModule, cut_energy
from flexlora.errors import UsageError
from flexlora.lora.norms import update_norm
from flexlora.lora.svd import dense_cut_svd
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors, ModuleDelta

__all__ = ["DP_STRATEGIES", "ClientDP", "DPSum", "clip_update", "dp_epsilon"]

#: strategies whose aggregate is ΔW itself, so that clipping ΔW_i bounds the sensitivity
DP_STRATEGIES = ("flexlora",)


def clip_update(update: ClientUpdate, clip: float) -> tuple[ClientUpdate, float]:
    """``update`` with every B scaled by ``min(1, clip / ‖ΔW‖_F)``, and the norm before.

    ``s·(c·B)·A = c·(s·B·A)``, so the clipped update has norm ``min(‖ΔW‖_F, clip)`` exactly.
    The input is not modified.
    """
    if not clip > 0:
        raise UsageError(f"the DP clipping norm must be positive, got {clip}")
    norm = update_norm(update.factors.values())
    if norm <= clip:
        return update, norm
    c = clip / norm
    factors = {
        name: LoRAFactors(A=f.A, B=f.B * c, alpha=f.alpha, use_rslora=f.use_rslora)
        for name, f in update.factors.items()
    }
    return replace(update, factors=factors), norm


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` subsampled Gaussian rounds at ``delta``, from Opacus's RDP accountant.

    ``inf`` without noise; 0 before the first round.
    """
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:  # pragma: no cover - opacus is a dev dependency
        raise UsageError(
            "client-level DP accounting needs opacus: pip install 'flexlora[dp]'"
        ) from None
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return float(accountant.get_epsilon(delta=delta))


@dataclass(frozen=True)
class ClientDP:
    """Settings of the client-level Gaussian mechanism and its accounting.

    Parameters
    ----------
    clip:
        C, the bound on each client's ‖ΔW_i‖_F.
    noise_multiplier:
        σ: the noise on the sum has standard deviation σ·C per entry.
    delta:
        δ of the reported (ε, δ).
    cohort:
        K, clients sampled per round: the fixed denominator of the average.
    population:
        Clients that can be sampled; the sample rate is ``K / population``.
    """

    clip: float
    noise_multiplier: float
    delta: float
    cohort: int
    population: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise UsageError(f"federation.dp_clip must be positive, got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise UsageError(
                f"federation.dp_noise_multiplier must be >= 0, got {self.noise_multiplier}"
            )
        if not 0 < self.delta < 1:
            raise UsageError(f"federation.dp_delta must be in (0, 1), got {self.delta}")
        if not 0 < self.cohort <= self.population:
            raise UsageError(
                f"DP needs 0 < clients per round ({self.cohort}) <= clients ({self.population})"
            )

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.population

    def epsilon(self, rounds: int) -> float:
        """ε spent after ``rounds`` rounds (``inf`` when σ = 0)."""
        return dp_epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta)

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        shapes: Mapping[str, tuple[int, int]],
        keep_ranks: Mapping[str, int],
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[GlobalUpdate, int]:
        """The noised FlexLoRA state of this round and how many updates were clipped.

        :meth:`start` with every update added in order (see :class:`DPSum`).
        """
        acc = self.start(shapes, keep_ranks, dtype)
        for u in updates:
            acc.add(u)
        return acc.result(generator)

    def start(
        self,
        shapes: Mapping[str, tuple[int, int]],
        keep_ranks: Mapping[str, int],
        dtype: torch.dtype = torch.float32,
    ) -> DPSum:
        """An empty clipped sum to fold this round's replies into as they arrive."""
        return DPSum(self, shapes, keep_ranks, dtype)


class DPSum:
    """A round's clipped sum, one reply at a time; :meth:`result` noises it and takes the SVD.

    Holds, per module, the clipped replies in the smaller exact form, as FlexLoRA's server
    does (a :class:`~flexlora.aggregation.flexlora.FlexLoRAModule`, ``auto``): the stacked
    factors s_i·c_i·B_i and A_i, R·(m + n) numbers for R = Σ r_i, until one more reply would
    make them exceed m·n, then the running dense (m, n) sum. So no module ever holds more
    than min(R·(m + n), m·n) numbers: bounded by the adapted weights, whatever the number of
    clients. While a reply is added, its clipped copy (B_i scaled by c_i, every module) is
    held as well. :meth:`result` forms one module's dense sum at a time.
    """

    def __init__(
        self,
        dp: ClientDP,
        shapes: Mapping[str, tuple[int, int]],
        keep_ranks: Mapping[str, int],
        dtype: torch.dtype,
    ) -> None:
        self.dp = dp
        self.keep_ranks = dict(keep_ranks)
        self.dtype = dtype
        cpu = torch.device("cpu")
        #: per module Σ_i s_i·c_i·B_i·A_i of the clipped replies: stacks or a dense sum
        self.modules = {
            name: FlexLoRAModule(name, (m, n), dtype, cpu, "auto", None, niter=4)
            for name, (m, n) in shapes.items()
        }
        self.clipped = 0
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        """Clip ``update`` to the DP norm and fold it into every module's sum.

        The caller has validated ``update`` (the round's ``UpdateValidator``: every module,
        of the round's shape, finite values). Its clipped copy is made, and every module
        looked up, before anything is folded.
        """
        clipped, norm = clip_update(update, self.dp.clip)
        factors = [(acc, clipped.factors[name]) for name, acc in self.modules.items()]
        for acc, f in factors:
            acc.fold(update.client_id, f, 1.0)  # weight 1: adds s·(c·B)·A, uniform weights
        self.clipped += int(norm > self.dp.clip)
        self.count += 1

    def num_bytes(self) -> int:
        """Bytes held by the modules' sums (stacks or dense)."""
        return sum(acc.num_bytes() for acc in self.modules.values())

    def result(self, generator: torch.Generator) -> tuple[GlobalUpdate, int]:
        """The noised state (noise drawn module by module, in order) and the clipped count.

        Module by module: the dense clipped sum (one product of the stacks, or the running
        sum), plus σ·C·Z, divided by the cohort K, then its top kept-rank triplets (from its
        Gram when that rank is small, else its SVD: :func:`~flexlora.lora.svd.dense_cut_svd`).
        Besides what :class:`DPSum` holds, one module's (m, n) sum and (m, n) noise are held
        at once, then the noised matrix and its SVD; they are freed before the next module.
        The sums are not modified, so calling it again with an equal generator gives the same
        state.
        """
        std = self.dp.noise_multiplier * self.dp.clip
        modules: dict[str, ModuleDelta] = {}
        for name, acc in self.modules.items():
            m, n = acc.shape
            if acc.delta is None:
                B, A = acc.stacks()  # (m, R), (R, n)
                total = B @ A  # (m, n), formed here: ours to overwrite
                owned = True
            else:
                total = acc.delta  # (m, n): the running sum, left as it is
                owned = False
            if std > 0:
                noised = torch.randn(m, n, generator=generator, dtype=self.dtype)  # (m, n)
                torch.add(total, noised, alpha=std, out=noised)  # total + σC·Z, in Z's buffer
            else:
                noised = total if owned else total.clone()
            del total
            noised.div_(self.dp.cohort)
            k = min(int(self.keep_ranks[name]), m, n)
            (U, S, Vh), whole = dense_cut_svd(noised, k)  # (m, k), (k,), (k, n)
            del noised
            modules[name] = ModuleDelta(
                U=U[:, :k].contiguous(),
                S=S[:k].contiguous(),
                Vh=Vh[:k].contiguous(),
                truncation="svd",
                cut_energy=cut_energy(whole, float(S[:k].double().square().sum())),
            )
            del U, S, Vh
        return GlobalUpdate(modules=modules, strategy="flexlora"), self.clipped
