"""LAPACK's ``?syevr`` (the top eigenpairs of a symmetric matrix) with the GIL released.

The server step decomposes modules side by side on worker threads
(:mod:`flexlora.aggregation.parallel`). For the top k of R eigenpairs, R in the thousands, MRRR
(``ssyevr`` with a subset of indices) is 1.4-1.8x faster than ``torch.linalg.eigh`` (divide and
conquer, every eigenvector): 137 against 227 ms for R = 1,106 and k = 232 on one thread. SciPy
has it, but its wrappers hold the GIL, so two workers' eigensolvers ran one after the other.
This calls the same routine through the function pointer that ``scipy.linalg.cython_lapack``
publishes for Cython users, with :mod:`ctypes`, which releases the GIL for a foreign call.

Nothing here is needed for correctness: :func:`top_eigh` returns ``None`` when SciPy (or the
pointer) is not there, and the caller uses torch. The BLAS threads of SciPy's OpenBLAS are the
caller's to set (``threadpoolctl``); the server step runs it on one.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["top_eigh"]

_INT = ctypes.POINTER(ctypes.c_int)
_CHAR = ctypes.c_char_p


@functools.cache
def _syevr(dtype: torch.dtype) -> Callable[..., None] | None:
    """The ``ssyevr`` / ``dsyevr`` of SciPy's LAPACK as a ctypes function, or None."""
    try:
        from scipy.linalg import cython_lapack
    except ImportError:
        return None
    name = {torch.float32: "ssyevr", torch.float64: "dsyevr"}[dtype]
    capsule = getattr(cython_lapack, "__pyx_capi__", {}).get(name)
    if capsule is None:
        return None
    api = ctypes.PyDLL(None)  # a handle of our own: ctypes.pythonapi's signatures stay as they are
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    if not pointer:
        return None
    real = ctypes.POINTER(ctypes.c_float if dtype == torch.float32 else ctypes.c_double)
    # jobz, range, uplo, n, a, lda, vl, vu, il, iu, abstol, m, w, z, ldz, isuppz, work, lwork,
    # iwork, liwork, info: the Fortran interface, every argument by reference
    proto = ctypes.CFUNCTYPE(
        None, _CHAR, _CHAR, _CHAR, _INT, real, _INT, real, real, _INT, _INT, real, _INT,
        real, real, _INT, _INT, real, _INT, _INT, _INT, _INT,
    )  # fmt: skip
    return proto(pointer)


def top_eigh(M: Tensor, count: int) -> tuple[Tensor, Tensor] | None:
    """The ``count`` largest eigenpairs of a symmetric float32 or float64 CPU matrix ``M``
    (R, R): eigenvalues (count,) and eigenvectors (R, count), both in ascending order.

    ``None`` when SciPy's LAPACK cannot be reached this way or LAPACK reports a failure: the
    caller then uses ``torch.linalg.eigh``. Holds a copy of M (LAPACK overwrites it), the
    eigenvectors and LAPACK's workspace (about 26·R numbers).
    """
    if M.device.type != "cpu" or M.dtype not in (torch.float32, torch.float64):
        return None
    fn = _syevr(M.dtype)
    R = M.shape[0]
    if fn is None or not 0 < count <= R:
        return None
    real = ctypes.POINTER(ctypes.c_float if M.dtype == torch.float32 else ctypes.c_double)
    scalar = ctypes.c_float if M.dtype == torch.float32 else ctypes.c_double

    def ptr(t: Tensor, kind: type = real) -> ctypes._Pointer:
        return ctypes.cast(t.data_ptr(), kind)

    def ref(v: int) -> ctypes._Pointer:
        return ctypes.pointer(ctypes.c_int(v))

    a = M.contiguous().clone()  # symmetric: row-major is its own column-major; overwritten
    w = torch.empty(R, dtype=M.dtype)  # (R,) eigenvalues, the first `found` ascending
    z = torch.empty(count, R, dtype=M.dtype)  # Fortran (R, count), ldz = R
    isuppz = torch.empty(2 * count, dtype=torch.int32)
    found, info = ctypes.c_int(0), ctypes.c_int(0)
    zero = scalar(0.0)
    work_size = torch.empty(1, dtype=M.dtype)
    iwork_size = torch.empty(1, dtype=torch.int32)
    work, iwork = work_size, iwork_size
    for query in (True, False):  # a workspace query first (lwork = liwork = -1)
        if not query:
            work = torch.empty(int(work_size.item()), dtype=M.dtype)
            iwork = torch.empty(int(iwork_size.item()), dtype=torch.int32)
        fn(
            b"V", b"I", b"L", ref(R), ptr(a), ref(R), ctypes.byref(zero), ctypes.byref(zero),
            ref(R - count + 1), ref(R), ctypes.byref(zero), ctypes.byref(found), ptr(w), ptr(z),
            ref(R), ptr(isuppz, _INT), ptr(work), ref(-1 if query else work.numel()),
            ptr(iwork, _INT), ref(-1 if query else iwork.numel()), ctypes.byref(info),
        )  # fmt: skip
        if info.value != 0:
            return None
    if found.value != count:
        return None
    return w[:count], z.T  # (count,), (R, count)
