"""K clients' local training in one batched pass: :func:`train_local`'s semantics, per client.

Each step concatenates the stacked clients' micro-batches (padded on the right to a common
width, which changes nothing for a causal model) and runs the model once through
:class:`~flexlora.training.multi.MultiLoRA`. Per client, exactly as :func:`train_local`:

1. the same example order (``example_order`` from the client's seed) and micro-batches;
2. its loss is its own token-weighted mean over its micro-batches of the step (the sum over
   clients is back-propagated, so no client's gradient sees another's rows); a micro-batch
   with no predicted token is skipped, as the sequential loop skips it;
3. its gradient is clipped by the norm of its own slices, its learning rate follows its own
   schedule and its optimizer state is its own slice (:class:`StackedOptimizer`);
4. its LoRA dropout is drawn from its own generator seeded with its seed;
5. a client that has made its number of local steps leaves the stack.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flexlora.config import TrainConfig
from flexlora.errors import UsageError
from flexlora.training.adapters import AdapterHost
from flexlora.training.client import (
    IGNORE_INDEX,
    LocalResult,
    collate,
    example_order,
    local_steps,
    lr_factor,
)
from flexlora.training.multi import BatchPlan, MultiLoRA
from flexlora.training.pruning import SelfPruning, self_prune, tail_penalty
from flexlora.training.stacked import StackedOptimizer, clip_per_client
from flexlora.types import LoRAFactors

__all__ = ["ClientJob", "check_no_base_dropout", "client_losses", "train_many"]


@dataclass(frozen=True)
class ClientJob:
    """One client's work in a round: its slot, starting factors, examples and seed."""

    client: str
    slot: str
    start: Mapping[str, LoRAFactors]
    examples: Sequence[Any]
    seed: int


@dataclass
class _Progress:
    """A stacked client's running state."""

    job: ClientJob
    steps: int
    order: list[int]
    factor: Any
    cursor: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)


def _concat(batches: Sequence[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """The clients' micro-batches as one batch, right-padded to the widest."""
    width = max(int(b["input_ids"].shape[1]) for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {
        key: torch.cat(
            [
                torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=value)
                for b in batches
            ]
        )  # (K' * b, t)
        for key, value in fill.items()
    }


def client_losses(logits: Tensor, labels: Tensor, clients: int) -> Tensor:
    """Each client's mean next-token loss over its own rows, as HF's causal-LM loss has it."""
    logits = logits.float()  # (R, t, V)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (R, t)
    per_token = torch.nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )  # (R * t,)
    sums = per_token.view(clients, -1).sum(1)  # (K',)
    counts = (shifted != IGNORE_INDEX).view(clients, -1).sum(1)  # (K',)
    return sums / counts.clamp(min=1)


def train_many(
    host: AdapterHost,
    jobs: Sequence[ClientJob],
    cfg: TrainConfig,
    pad_id: int,
    train_A: bool = True,
    pruning: SelfPruning | None = None,
) -> list[LocalResult]:
    """Train every job's client from its start factors, all in one batched pass per step.

    Each client trains at the ranks of its start factors (at most its slot's, see
    :meth:`AdapterHost.fit_slot`). With ``pruning`` each client's objective carries its own
    tail regulariser and it may prune, as :func:`train_local` does. Returns one
    :class:`LocalResult` per job, in order; a client's ``seconds`` is the time until it left
    the stack.
    """
    t0 = time.perf_counter()
    check_no_base_dropout(host)
    for job in jobs:
        if not job.examples:
            raise RuntimeError(f"client {job.client} has no training examples")
        host.check_fit(job.slot, job.start, client=job.client)
    multi = MultiLoRA(
        host.layers,
        host.model.base_model.model,
        [{m: j.start[m].rank for m in host.layers} for j in jobs],
        [{m: j.start[m].scaling for m in host.layers} for j in jobs],
        host.dropout,
    )
    for k, job in enumerate(jobs):
        multi.load(k, job.start)
    device = next(iter(multi.A.values())).device
    micro, accum = cfg.batch_size, cfg.grad_accum
    progress = []
    for job in jobs:
        steps = local_steps(cfg, len(job.examples))
        order = example_order(len(job.examples), steps * accum * micro, job.seed)
        progress.append(_Progress(job, steps, order, lr_factor(cfg, steps)))
    multi.plan.generators = [torch.Generator(device).manual_seed(j.seed) for j in jobs]
    params = multi.parameters(train_A)
    optimizer = StackedOptimizer(params, cfg)
    model = host.model
    net = model.get_base_model()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    alive = list(range(len(jobs)))  # job index of each stacked client, in stack order
    results: list[LocalResult | None] = [None] * len(jobs)
    step = 0
    model.train()
    try:
        with multi.installed():
            while alive:
                optimizer.zero_grad()
                batches, counts, step_loss = [], [], [0.0] * len(alive)
                for c in alive:
                    p = progress[c]
                    mine = []
                    for _ in range(accum):
                        ids = p.order[p.cursor : p.cursor + micro]
                        mine.append(collate([p.job.examples[i] for i in ids], pad_id))
                        p.cursor += micro
                    batches.append(mine)
                    counts.append([int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in mine])
                totals = [max(1, sum(c)) for c in counts]
                for j in range(accum):
                    for s, c in enumerate(alive):
                        progress[c].tokens += int(batches[s][j]["attention_mask"].sum())
                    active = [s for s in range(len(alive)) if counts[s][j] > 0]
                    if not active:
                        continue
                    batch = _concat([batches[s][j] for s in active], pad_id)
                    multi.set_plan(
                        BatchPlan(
                            rows=micro,
                            active=active,
                            widths=[int(batches[s][j]["input_ids"].shape[1]) for s in active],
                            generators=multi.plan.generators,
                            stacked=len(alive),
                        )
                    )
                    with autocast:
                        logits = net(
                            input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device),
                            use_cache=False,
                        ).logits  # (K' b, t, V)
                    losses = client_losses(logits, batch["labels"].to(device), len(active))
                    weights = [counts[s][j] / totals[s] for s in active]
                    weighted = losses * torch.tensor(weights, device=device)  # (K',)
                    weighted.sum().backward()
                    for s, value in zip(active, weighted.detach().tolist(), strict=True):
                        step_loss[s] += value
                if pruning is not None and pruning.weight > 0:
                    _penalty(multi, pruning).backward()
                if cfg.max_grad_norm > 0:
                    clip_per_client(params, cfg.max_grad_norm)
                optimizer.step([cfg.lr * progress[c].factor(step) for c in alive])
                step += 1
                for s, c in enumerate(alive):
                    progress[c].losses.append(step_loss[s])
                done = [s for s, c in enumerate(alive) if progress[c].steps == step]
                for s in done:
                    results[alive[s]] = _result(progress[alive[s]], multi, s, host, t0, pruning)
                if done:
                    kept = [s for s in range(len(alive)) if s not in done]
                    alive = [alive[s] for s in kept]
                    if alive:
                        multi.keep(kept)
                        params = multi.parameters(train_A)
                        optimizer.keep(kept, params)
    finally:
        model.eval()
    return [r for r in results if r is not None]


def check_no_base_dropout(host: AdapterHost) -> None:
    """Refuse a base model with dropout of its own (a module, or a config probability applied
    functionally): one mask stream would be drawn across all clients' rows."""
    net = host.model.get_base_model()
    lora = {id(d) for layer in host.layers.values() for d in layer.lora_dropout.values()}
    active = [
        name
        for name, mod in net.named_modules()
        if isinstance(mod, torch.nn.Dropout) and mod.p > 0 and id(mod) not in lora
    ]
    functional = _config_dropouts(net.config)
    if active or functional:
        where = (
            active[0] if active else ", ".join(f"config.{k}={v:g}" for k, v in functional.items())
        )
        raise UsageError(
            f"batched clients (train.parallel_clients > 1) need a base model without dropout "
            f"of its own ({where}): its masks could not follow each client's seed; set the "
            f"model's dropout to 0 or use train.parallel_clients = 1"
        )


#: dropout keys of a config that no causal LM's forward applies (classification heads only)
_HEAD_DROPOUTS = frozenset({"classifier_dropout", "summary_first_dropout"})


def _config_dropouts(config: object) -> dict[str, float]:
    """The config's non-zero dropout probabilities (``*dropout``, ``*pdrop``): most models
    apply them with ``F.dropout`` (OPT's ``dropout``, attention dropout), no module to find."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = text.to_dict() if hasattr(text, "to_dict") else dict(vars(text))
    return {
        k: float(v)
        for k, v in values.items()
        if k.endswith(("dropout", "pdrop"))
        and k not in _HEAD_DROPOUTS
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and v > 0
    }


def _penalty(multi: MultiLoRA, pruning: SelfPruning) -> Tensor:
    """λ·Σ_k (client k's tail penalty on its own slices): each client's gradient is its own."""
    pairs = (
        (multi.A[name][k], multi.B[name][k], ranks[name])
        for k, ranks in enumerate(multi.ranks)
        for name in multi.A
    )
    return pruning.weight * tail_penalty(pairs, pruning.gamma)


def _result(
    p: _Progress,
    multi: MultiLoRA,
    s: int,
    host: AdapterHost,
    t0: float,
    pruning: SelfPruning | None,
) -> LocalResult:
    factors = multi.read(s, host.alpha, host.use_rslora)
    pruned = False
    if pruning is not None:
        factors, pruned = self_prune(p.job.start, factors, pruning)
    return LocalResult(
        factors=factors,
        train_loss=float(np.mean(p.losses)) if p.losses else float("nan"),
        steps=p.steps,
        tokens=p.tokens,
        seconds=time.perf_counter() - t0,
        losses=list(p.losses),
        pruned=pruned,
    )
