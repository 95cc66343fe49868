"""How many clients fit in one batched pass (``train.parallel_clients = "auto"``).

An estimate, not a profiler: what one more client adds to a batched pass is ``flexlora
plan``'s memory model (:func:`flexlora.plan.memory.client_bytes`: its float32 adapter,
gradients and optimizer state, and one micro-batch's activations, counted tensor by tensor,
at the configured precision and checkpointing) for the largest rank type, against half the
memory free on the device (CUDA: ``mem_get_info``; CPU: the cgroup limit or
``MemAvailable``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flexlora.config import RunConfig
from flexlora.plan.memory import client_bytes as plan_client_bytes
from flexlora.plan.shape import ModelShape, shape_of

log = logging.getLogger(__name__)

__all__ = ["auto_parallel_clients", "client_bytes", "free_bytes"]


def client_bytes(
    model: Any,
    slot_ranks: Mapping[str, Mapping[str, int]],
    cfg: RunConfig,
    shape: ModelShape | None = None,
) -> int:
    """Bytes one more client adds to a batched pass: the most any rank type needs
    (``shape``: the model's, when the caller has read it already)."""
    shape = shape or shape_of(model, list(cfg.lora.target_modules))
    return max(plan_client_bytes(shape, cfg, ranks) for ranks in slot_ranks.values())


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
    model: Any, slot_ranks: Mapping[str, Mapping[str, int]], cfg: RunConfig
) -> int:
    """As many clients as fit in half the free memory, between 1 and ``clients_per_round``;
    1 where the memory model does not cover the activations (a state-space model)."""
    shape = shape_of(model, list(cfg.lora.target_modules))
    if not shape.activations_modelled:
        log.warning(
            "train.parallel_clients=auto: 1 (the memory model does not cover %s's selective "
            "scan; set train.parallel_clients to batch its clients)",
            type(model).__name__,
        )
        return 1
    device = next(model.parameters()).device
    need = client_bytes(model, slot_ranks, cfg, shape)
    clients_per_round = cfg.federation.clients_per_round
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
