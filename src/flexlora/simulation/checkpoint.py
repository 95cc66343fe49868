"""Crash-safe checkpoints of a run: safetensors for tensors, JSON for the rest, no pickle.

Layout under ``DIR/checkpoint/``: ``global-RRRRRR.safetensors`` holds the global update after
round R and ``state.json`` names it (plus round, metrics so far and early-stopping state).
Each file is written to a temporary name, fsynced and renamed; ``state.json`` is renamed last,
so it always points at a complete round. Older round files are removed afterwards.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexlora.errors import FlexLoRAError
from flexlora.types import GlobalUpdate

__all__ = ["Checkpoint", "atomic_write_bytes", "load_checkpoint", "save_checkpoint"]

STATE = "state.json"
FORMAT = 1


@dataclass
class Checkpoint:
    round: int
    global_update: GlobalUpdate | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
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


def _atomic_save_tensors(path: Path, update: GlobalUpdate) -> None:
    tensors, meta = update.to_tensors()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(folder: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` under ``folder`` atomically (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors_name = None
    if ckpt.global_update is not None:
        tensors_name = f"global-{ckpt.round:06d}.safetensors"
        _atomic_save_tensors(folder / tensors_name, ckpt.global_update)
    state = {
        "format": FORMAT,
        "round": ckpt.round,
        "global": tensors_name,
        "metrics": ckpt.metrics,
        "extra": ckpt.extra,
    }
    atomic_write_bytes(folder / STATE, json.dumps(state, indent=1).encode("utf-8"))
    for old in folder.glob("global-*.safetensors"):
        if old.name != tensors_name:
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read the last complete checkpoint under ``folder``."""
    state_path = folder / STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FlexLoRAError(f"no checkpoint in {folder} (missing {STATE})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise FlexLoRAError(f"checkpoint {state_path} cannot be read: {exc}") from None
    if state.get("format") != FORMAT:
        raise FlexLoRAError(f"checkpoint {state_path} has unknown format {state.get('format')}")
    update = None
    if state.get("global"):
        path = folder / state["global"]
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
        except (OSError, SafetensorError) as exc:
            raise FlexLoRAError(f"checkpoint tensors {path} cannot be read: {exc}") from None
        update = GlobalUpdate.from_tensors(tensors, meta)
    return Checkpoint(
        round=int(state["round"]),
        global_update=update,
        metrics=list(state.get("metrics", [])),
        extra=dict(state.get("extra", {})),
    )
