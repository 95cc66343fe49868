"""Per-module work in parallel on the CPU: one module per core, one BLAS thread each.

The server step decomposes every adapted module independently. On two cores, one product
or eigensolver on two threads scales poorly (the tridiagonal reduction of an eigensolver is
bound by one core's memory traffic; torch's OpenMP waiters sleep between LAPACK's many small
calls), while two modules on one thread each run at twice the rate: measured on two cores,
``torch.linalg.eigh`` of two 1,424² matrices took 0.10 s each side by side against 0.19 s one
after the other. torch releases the GIL in its kernels, so Python threads are enough.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["map_modules", "module_workers"]

T = TypeVar("T")
R = TypeVar("R")


def module_workers(device: torch.device | str, count: int) -> int:
    """How many modules to decompose at once: torch's CPU threads (1 on another device)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), count))


def map_modules(
    fn: Callable[[str, T], R], items: Mapping[str, T], device: torch.device | str = "cpu"
) -> dict[str, R]:
    """``{name: fn(name, item)}``, in ``items``' order, up to :func:`module_workers` at once.

    While workers run, torch computes on one thread each (``torch.set_num_threads(1)``,
    restored after), so each module's result is what a one-thread run gives, whatever the
    scheduling. Holds the workspaces of that many modules at a time; the first error raised
    by ``fn`` propagates once every started module is done.
    """
    workers = module_workers(device, len(items))
    if workers < 2:
        return {name: fn(name, item) for name, item in items.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="flexlora-module") as pool:
            futures = {name: pool.submit(fn, name, item) for name, item in items.items()}
            return {name: f.result() for name, f in futures.items()}
    finally:
        torch.set_num_threads(threads)
