"""LoRA factors and global updates <-> Flower ``ArrayRecord`` (numpy arrays, never pickle).

Flower checks that replies carry the same *keys*, never that arrays have the shapes the
server expects; everything decoded here is checked (keys, dtype, 2-D, A/B ranks agree), and a
fault raises :class:`~flexlora.errors.InvalidUpdateError` naming the client and the module.
Shapes and ranks against the round's expectations are the Coordinator's validator's job.

Arrays are npy payloads read without pickle, header first: the bytes after the header must
be exactly what its shape and dtype declare, so a short, long or hostile payload is refused
before anything is allocated, and an accepted array is a view of the message's bytes. Float
arrays are float16, float32 or float64 (:data:`FLOAT_DTYPES`); one in the other byte order
(``>f4`` from a big-endian host) is the same numbers and is converted to this machine's order,
while every other dtype (longdouble, complex, integers, bool, strings, structured) is refused
as ``dtype``, an object array (a pickle) as ``type``. bfloat16 has no npy type, so it cannot
travel here (the ClientApp sends float32 factors).

Keys: ``<module>.lora_A`` ``(r, n)`` / ``<module>.lora_B`` ``(m, r)`` for factors;
``<module>.U`` ``(m, k)``, ``.S`` ``(k,)``, ``.Vh`` ``(k, n)`` and ``.truncation`` (a one-element
uint8 code) for a :class:`~flexlora.types.GlobalUpdate`; ``<module>.values`` ``(nnz,)`` for
SLoRA's sparse stage (the values at the shared mask; the mask itself is rebuilt from the seed).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from numpy.lib import format as npy_format

from flexlora.errors import InvalidUpdateError
from flexlora.types import FROZEN_PREFIX, TRUNCATIONS, GlobalUpdate, LoRAFactors, ModuleDelta

__all__ = [
    "factors_to_record",
    "record_bytes",
    "record_to_factors",
    "record_to_state",
    "record_to_values",
    "state_to_record",
    "values_to_record",
]

#: the float dtypes an array may have (either byte order): what torch reads from numpy
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

FACTOR_SUFFIXES = (".lora_A", ".lora_B")
STATE_SUFFIXES = (".U", ".S", ".Vh", ".truncation")


def _array(t: torch.Tensor) -> Array:
    return Array(t.detach().cpu().contiguous().numpy())


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialized arrays (what travels, npy headers included)."""
    return sum(len(a.data) for a in record.values())


def factors_to_record(factors: Mapping[str, LoRAFactors]) -> ArrayRecord:
    """One array per factor: ``<module>.lora_A`` (r, n) and ``<module>.lora_B`` (m, r)."""
    record = ArrayRecord()
    for name, f in factors.items():
        record[name + ".lora_A"] = _array(f.A)  # (r, n)
        record[name + ".lora_B"] = _array(f.B)  # (m, r)
    return record


def _numpy(record: ArrayRecord, key: str, client: str, module: str) -> np.ndarray:
    """``record[key]`` read as an npy payload (never unpickled), or an error naming client and
    module: whatever a malformed payload makes numpy raise (a truncated or garbled header, an
    empty payload) is a ``type`` fault of this reply, never an error of the round.

    The header is parsed first and the bytes after it must be exactly shape x itemsize: a
    payload shorter or longer than its header says (a truncated or hostile message) is refused
    before anything the header's size is allocated, as is an object dtype (a pickle). Holds a
    read-only view of the payload's own bytes (no copy).
    """
    try:
        return _decode_npy(record[key])
    except _PayloadError as exc:
        raise InvalidUpdateError(client, module, "type", f"{key}: {exc}") from None
    except Exception as exc:  # untrusted bytes: every way numpy fails on them
        detail = f"{key} cannot be read as an npy array: {type(exc).__name__}: {exc}"
        raise InvalidUpdateError(client, module, "type", detail) from None


class _PayloadError(ValueError):
    """A well-formed npy header whose payload does not match it (size, dtype, version)."""


def _decode_npy(array: Array) -> np.ndarray:
    """The npy payload of ``array`` as a read-only array over its bytes (shape from the header).

    Raises :class:`_PayloadError` for what the header says that this decoder refuses, and
    whatever :mod:`numpy.lib.format` raises for a header it cannot parse.
    """
    if array.stype != SType.NUMPY:
        raise _PayloadError(f"serialization type {array.stype!r}, not {SType.NUMPY!r}")
    data = array.data
    fp = io.BytesIO(data)  # shares ``data`` (read only)
    version = npy_format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(fp)
    else:  # 3.0 only adds utf-8 field names (structured dtypes, refused anyway)
        raise _PayloadError(f"npy format version {version[0]}.{version[1]} is not read")
    if dtype.hasobject:
        raise _PayloadError(f"dtype {dtype} holds Python objects (a pickle); never unpickled")
    if any(d < 0 for d in shape):
        raise _PayloadError(f"the header declares a negative shape {shape}")
    offset = fp.tell()
    count = math.prod(shape)
    declared = count * dtype.itemsize  # Python ints: no overflow
    body = len(data) - offset
    if body != declared:
        what = "short" if body < declared else "long"
        raise _PayloadError(
            f"payload too {what}: the header declares shape {shape} of {dtype} "
            f"({declared} bytes) but {body} bytes follow it"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)  # a view: no copy
    if fortran:
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def _tensor(record: ArrayRecord, key: str, client: str, module: str) -> torch.Tensor:
    """A float tensor from ``record[key]``, or an error naming client and module.

    float16/32/64 in either byte order (:data:`FLOAT_DTYPES`), converted to native order;
    any other dtype, or a conversion torch refuses, is a ``dtype`` fault naming the dtype.
    Holds a view of the payload's bytes and one native, writable copy, which the tensor shares.
    """
    arr = _numpy(record, key, client, module)
    dtype = arr.dtype
    native = dtype.newbyteorder("=")  # ">f4" -> "float32"; a non-native longdouble stays one
    if dtype.kind != "f" or native not in FLOAT_DTYPES:
        allowed = "float16, float32 or float64"
        detail = f"{key} has dtype {dtype} ({dtype.str}), not {allowed}"
        raise InvalidUpdateError(client, module, "dtype", detail)
    try:  # the one copy: writable (the payload's bytes are not) and in this machine's byte order
        return torch.from_numpy(arr.astype(native, copy=True))
    except (TypeError, ValueError, RuntimeError) as exc:
        detail = f"{key} of dtype {dtype} ({dtype.str}) cannot become a tensor: {exc}"
        raise InvalidUpdateError(client, module, "dtype", detail) from None


def _group(
    record: ArrayRecord, suffixes: tuple[str, ...], client: str
) -> dict[str, dict[str, str]]:
    """Module name -> {suffix: key}; a key with no known suffix is an error."""
    modules: dict[str, dict[str, str]] = {}
    for key in record:
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None or len(key) == len(suffix):
            raise InvalidUpdateError(
                client, None, "extra_module", f"unexpected array {key!r} (not <module>{suffixes})"
            )
        modules.setdefault(key[: -len(suffix)], {})[suffix] = key
    for name, keys in modules.items():
        missing = [s for s in suffixes if s not in keys]
        if missing:
            raise InvalidUpdateError(client, name, "missing_module", f"no {name}{missing[0]}")
    return modules


def record_to_factors(
    record: ArrayRecord, client: str, alpha: float, use_rslora: bool = False
) -> dict[str, LoRAFactors]:
    """Decode what :func:`factors_to_record` wrote; structural faults raise, naming ``client``."""
    out: dict[str, LoRAFactors] = {}
    for name, keys in _group(record, FACTOR_SUFFIXES, client).items():
        A = _tensor(record, keys[".lora_A"], client, name)  # (r, n)
        B = _tensor(record, keys[".lora_B"], client, name)  # (m, r)
        if A.ndim != 2 or B.ndim != 2:
            detail = f"lora_A is {A.ndim}-D and lora_B {B.ndim}-D; both must be 2-D"
            raise InvalidUpdateError(client, name, "ndim", detail)
        try:
            out[name] = LoRAFactors(A=A, B=B, alpha=alpha, use_rslora=use_rslora)
        except ValueError as exc:
            raise InvalidUpdateError(client, name, "shape", str(exc)) from None
    return out


def state_to_record(state: GlobalUpdate) -> ArrayRecord:
    """The global update's thin factors per module, with its truncation rule as a code.

    The frozen part (FedEx-LoRA's residual) travels under keys prefixed ``frozen:``.
    """
    record = ArrayRecord()
    for prefix, part in (("", state.modules), (FROZEN_PREFIX, state.frozen)):
        for name, d in part.items():
            record[prefix + name + ".U"] = _array(d.U)  # (m, k)
            record[prefix + name + ".S"] = _array(d.S)  # (k,)
            record[prefix + name + ".Vh"] = _array(d.Vh)  # (k, n)
            code = np.array([TRUNCATIONS.index(d.truncation)], dtype=np.uint8)
            record[prefix + name + ".truncation"] = Array(code)
    return record


def record_to_state(record: ArrayRecord, strategy: str, sender: str = "server") -> GlobalUpdate:
    """Decode what :func:`state_to_record` wrote (``sender`` names the source in errors)."""
    own = [k for k in record if not k.startswith(FROZEN_PREFIX)]
    modules = _record_modules(record, own, sender)
    frozen = _record_modules(record, [k for k in record if k not in own], sender)
    return GlobalUpdate(
        modules=modules,
        strategy=strategy,
        frozen={name[len(FROZEN_PREFIX) :]: d for name, d in frozen.items()},
    )


def _record_modules(record: ArrayRecord, keys: list[str], sender: str) -> dict[str, ModuleDelta]:
    """The :class:`ModuleDelta` of each module whose arrays are under ``keys``."""
    record = {key: record[key] for key in keys}  # type: ignore[assignment]
    modules: dict[str, ModuleDelta] = {}
    for name, keys in _group(record, STATE_SUFFIXES, sender).items():
        code = _numpy(record, keys[".truncation"], sender, name)
        if code.shape != (1,) or code.dtype != np.uint8 or int(code[0]) >= len(TRUNCATIONS):
            raise InvalidUpdateError(sender, name, "type", f"bad truncation code {code!r}")
        try:
            modules[name] = ModuleDelta(
                U=_tensor(record, keys[".U"], sender, name),  # (m, k)
                S=_tensor(record, keys[".S"], sender, name),  # (k,)
                Vh=_tensor(record, keys[".Vh"], sender, name),  # (k, n)
                truncation=TRUNCATIONS[int(code[0])],
            )
        except ValueError as exc:
            raise InvalidUpdateError(sender, name, "shape", str(exc)) from None
    return modules


def values_to_record(values: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """SLoRA's stage-1 message: ``<module>.values`` (nnz,) per module, nothing else."""
    record = ArrayRecord()
    for name, v in values.items():
        record[name + ".values"] = _array(v)  # (nnz,)
    return record


def record_to_values(record: ArrayRecord, sender: str) -> dict[str, torch.Tensor]:
    """Decode what :func:`values_to_record` wrote: 1-D float arrays, named by module."""
    out: dict[str, torch.Tensor] = {}
    for name, keys in _group(record, (".values",), sender).items():
        v = _tensor(record, keys[".values"], sender, name)  # (nnz,)
        if v.ndim != 1:
            raise InvalidUpdateError(sender, name, "ndim", f"values are {v.ndim}-D, not 1-D")
        out[name] = v
    return out
