"""Crash-safe checkpoints of a run: safetensors for tensors, JSON for the rest, no pickle.

Layout under ``DIR/checkpoint/``: ``global-RRRRRR.safetensors`` holds the global update after
round R and ``state.json`` names it, with the round, the metrics so far, the early-stopping
state, the run's configuration and two SHA-256 digests (of the tensors file, and of the JSON
content itself). Each file is written to a temporary name, fsynced and renamed, and the folder
is fsynced after each rename; ``state.json`` is renamed last, so it always points at a
complete round. Older round files are removed afterwards.

Randomness needs no saved state: every draw is keyed on (seed, round, client, purpose), so
the round number is the whole RNG state. What a resume cannot reproduce is refused: a
corrupted or edited checkpoint (the digests), tensors that do not fit the model, and a
configuration that changed (:func:`check_resumable`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flexlora.errors import FlexLoRAError
from flexlora.methods.slora import STATE_KIND as SPARSE_KIND
from flexlora.methods.slora import SparseDelta, SparseState
from flexlora.types import GlobalUpdate

__all__ = [
    "RESUMABLE_CHANGES",
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "check_resumable",
    "config_differences",
    "load_checkpoint",
    "save_checkpoint",
]

STATE = "state.json"
FORMAT = 2
#: Config keys a resume may change: they do not touch the result.
RESUMABLE_CHANGES = ("output.dir", "output.progress")


class CheckpointError(FlexLoRAError):
    """A checkpoint is missing, unreadable, corrupted, or does not belong to this run."""


@dataclass
class Checkpoint:
    """Everything a resumed run needs after ``round``."""

    round: int
    global_update: GlobalUpdate | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # the run's configuration, as plain JSON values


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save_tensors(path: Path, update: GlobalUpdate) -> str:
    """Write ``update`` as safetensors via a fsynced temporary file; return its SHA-256."""
    tensors, meta = update.to_tensors()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        digest = _file_digest(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest


def _canonical(state: Mapping[str, Any]) -> bytes:
    """The JSON bytes the content digest covers (sorted keys, no NaN: strict JSON)."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, allow_nan=False).encode("utf-8")


def _jsonable(value: Any) -> Any:
    """Floats that JSON cannot hold (NaN, Inf) become ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def save_checkpoint(folder: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` under ``folder`` atomically (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors_name = None
    tensors_digest = None
    if ckpt.global_update is not None:
        tensors_name = f"global-{ckpt.round:06d}.safetensors"
        tensors_digest = _atomic_save_tensors(folder / tensors_name, ckpt.global_update)
    state: dict[str, Any] = {
        "format": FORMAT,
        "round": ckpt.round,
        "global": tensors_name,
        "global_sha256": tensors_digest,
        "metrics": _jsonable(ckpt.metrics),
        "extra": _jsonable(ckpt.extra),
        "config": _jsonable(ckpt.config),
    }
    state["checksum"] = _digest(_canonical(state))
    atomic_write_bytes(folder / STATE, json.dumps(state, indent=1, allow_nan=False).encode())
    for old in folder.glob("global-*.safetensors"):
        if old.name != tensors_name:
            old.unlink(missing_ok=True)
    for pattern in (".global-*.safetensors.*", f".{STATE}.*"):  # a killed writer's leftovers
        for stale in folder.glob(pattern):
            stale.unlink(missing_ok=True)


def load_checkpoint(
    folder: Path, shapes: Mapping[str, tuple[int, int]] | None = None
) -> Checkpoint:
    """Read and verify the last complete checkpoint under ``folder``.

    ``shapes`` (module -> (m, n)) checks that the global update fits the run's model.
    Raises :class:`CheckpointError` naming the file and what is wrong.
    """
    state_path = folder / STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {folder} (missing {STATE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {state_path} cannot be read: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {state_path} is not a JSON object")
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {state_path} has format {state.get('format')!r}, this flexlora reads "
            f"format {FORMAT}"
        )
    try:
        intact = state.get("checksum") == _digest(_canonical(state))
    except ValueError:  # NaN / Inf smuggled into the JSON
        intact = False
    if not intact:
        raise CheckpointError(
            f"checkpoint {state_path} is corrupted or was edited (its checksum does not match)"
        )
    update = None
    if state.get("global"):
        update = _load_global(folder, state, shapes)
    try:
        return Checkpoint(
            round=int(state["round"]),
            global_update=update,
            metrics=list(state["metrics"]),
            extra=dict(state["extra"]),
            config=state["config"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {state_path} lacks a valid field: {exc}") from None


def _load_global(
    folder: Path, state: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]] | None
) -> GlobalUpdate:
    name = str(state["global"])
    path = folder / name
    if Path(name).name != name:
        raise CheckpointError(f"checkpoint {folder / STATE} names a file outside it: {name!r}")
    try:
        digest = _file_digest(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint tensors {path} cannot be read: {exc}") from None
    if digest != state.get("global_sha256"):
        raise CheckpointError(
            f"checkpoint tensors {path} are corrupted or were replaced (SHA-256 mismatch)"
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - not a dict
        if meta.get("kind") == SPARSE_KIND:  # SLoRA's sparse stage
            update = SparseState.from_tensors(tensors, meta)
        else:
            update = GlobalUpdate.from_tensors(tensors, meta)
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint tensors {path} are not a global update: {exc}") from None
    if shapes is not None:
        found = {m: d.shape for m, d in update.modules.items()}
        if found != dict(shapes):
            wrong = sorted(set(found.items()) ^ set(dict(shapes).items()))[:3]
            raise CheckpointError(
                f"checkpoint tensors {path} do not fit this model's adapted modules "
                f"(first differences: {wrong})"
            )
    for m, d in update.modules.items():
        for t in (d.values,) if isinstance(d, SparseDelta) else (d.U, d.S, d.Vh):
            if not t.dtype.is_floating_point or not bool(t.isfinite().all()):
                raise CheckpointError(f"checkpoint tensors {path}: module {m} is not finite floats")
    return update


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value and prefix.count(".") < 1:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``section.key: old -> new`` for each key a resume may not change (sorted by key).

    ``saved`` and ``current`` are configs as plain JSON values (``config_io.to_dict``); keys in
    :data:`RESUMABLE_CHANGES` are ignored.
    """
    before = _flatten(_jsonable(saved))
    after = _flatten(_jsonable(current))
    return [
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
        for k in sorted(set(before) | set(after))
        if k not in RESUMABLE_CHANGES and before.get(k) != after.get(k)
    ]


def check_resumable(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Refuse to resume when the configuration changed in a way that changes the result.

    Only :data:`RESUMABLE_CHANGES` may differ: anything else (seed, rounds, strategy, data,
    ...) would give a run that equals no uninterrupted one.
    """
    if saved is None:
        raise CheckpointError("the checkpoint does not record its configuration")
    changed = config_differences(saved, current)
    if changed:
        shown = "; ".join(changed[:5])
        raise CheckpointError(
            f"the configuration changed since the checkpoint ({shown}); a resumed run would "
            f"not equal an uninterrupted one. Restore config.toml or start a new run."
        )
