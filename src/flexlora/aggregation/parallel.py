"""Per-module work in parallel on the CPU: one module per core, one BLAS thread each.

The server step decomposes every adapted module independently. On two cores, one product
or eigensolver on two threads scales poorly (the tridiagonal reduction of an eigensolver is
bound by one core's memory traffic; torch's OpenMP waiters sleep between LAPACK's many small
calls), while two modules on one thread each run at twice the rate: measured on two cores,
``torch.linalg.eigh`` of two 1,424² matrices took 0.10 s each side by side against 0.19 s one
after the other. torch releases the GIL in its kernels, and so does the LAPACK binding of
:mod:`flexlora.lora.lapack`, so Python threads are enough.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

__all__ = ["map_modules", "module_workers", "one_blas_thread"]

T = TypeVar("T")
R = TypeVar("R")


def module_workers(device: torch.device | str, count: int) -> int:
    """How many modules to decompose at once: torch's CPU threads (1 on another device)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), count))


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS libraries, SciPy's OpenBLAS among them (made
    once: building it scans every loaded library); None without SciPy or threadpoolctl."""
    try:
        import scipy.linalg.cython_lapack  # noqa: F401 - loads SciPy's OpenBLAS first
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def one_blas_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """The BLAS libraries threadpoolctl finds outside torch (SciPy's OpenBLAS, which the
    LAPACK eigensolvers use, and NumPy's) on one thread inside the block, for a server step
    on the CPU; on another ``device`` nothing is changed (and nothing is scanned).

    Process-wide, so it is set once around a parallel map rather than by each worker: two
    workers setting and restoring it in turn would race. A second OpenBLAS thread gained
    10-25 % in an eigensolver, but its spinning waiters slowed every torch product after it.
    """
    controller = _blas_controller() if torch.device(device).type == "cpu" else None
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def map_modules(
    fn: Callable[[str, T], R],
    items: Mapping[str, T],
    device: torch.device | str = "cpu",
    cost: Callable[[T], float] | None = None,
) -> dict[str, R]:
    """``{name: fn(name, item)}``, in ``items``' order, up to :func:`module_workers` at once.

    With ``cost`` (a relative estimate of each item's work) the items start from the most
    costly down, so that the last ones to finish are small and the workers end together
    (longest processing time first); results still come in ``items``' order. While workers
    run, torch computes on one thread each (``torch.set_num_threads(1)``, restored after), so
    each module's result is what a one-thread run gives, whatever the scheduling. Holds the
    workspaces of that many modules at a time; the first error raised by ``fn``, in
    ``items``' order, propagates once every started module is done.
    """
    workers = module_workers(device, len(items))
    if workers < 2:
        return {name: fn(name, item) for name, item in items.items()}
    order = list(items) if cost is None else sorted(items, key=lambda n: -cost(items[n]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="flexlora-module") as pool:
            futures = {name: pool.submit(fn, name, items[name]) for name in order}
            return {name: futures[name].result() for name in items}
    finally:
        torch.set_num_threads(threads)
