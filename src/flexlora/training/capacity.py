"""How many clients fit in one batched pass (``train.parallel_clients = "auto"``).

A simple estimate, not a profiler: per client, its LoRA tensors (parameter, gradient and two
AdamW moments in float32, at the largest rank among the slots) plus the activations one
micro-batch keeps for the backward pass of a decoder-only transformer, against half the
memory free on the device (CUDA: ``mem_get_info``; CPU: the cgroup limit or ``MemAvailable``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flexlora.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["auto_parallel_clients", "client_bytes", "free_bytes"]


def client_bytes(
    model: Any,
    shapes: Mapping[str, tuple[int, int]],
    slot_ranks: Mapping[str, Mapping[str, int]],
    cfg: TrainConfig,
) -> int:
    """Bytes one more client adds to a batched pass: adapter state plus activations."""
    lora = sum(
        max(r[name] for r in slot_ranks.values()) * (m + n) for name, (m, n) in shapes.items()
    )
    adapter = 4 * 4 * lora  # fp32 parameter, gradient, exp_avg, exp_avg_sq
    c = model.config
    hidden = int(getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0) or 1)
    inter = int(getattr(c, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(c, "num_hidden_layers", 0) or getattr(c, "n_layer", 0) or 1)
    heads = int(getattr(c, "num_attention_heads", 0) or getattr(c, "n_head", 0) or 1)
    vocab = int(getattr(c, "vocab_size", 0) or 1)
    tokens = cfg.batch_size * cfg.cutoff_len
    elem = 2 if cfg.precision == "bf16" else 4
    per_token_layer = 16 * hidden + 4 * inter + 2 * heads * cfg.cutoff_len  # saved tensors
    activations = elem * tokens * layers * per_token_layer
    logits = 4 * 3 * tokens * vocab  # logits, their float copy, their gradient
    return adapter + activations + logits


def free_bytes(device: torch.device) -> int:
    """Memory a batched pass may use on ``device``: what is free now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    limit = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = int(text)
            break
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return min(available, limit) if limit else available


def auto_parallel_clients(
    model: Any,
    shapes: Mapping[str, tuple[int, int]],
    slot_ranks: Mapping[str, Mapping[str, int]],
    cfg: TrainConfig,
    clients_per_round: int,
) -> int:
    """As many clients as fit in half the free memory, between 1 and ``clients_per_round``."""
    device = next(model.parameters()).device
    need = client_bytes(model, shapes, slot_ranks, cfg)
    budget = free_bytes(device) // 2
    fit = int(budget // max(1, need))
    chosen = max(1, min(clients_per_round, fit))
    log.info(
        "train.parallel_clients=auto: %d (%.0f MiB a client, %.0f MiB budget)",
        chosen,
        need / 2**20,
        budget / 2**20,
    )
    return chosen
