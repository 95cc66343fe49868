"""Optimizers and gradient clipping over stacked per-client tensors ``(K, ...)``.

Every client owns slice ``k`` of each tensor. The updates repeat ``torch.optim.AdamW`` and
``torch.optim.SGD`` (single-tensor path) operation by operation, with the per-client learning
rate broadcast over the slice, so slice ``k`` moves exactly as client ``k``'s own optimizer would
move its own tensor. All stacked clients step together (a finished client leaves the stack),
so the step count and the bias corrections are shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flexlora.config import TrainConfig

__all__ = ["StackedOptimizer", "clip_per_client"]


def _per_client(values: Sequence[float], like: Tensor) -> Tensor:
    """Python floats (computed in double, as torch does) as a ``(K, 1, ..., 1)`` tensor."""
    shape = (len(values),) + (1,) * (like.dim() - 1)
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(shape)


def clip_per_client(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """``clip_grad_norm_`` applied to each client's slices on their own; returns the norms."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    dims = [tuple(range(1, g.dim())) for g in grads]
    norms = torch.stack(
        [torch.linalg.vector_norm(g, 2.0, dim=d) for g, d in zip(grads, dims, strict=True)]
    )  # (P, K): each tensor's norm per client
    total = torch.linalg.vector_norm(norms, 2.0, dim=0)  # (K,)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # (K,)
    for g in grads:
        g.mul_(coef.view((-1,) + (1,) * (g.dim() - 1)))
    return total


class StackedOptimizer:
    """AdamW or SGD (with momentum and weight decay) of ``train.optimizer`` on stacked params."""

    def __init__(self, params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> None:
        self.params = list(params)
        self.kind = cfg.optimizer
        self.weight_decay = cfg.weight_decay
        self.momentum = cfg.momentum
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8  # torch.optim.AdamW's defaults
        self.step_count = 0
        self.state: list[dict[str, Tensor]] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lrs: Sequence[float]) -> None:
        """One step; ``lrs[k]`` is client k's learning rate at this step."""
        self.step_count += 1
        for p, state in zip(self.params, self.state, strict=True):
            if p.grad is None:
                continue
            if self.kind == "sgd":
                self._sgd(p, p.grad, state, lrs)
            else:
                self._adamw(p, p.grad, state, lrs)

    def _adamw(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lrs: Sequence[float]):
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        same = all(lr == lrs[0] for lr in lrs)
        if self.weight_decay != 0:
            if same:
                p.mul_(1 - lrs[0] * self.weight_decay)
            else:
                p.mul_(_per_client([1 - lr * self.weight_decay for lr in lrs], p))
        exp_avg.lerp_(grad, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias_correction1 = 1 - self.beta1**self.step_count
        bias_correction2_sqrt = (1 - self.beta2**self.step_count) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        if same:
            p.addcdiv_(exp_avg, denom, value=-(lrs[0] / bias_correction1))
        else:  # addcdiv's value * t1 / t2, with a per-client value
            step = _per_client([-(lr / bias_correction1) for lr in lrs], p)
            p.add_(exp_avg * step / denom)

    def _sgd(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lrs: Sequence[float]):
        if self.weight_decay != 0:
            grad = grad.add(p, alpha=self.weight_decay)
        if self.momentum != 0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = grad.detach().clone()
            else:
                state["momentum_buffer"].mul_(self.momentum).add_(grad)
            grad = state["momentum_buffer"]
        if all(lr == lrs[0] for lr in lrs):
            p.add_(grad, alpha=-lrs[0])
        else:
            p.sub_(grad * _per_client(list(lrs), p))

    def keep(self, kept: Sequence[int], params: Sequence[torch.nn.Parameter]) -> None:
        """Follow :meth:`MultiLoRA.keep`: the remaining clients' state, on the new tensors."""
        idx = list(kept)
        self.params = list(params)
        self.state = [{key: v[idx].clone() for key, v in s.items()} for s in self.state]
