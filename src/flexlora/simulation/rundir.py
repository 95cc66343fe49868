"""A run folder's guard: one writer at a time, and no run replaced without being asked.

:class:`RunLock` is ``DIR/.flexlora.lock``, a small JSON file naming the owner (PID, host,
start time, command line), created atomically and removed on exit. A second process that
finds it refuses with the owner's name; a lock whose PID is dead on this host is stale (a
killed run) and is taken over. The lock is re-entrant within one process, so the CLI can hold
it around its checks and :meth:`FederatedRun.run` around the run.

:func:`prepare_run_folder` decides what ``flexlora run`` does with a folder that already
holds a run: resume it when the config is the same (as ``flexlora resume`` does), refuse when
it differs (naming the first differing keys), or, with ``overwrite``, remove the run's files
(and say which) before starting afresh.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from flexlora.config import RunConfig
from flexlora.config_io import to_dict
from flexlora.errors import FlexLoRAError, UsageError

log = logging.getLogger(__name__)

__all__ = [
    "LOCK",
    "RUN_ENTRIES",
    "RunFolderError",
    "RunLock",
    "holds_run",
    "locked_run_folder",
    "prepare_run_folder",
]

LOCK = ".flexlora.lock"
#: what a run writes into its folder (``--overwrite`` removes these and nothing else)
RUN_ENTRIES = (
    "config.toml",
    "metrics.jsonl",
    "checkpoint",
    "adapters",
    "report.png",
    "base-model",
    "eval.json",
    "DONE.json",
)

#: folders locked by this process (resolved path -> nesting depth)
_HELD: dict[Path, int] = {}


class RunFolderError(UsageError):
    """A run folder is in use by another process, or holds a run this command would replace."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


class RunLock:
    """``with RunLock(folder):`` holds the folder for this process (see the module doc)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK

    def _key(self) -> Path:
        return self.folder.resolve()

    def owner(self) -> dict[str, Any] | None:
        """The recorded owner, or None when there is no lock (``{}`` when it is unreadable)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _create(self) -> bool:
        """Create the lock with its content in one step; False when it already exists."""
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        tmp = self.folder / f"{LOCK}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        try:
            os.link(tmp, self.path)  # atomic: the lock never exists half-written
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _is_stale(self, owner: dict[str, Any]) -> bool:
        if not owner:  # unreadable: a writer that died while the disk was full, say
            with contextlib.suppress(OSError):
                return time.time() - self.path.stat().st_mtime > 10
            return False
        if owner.get("host") != socket.gethostname():
            return False  # another machine's process: it cannot be checked from here
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return True
        return pid == os.getpid() or not _pid_alive(pid)  # our own PID: a lock we do not hold

    def acquire(self) -> RunLock:
        key = self._key()
        if key in _HELD:
            _HELD[key] += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                _HELD[self._key()] = 1
                return self
            owner = self.owner()
            if owner is None:
                continue  # released in between: try again
            if not self._is_stale(owner):
                who = f"PID {owner.get('pid', '?')} on {owner.get('host', '?')}"
                raise RunFolderError(
                    f"{self.folder} is in use by another flexlora process ({who}, since "
                    f"{owner.get('started', '?')}: {owner.get('command', '?')!r}); wait for it "
                    f"to finish or use another --out. If no such process is running, delete "
                    f"{self.path}."
                )
            log.warning(
                "%s: taking over a stale lock (PID %s on %s is not running)",
                self.folder,
                owner.get("pid", "?"),
                owner.get("host", "?"),
            )
            self.path.unlink(missing_ok=True)
        raise RunFolderError(f"could not lock {self.folder}: {self.path} keeps changing")

    def release(self) -> None:
        key = self._key()
        depth = _HELD.get(key, 0)
        if depth > 1:
            _HELD[key] = depth - 1
            return
        _HELD.pop(key, None)
        owner = self.owner()
        if owner and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


F = TypeVar("F", bound=Callable[..., Any])


def locked_run_folder(method: F) -> F:
    """Decorate a method of an object with an ``out`` folder: it runs holding that folder."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with RunLock(self.out):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------- an existing run
def holds_run(folder: Path) -> list[str]:
    """The run entries present in ``folder`` (empty: no run there)."""
    return [name for name in RUN_ENTRIES if (folder / name).exists()]


def _saved_config(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The config of the run in ``folder`` as JSON values, and why it is None when it is."""
    from flexlora.config import load_config
    from flexlora.simulation.checkpoint import STATE

    if (folder / "config.toml").is_file():
        try:
            cfg = load_config(folder / "config.toml")
        except FlexLoRAError as exc:
            return None, f"its config.toml cannot be read ({exc})"
        return json.loads(json.dumps(to_dict(cfg))), ""
    try:
        state = json.loads((folder / "checkpoint" / STATE).read_text(encoding="utf-8"))
        return dict(state["config"]), ""
    except (OSError, ValueError, KeyError, TypeError):
        return None, "it has no readable config.toml or checkpoint"


def _describe(folder: Path, entries: list[str]) -> str:
    return ", ".join(f"{e}/" if (folder / e).is_dir() else e for e in entries)


def prepare_run_folder(
    folder: str | Path,
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> bool:
    """Make ``folder`` ready for a run of ``cfg``; True when the run there is to be resumed.

    Raises :class:`RunFolderError` (nothing changed) when the folder holds a run of another
    config, or a finished run of this config with no checkpoint to resume from, unless
    ``overwrite``: then the run's files (:data:`RUN_ENTRIES`) are removed and listed.
    """
    from flexlora.simulation.checkpoint import STATE, config_differences

    folder = Path(folder)
    entries = holds_run(folder)
    if not entries:
        return False
    if overwrite:
        echo(f"--overwrite: removing the run in {folder}: {_describe(folder, entries)}")
        for name in entries:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return False
    current = json.loads(json.dumps(to_dict(cfg)))
    saved, why = _saved_config(folder)
    changes = config_differences(saved, current) if saved is not None else []
    hint = (
        f"Use another --out, `flexlora resume {folder}` to continue that run, or --overwrite "
        f"to replace it (removes {_describe(folder, entries)})."
    )
    if saved is None or changes:
        reason = why or "its config differs: " + "; ".join(changes[:5])
        more = f" (and {len(changes) - 5} more)" if len(changes) > 5 else ""
        raise RunFolderError(
            f"{folder} holds another run; {reason}{more}. Nothing was changed. {hint}"
        )
    if (folder / "checkpoint" / STATE).is_file():
        echo(f"{folder} holds a run of this config: resuming it (as flexlora resume does)")
        return True
    if {"metrics.jsonl", "adapters"} & set(entries) and _has_results(folder):
        raise RunFolderError(
            f"{folder} holds a run of this config with no checkpoint to resume from "
            f"(output.checkpoint was off, or it stopped in round 1). Nothing was changed. {hint}"
        )
    return False  # the same config, nothing written yet but config.toml: start over


def _has_results(folder: Path) -> bool:
    metrics = folder / "metrics.jsonl"
    has_rows = metrics.is_file() and metrics.stat().st_size > 0
    return has_rows or (folder / "adapters").exists()
