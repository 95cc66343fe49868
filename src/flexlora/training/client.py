"""One client's local LoRA training: tokenize, batch, optimise, return the factors.

Knows nothing of rounds or scheduling: it is given a slot of the :class:`AdapterHost`, starting
factors, examples and a seed, and returns the trained factors with a few metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from flexlora.config import TrainConfig
from flexlora.training.adapters import AdapterHost
from flexlora.training.pruning import SelfPruning, self_prune, tail_penalty
from flexlora.types import LoRAFactors

__all__ = [
    "LocalResult",
    "TokenizedExample",
    "collate",
    "make_scheduler",
    "optimise",
    "tokenize",
    "train_local",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def tokenize(
    tokenizer: object,
    prompt: str,
    response: str,
    cutoff_len: int,
    train_on_inputs: bool,
) -> TokenizedExample:
    """``prompt + response + EOS`` as at most ``cutoff_len`` ids, prompt labels masked.

    When too long, the response keeps at least half the budget (or all of it if shorter) and
    the prompt keeps its *end* (the input and the response marker), as evaluation does, so a
    long prompt never leaves an example with nothing to learn.
    """
    prompt_ids: list[int] = tokenizer(prompt, add_special_tokens=True)["input_ids"]  # type: ignore[operator]
    response_ids: list[int] = tokenizer(response, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    answer = response_ids + ([eos] if eos is not None else [])
    if len(prompt_ids) + len(answer) > cutoff_len:
        keep = min(len(answer), max(cutoff_len - len(prompt_ids), cutoff_len // 2))
        answer = answer[:keep]
        prompt_ids = (
            prompt_ids[len(prompt_ids) - (cutoff_len - keep) :] if cutoff_len > keep else []
        )
    ids = prompt_ids + answer
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + answer
    return TokenizedExample(ids, labels)


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a micro-batch; padded labels are ignored by the loss."""
    width = max(len(x.input_ids) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (b, t)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (b, t)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (b, t)
    for i, x in enumerate(batch):
        n = len(x.input_ids)
        ids[i, :n] = torch.tensor(x.input_ids)
        labels[i, :n] = torch.tensor(x.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, linear or cosine decay over the local run."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))


def lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each local step (shared with the batched path)."""
    warmup = max(0, cfg.warmup_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW of ``cfg``; ``auto`` is AdamW here (the drivers resolve it by the
    strategy's method first: :meth:`flexlora.config.RunConfig.client_train`)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def local_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps this round: ``local_steps``, or ``local_epochs`` over the client's data."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.local_epochs * num_examples / per_step))


def example_order(num_examples: int, needed: int, seed: int) -> list[int]:
    """Seeded reshuffled passes over the client's examples, as many as ``needed`` draws take."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < needed:
        order.extend(rng.permutation(num_examples).tolist())
    return order[:needed]


@dataclass
class LocalResult:
    factors: dict[str, LoRAFactors]
    train_loss: float
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    pruned: bool = False  # HetLoRA's self-pruning shrank the client's ranks this round


def optimise(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    examples: Sequence[TokenizedExample],
    cfg: TrainConfig,
    seed: int,
    pad_id: int,
    penalty: Callable[[], Tensor] | None = None,
) -> tuple[list[float], int, int]:
    """The local loop over ``params``: (loss per step, tokens seen, steps).

    Every random choice (example order, dropout) is drawn from ``seed``. Shared by LoRA
    training (:func:`train_local`) and SLoRA's sparse stage (:mod:`flexlora.training.sparse`).
    ``penalty`` (HetLoRA's self-pruning regulariser) is added to each step's objective, once
    per optimizer step, before clipping; the losses returned are the data loss alone.
    """
    model.train()
    steps = local_steps(cfg, len(examples))
    micro = cfg.batch_size
    order = example_order(len(examples), steps * cfg.grad_accum * micro, seed)
    torch.manual_seed(seed)  # LoRA dropout
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    device = next(iter(params)).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    losses: list[float] = []
    tokens = 0
    cursor = 0
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        batches = []
        for _ in range(cfg.grad_accum):
            batches.append(collate([examples[i] for i in order[cursor : cursor + micro]], pad_id))
            cursor += micro
        # every predicted token weighs the same across the micro-batches of one step, so
        # accumulation equals one large batch (HF's loss is a mean within a micro-batch)
        counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
        total = max(1, sum(counts))
        step_loss = 0.0
        for batch, count in zip(batches, counts, strict=True):
            tokens += int(batch["attention_mask"].sum())
            if count == 0:
                continue
            with autocast:
                out = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            loss = out.loss * (count / total)
            loss.backward()
            step_loss += float(loss.detach())
        if penalty is not None:
            penalty().backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(step_loss)
    model.eval()
    return losses, tokens, steps


def regulariser(
    weights: Sequence[tuple[Tensor, Tensor]], pruning: SelfPruning | None
) -> Callable[[], Tensor] | None:
    """λ times HetLoRA's tail penalty of the live ``(A (r, n), B (m, r))`` pairs (or ``None``)."""
    if pruning is None or pruning.weight == 0:
        return None
    pairs = [(A, B, int(A.shape[0])) for A, B in weights]
    weight, gamma = pruning.weight, pruning.gamma
    return lambda: weight * tail_penalty(pairs, gamma)


def train_local(
    host: AdapterHost,
    slot: str,
    start: dict[str, LoRAFactors],
    examples: Sequence[TokenizedExample],
    cfg: TrainConfig,
    seed: int,
    pad_id: int,
    train_A: bool = True,
    client: str = "?",
    pruning: SelfPruning | None = None,
) -> LocalResult:
    """Train the adapter in ``slot`` from ``start`` on ``examples``; return the new factors.

    Every random choice (example order, LoRA dropout) is drawn from ``seed``, so a client's
    work in a round is reproducible whatever ran before it. The client trains at the ranks of
    ``start``, at most the slot's (:meth:`AdapterHost.fit_slot`). With ``pruning`` (HetLoRA)
    its loss carries the tail regulariser and it may return its factors at pruned ranks
    (:mod:`flexlora.training.pruning`).
    """
    t0 = time.perf_counter()
    slot = host.fit_slot(slot, {name: f.rank for name, f in start.items()})
    host.load(slot, start, client=client)
    params = host.activate(slot, train_A=train_A)
    penalty = regulariser(host.weights(slot), pruning)
    losses, tokens, steps = optimise(host.model, params, examples, cfg, seed, pad_id, penalty)
    for p in params:
        p.requires_grad_(False)
    factors = host.read(slot)
    pruned = False
    if pruning is not None:
        factors, pruned = self_prune(start, factors, pruning)
    return LocalResult(
        factors=factors,
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        tokens=tokens,
        seconds=time.perf_counter() - t0,
        losses=losses,
        pruned=pruned,
    )
