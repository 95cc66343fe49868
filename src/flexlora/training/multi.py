"""Many clients' LoRA adapters in one forward pass over the shared frozen base model.

For every adapted linear layer the factors of K clients are held stacked, zero-padded to the
largest rank among them: ``A: (K, r_max, n)``, ``B: (K, m, r_max)``. A batch is the
concatenation of the clients' micro-batches (``b`` rows each, contiguous per client), so the
layer computes the frozen base output once for all rows (one read of the base weight, or one
call of a quantized layer's own forward) and then small batched matmuls per client:

    y = base(x) + s_k · (dropout_k(x) · A_kᵀ) · B_kᵀ        for the rows of client k

Zero padding needs no mask: the clients of one rank are computed together on their unpadded
slices (one pair of batched matmuls per distinct rank, so a rank-8 client never pays for a
rank-200 one, and its arithmetic is exactly that of its own PEFT layer); the padding is never
read, gets exactly zero gradient, and AdamW / SGD keep it at zero.

Dropout masks are drawn from each client's own generator at its own micro-batch width, so a
client's masks do not depend on which clients share the batch (and equal the sequential path's,
which draws from ``torch.manual_seed(seed)`` in the same order).

:class:`MultiLoRA` installs :class:`MultiLoRALinear` in place of the PEFT layers of an
:class:`~flexlora.training.adapters.AdapterHost` for the batched pass and puts them back after,
so the PEFT slots keep serving the sequential path, export and evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flexlora.errors import UsageError
from flexlora.types import LoRAFactors

__all__ = ["BatchPlan", "MultiLoRA", "MultiLoRALinear", "RankGroup"]


@dataclass
class BatchPlan:
    """Who owns the rows of the next forward pass (shared by every layer of the model).

    ``active`` indexes the stack (the clients with rows in this batch, in row order);
    ``rows`` is each client's row count; ``widths`` each client's own micro-batch width
    (its dropout mask is drawn at that width); ``generators`` one per stacked client.
    """

    rows: int = 0
    active: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    generators: list[torch.Generator] = field(default_factory=list)
    stacked: int = 0


def _check_base(name: str, base: nn.Module) -> None:
    """Only layers whose forward is ``x -> x W^T (+ b)`` in some storage may be wrapped."""
    from transformers.pytorch_utils import Conv1D

    if not isinstance(base, (nn.Linear, Conv1D)):  # bnb Linear4bit / Linear8bitLt are nn.Linear
        raise UsageError(
            f"batched clients (train.parallel_clients > 1) support nn.Linear, Conv1D and "
            f"bitsandbytes linear layers; module {name} is a {type(base).__name__} "
            f"(use train.parallel_clients = 1)"
        )


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus K clients' LoRA factors, rows grouped by client."""

    def __init__(self, name: str, base: nn.Module, owner: MultiLoRA) -> None:
        super().__init__()
        _check_base(name, base)
        self.name = name
        self.base_layer = base
        self._owner = [owner]  # a list: the owner is not a submodule of every layer

    @property
    def weight(self) -> Tensor:
        """The frozen base weight, as PEFT's LoRA layers expose it: some models read a
        layer's weight (Mamba checks ``x_proj.weight``'s device to pick its path). Where a
        model computes with a weight instead of calling the layer, the adapter is bypassed
        exactly as PEFT's would be; such targets are refused
        (:data:`flexlora.models.targets.WEIGHT_READ_DIRECTLY`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The frozen base bias (``None`` without one), as :attr:`weight`."""
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        owner = self._owner[0]
        plan = owner.plan
        result = self.base_layer(x)  # (R, t, m): the frozen weight read once for all rows
        k, b, n = len(plan.active), plan.rows, x.shape[-1]
        # (R, t, n), or flattened to (R·t, n) as OPT's feed-forward does: rows stay per client
        t = x.numel() // (k * b * n)
        A = owner.A[self.name]
        xl = x.to(A.dtype).reshape(k, b, t, n)  # (K', b, t, n)
        if owner.dropout > 0 and self.training:
            xl = xl * owner.dropout_mask(self.name, xl, plan)
        xl = xl.reshape(k, b * t, n)  # (K', bt, n)
        groups = owner.groups(self.name)
        if len(groups) == 1:
            delta = self._group(xl, groups[0])  # (K', bt, m)
        else:
            pieces: list[Tensor] = [xl] * k
            for group in groups:
                for j, row in zip(group.positions, self._group(xl, group), strict=True):
                    pieces[j] = row  # (bt, m)
            delta = torch.stack(pieces)  # (K', bt, m)
        out = result + delta.reshape(result.shape)  # (R, t, m)
        return out.to(result.dtype)

    def _group(self, xl: Tensor, group: RankGroup) -> Tensor:
        """``s · (x Aᵀ) Bᵀ`` for the clients of one rank, on their unpadded slices."""
        owner = self._owner[0]
        A, B, scaling = owner.A[self.name], owner.B[self.name], owner.scaling[self.name]
        r = group.rank
        if group.stack_index is not None:
            A, B, scaling = (
                A.index_select(0, group.stack_index),
                B.index_select(0, group.stack_index),
                scaling.index_select(0, group.stack_index),
            )
        if group.row_index is not None:
            xl = xl.index_select(0, group.row_index)
        if A.shape[1] != r:
            A, B = A[:, :r], B[:, :, :r]  # (K_r, r, n), (K_r, m, r)
        h = torch.bmm(xl, A.transpose(1, 2))  # (K_r, bt, r)
        return torch.bmm(h, B.transpose(1, 2)) * scaling.view(-1, 1, 1)  # (K_r, bt, m)


@dataclass(frozen=True)
class RankGroup:
    """The clients of a batch that share one rank in one module.

    ``positions`` are their places among the batch's clients; ``row_index`` selects them from
    the batch (``None``: all of it) and ``stack_index`` from the stack (``None``: all of it).
    """

    rank: int
    positions: tuple[int, ...]
    row_index: Tensor | None
    stack_index: Tensor | None


class MultiLoRA:
    """The stacked factors of K clients for every adapted module, and their installation.

    Parameters
    ----------
    layers:
        Module name -> PEFT ``LoraLayer`` (``AdapterHost.layers``); replaced while installed.
    root:
        The module the names are relative to (``AdapterHost.peft.base_model.model``).
    ranks:
        Per client, module -> rank.
    scalings:
        Per client, module -> its LoRA scaling (alpha / r, or alpha / sqrt r).
    dropout:
        LoRA dropout probability (on the layer input, as PEFT applies it).
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        root: nn.Module,
        ranks: Sequence[Mapping[str, int]],
        scalings: Sequence[Mapping[str, float]],
        dropout: float,
    ) -> None:
        self.root = root
        self.peft_layers = dict(layers)
        self.ranks = [dict(r) for r in ranks]
        self.dropout = float(dropout)
        self.set_plan(BatchPlan(stacked=len(ranks)))
        self.A: dict[str, nn.Parameter] = {}
        self.B: dict[str, nn.Parameter] = {}
        self.scaling: dict[str, Tensor] = {}
        self.wrappers: dict[str, MultiLoRALinear] = {}
        for name, layer in self.peft_layers.items():
            base = layer.get_base_layer()  # type: ignore[operator]
            self.wrappers[name] = MultiLoRALinear(name, base, self)
            ref = layer.lora_A[next(iter(layer.lora_A))].weight  # type: ignore[index]
            device = ref.device
            r_max = max(r[name] for r in self.ranks)
            n = ref.shape[1]
            m = layer.lora_B[next(iter(layer.lora_B))].weight.shape[0]  # type: ignore[index]
            k = len(self.ranks)
            self.A[name] = nn.Parameter(torch.zeros(k, r_max, n, device=device))  # (K, r, n)
            self.B[name] = nn.Parameter(torch.zeros(k, m, r_max, device=device))  # (K, m, r)
            self.scaling[name] = torch.tensor(
                [float(s[name]) for s in scalings], device=device, dtype=torch.float32
            )  # (K,)

    # ------------------------------------------------------------------ factors in and out
    def load(self, k: int, factors: Mapping[str, LoRAFactors]) -> None:
        """Copy client ``k``'s starting factors into its slice (padding stays zero)."""
        with torch.no_grad():
            for name, A in self.A.items():
                f = factors[name]
                r = self.ranks[k][name]
                A[k, :r].copy_(f.A.to(A.dtype))  # (r, n)
                self.B[name][k, :, :r].copy_(f.B.to(A.dtype))  # (m, r)

    def read(self, k: int, alpha: float, use_rslora: bool) -> dict[str, LoRAFactors]:
        """Client ``k``'s factors at its own ranks (float32 CPU copies)."""
        out = {}
        with torch.no_grad():
            for name, A in self.A.items():
                r = self.ranks[k][name]
                out[name] = LoRAFactors(
                    A=A[k, :r].detach().to("cpu", torch.float32).clone(),  # (r, n)
                    B=self.B[name][k, :, :r].detach().to("cpu", torch.float32).clone(),  # (m, r)
                    alpha=alpha,
                    use_rslora=use_rslora,
                )
        return out

    def parameters(self, train_A: bool = True) -> list[nn.Parameter]:
        """The stacked trainable tensors, in module order (A then B per module)."""
        params: list[nn.Parameter] = []
        for name in self.A:
            self.A[name].requires_grad_(train_A)
            self.B[name].requires_grad_(True)
            params.extend([self.A[name], self.B[name]] if train_A else [self.B[name]])
        return params

    def keep(self, kept: Sequence[int]) -> None:
        """Drop the clients not in ``kept`` from every stack (they have finished)."""
        idx = list(kept)
        with torch.no_grad():
            for name in self.A:
                grad_a = self.A[name].requires_grad
                self.A[name] = nn.Parameter(self.A[name][idx].clone(), requires_grad=grad_a)
                self.B[name] = nn.Parameter(self.B[name][idx].clone())
                self.scaling[name] = self.scaling[name][idx].clone()
        self.ranks = [self.ranks[i] for i in idx]
        self.set_plan(
            BatchPlan(stacked=len(idx), generators=[self.plan.generators[i] for i in idx])
        )

    def set_plan(self, plan: BatchPlan) -> None:
        """The rows of the next forward pass."""
        self.plan = plan
        self._groups: dict[str, list[RankGroup]] = {}
        self._rng: dict[str, list[Tensor]] = {}  # layer -> generator states of its masks

    def groups(self, name: str) -> list[RankGroup]:
        """The batch's clients grouped by their rank in module ``name`` (memoised per plan)."""
        if name in self._groups:
            return self._groups[name]
        plan = self.plan
        device = self.A[name].device
        by_rank: dict[int, list[int]] = {}
        for j, client in enumerate(plan.active):
            by_rank.setdefault(self.ranks[client][name], []).append(j)
        out = []
        for rank, positions in by_rank.items():
            clients = [plan.active[j] for j in positions]
            rows = None if len(positions) == len(plan.active) else positions
            stack = None if clients == list(range(plan.stacked)) else clients
            out.append(
                RankGroup(
                    rank,
                    tuple(positions),
                    None if rows is None else torch.tensor(rows, device=device),
                    None if stack is None else torch.tensor(stack, device=device),
                )
            )
        self._groups[name] = out
        return out

    # ------------------------------------------------------------------ dropout
    def dropout_mask(self, name: str, x: Tensor, plan: BatchPlan) -> Tensor:
        """Per-client inverted-dropout masks, each from its own generator at its own width.

        A second call for the same layer and batch is gradient checkpointing recomputing the
        forward pass: it redraws the first call's masks from the generator states saved then
        (as ``torch.utils.checkpoint`` restores the global RNG for PEFT's dropout).
        """
        _, b, _, n = x.shape
        keep = 1.0 - self.dropout
        gens = [plan.generators[c] for c in plan.active]
        if name in self._rng:
            gens = [torch.Generator(g.device) for g in gens]
            for g, state in zip(gens, self._rng[name], strict=True):
                g.set_state(state)
        else:
            self._rng[name] = [g.get_state() for g in gens]
        mask = torch.ones_like(x)  # (K', b, t, n); padded positions are never read
        for j, (gen, width) in enumerate(zip(gens, plan.widths, strict=True)):
            drawn = torch.empty((b, width, n), dtype=x.dtype, device=x.device).bernoulli_(
                keep, generator=gen
            )  # (b, t_k, n): as F.dropout draws it on the CPU
            mask[j, :, :width] = drawn.div_(keep)
        return mask

    # ------------------------------------------------------------------ installation
    @contextmanager
    def installed(self) -> Iterator[None]:
        """Swap the PEFT layers for the multi-client ones; put them back on exit."""
        done: list[str] = []
        try:
            for name, wrapper in self.wrappers.items():
                parent, _, leaf = name.rpartition(".")
                setattr(self.root.get_submodule(parent) if parent else self.root, leaf, wrapper)
                done.append(name)
            yield
        finally:
            for name in done:
                parent, _, leaf = name.rpartition(".")
                holder = self.root.get_submodule(parent) if parent else self.root
                setattr(holder, leaf, self.peft_layers[name])
