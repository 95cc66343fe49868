"""SLoRA's stage 1 on a client: train a sparse additive delta on the adapted weights.

Each adapted linear layer ``y = x·Wᵀ`` gets ``y + x·ΔWᵀ`` with ΔW sparse: its entries at the
shared mask are a trainable ``(nnz,)`` tensor, the indices are fixed. It is a forward hook on
PEFT's base layer, added for the local run and removed after; the LoRA adapters are switched
off meanwhile, so stage 1 trains nothing else. ``x·ΔWᵀ`` is one ``torch.sparse.mm`` per layer
(O(nnz·tokens) work and memory, gradients for the values only); ΔW is never formed densely.
Under per-type densities ΔW sits on the union mask and the client trains only its own type's
entries (``positions``); the rest stay at the values the server sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from flexlora.config import TrainConfig
from flexlora.errors import InvalidUpdateError
from flexlora.methods.slora import SparseMask
from flexlora.training.adapters import AdapterHost
from flexlora.training.client import TokenizedExample, optimise

__all__ = ["SparseResult", "sparse_delta", "sparse_linear", "train_sparse"]


def sparse_linear(
    x: Tensor, mask: SparseMask, values: Tensor, indices: Tensor | None = None
) -> Tensor:
    """``x · ΔWᵀ`` for ΔW (m, n) holding ``values`` at ``mask``; x is (..., n), out (..., m).

    ``indices`` are the mask's (row, col) pairs (2, nnz) on the values' device, when cached.
    """
    m, n = mask.shape
    if indices is None:
        indices = torch.stack([mask.rows, mask.cols]).to(values.device)  # (2, nnz)
    delta = torch.sparse_coo_tensor(
        indices,
        values,
        (m, n),
        is_coalesced=True,
        check_invariants=False,
    )
    flat = x.reshape(-1, n).to(values.dtype)  # (b*t, n)
    out = torch.sparse.mm(delta, flat.T).T  # (b*t, m)
    return out.reshape(*x.shape[:-1], m)


@contextmanager
def sparse_delta(
    host: AdapterHost, masks: Mapping[str, SparseMask], values: Mapping[str, Tensor]
) -> Iterator[None]:
    """While inside, every adapted base layer outputs ``x·Wᵀ + x·ΔWᵀ`` (LoRA switched off)."""
    handles = []
    indices = {
        name: torch.stack([masks[name].rows, masks[name].cols]).to(values[name].device)
        for name in host.layers
    }  # (2, nnz) each, built once per local run

    def hook(name: str):
        def add(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            extra = sparse_linear(inputs[0], masks[name], values[name], indices[name])
            return output + extra.to(output.dtype)

        return add

    try:
        for name, layer in host.layers.items():
            handles.append(layer.get_base_layer().register_forward_hook(hook(name)))
        with host.adapters_disabled():
            yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class SparseResult:
    values: dict[str, Tensor]  # module -> (nnz,) float32 on the CPU
    train_loss: float
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)


class _Assembled(Mapping[str, Tensor]):
    """The union values a forward uses: the frozen start with the trained entries put in.

    ``values[name]`` is rebuilt at every forward (``index_put`` out of place, so the gradient
    reaches the trained ``(nnz_own,)`` parameter only): O(nnz) work and memory per layer.
    """

    def __init__(
        self,
        frozen: Mapping[str, Tensor],
        positions: Mapping[str, Tensor],
        params: Mapping[str, nn.Parameter],
    ) -> None:
        self.frozen, self.positions, self.params = frozen, positions, params

    def __getitem__(self, name: str) -> Tensor:
        return self.frozen[name].index_put((self.positions[name],), self.params[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def train_sparse(
    host: AdapterHost,
    masks: Mapping[str, SparseMask],
    start: Mapping[str, Tensor],
    examples: Sequence[TokenizedExample],
    cfg: TrainConfig,
    seed: int,
    pad_id: int,
    client: str = "?",
    positions: Mapping[str, Tensor] | None = None,
) -> SparseResult:
    """Train the masked entries from ``start`` (the global sparse update); return them.

    ``start`` holds the values at ``masks``; with ``positions`` (module -> indices into them:
    the client's own sub-mask) only those entries train and come back, the others stay as
    sent (a smaller rank type's client under per-type densities).
    """
    t0 = time.perf_counter()
    device = next(host.model.parameters()).device
    params: dict[str, nn.Parameter] = {}
    frozen: dict[str, Tensor] = {}
    for name in host.layers:
        if name not in start or name not in masks:
            raise InvalidUpdateError(client, name, "missing_module", "no sparse values")
        v = start[name]
        if tuple(v.shape) != (masks[name].nnz,):
            raise InvalidUpdateError(
                client, name, "shape", f"{tuple(v.shape)} values for a mask of {masks[name].nnz}"
            )
        v = v.detach().to(device, torch.float32)
        if positions is None:
            params[name] = nn.Parameter(v.clone())
        else:
            pos = positions[name].to(device)
            frozen[name] = v
            params[name] = nn.Parameter(v[pos].clone())
    for p in host.model.parameters():
        p.requires_grad_(False)
    values: Mapping[str, Tensor] = params
    if positions is not None:
        values = _Assembled(frozen, {n: positions[n].to(device) for n in params}, params)
    with sparse_delta(host, masks, values):
        losses, tokens, steps = optimise(
            host.model, list(params.values()), examples, cfg, seed, pad_id
        )
    return SparseResult(
        values={n: p.detach().to("cpu", torch.float32).clone() for n, p in params.items()},
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        tokens=tokens,
        seconds=time.perf_counter() - t0,
        losses=losses,
    )
