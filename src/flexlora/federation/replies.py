"""A round's replies kept for later, in bounded memory.

Two uses. The ``update_survival`` diagnostic projects each client's update onto the factors
the *new* state gives its rank type, so it reads every folded update once more after the SVD
(:class:`~flexlora.server.RoundAggregation` keeps them here, read back in order). And a reply
that arrives ahead of an earlier client waits here until that client is resolved, so that
the fold follows the population's order (:class:`~flexlora.federation.round.RoundCollector`
takes each one back by its key). Either way the round is not held in memory: updates stay in
memory while they fit the store's budget, and each further one is written to its own
safetensors file in a temporary folder (read back one client at a time, deleted when it is
taken back or the store closes). Nothing is pickled: tensors and a JSON header.

The folder goes where the caller says: the drivers put it in their run folder
(``DIR/flexlora-replies-*``, :attr:`Coordinator.reply_dir <flexlora.server.Coordinator>`),
which keeps the spilled updates (under client-level DP, raw unclipped ones) with the run
and on the disk the run writes to, not in a system temporary folder that may be a RAM disk;
without one, the system's temporary folder. It is removed when the store closes, and
however else the store ends: when it is garbage-collected or the interpreter exits (a
``weakref.finalize``). Only a killed process leaves it behind; :func:`remove_spill_folders`
clears a run folder's leftovers, and a run calls it when it starts.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from flexlora.methods.slora import SparseUpdate
from flexlora.types import ClientUpdate, LoRAFactors

log = logging.getLogger(__name__)

__all__ = ["REPLY_MEMORY_BYTES", "SPILL_PREFIX", "ReplyStore", "remove_spill_folders"]

#: updates the store keeps in memory before it spills to disk, in bytes of factors
REPLY_MEMORY_BYTES = 256 * 2**20
#: how a store's temporary folder is named (``<directory>/flexlora-replies-XXXXXXXX``)
SPILL_PREFIX = "flexlora-replies-"


class ReplyStore:
    """Updates kept for later: in memory up to ``budget`` bytes (default REPLY_MEMORY_BYTES),
    then on disk.

    ``directory`` is where the temporary folder goes, created at the first spill (the
    drivers give their run folder; default: the system's temporary folder). The folder and
    its files are removed by :meth:`close` (also on leaving a ``with`` block) or, if the
    store is dropped without it, when it is garbage-collected or the interpreter exits.
    Holds at most ``budget`` bytes of factors in memory, plus one spilled client's while it
    is written or read back. Keeps :class:`~flexlora.types.ClientUpdate` and SLoRA's
    :class:`~flexlora.methods.slora.SparseUpdate`. :meth:`put` returns a key; iterating reads
    every update kept, in the order put; :meth:`take` gives one back and forgets it.
    """

    def __init__(self, budget: int | None = None, directory: str | Path | None = None) -> None:
        self.budget = REPLY_MEMORY_BYTES if budget is None else int(budget)
        self.directory = directory
        self.held = 0  # bytes of the updates kept in memory
        self._entries: dict[int, ClientUpdate | SparseUpdate | Path] = {}  # in put order
        self._key = 0
        self._folder: Path | None = None
        self._cleanup: weakref.finalize | None = None  # removes _folder exactly once

    @property
    def folder(self) -> Path | None:
        """The temporary folder of the spilled updates (None until the first spill)."""
        return self._folder

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def spilled(self) -> int:
        """How many updates are on disk."""
        return sum(1 for e in self._entries.values() if isinstance(e, Path))

    def put(self, update: ClientUpdate | SparseUpdate) -> int:
        """Keep ``update`` (a reference while it fits the budget, else a file); its key."""
        key, self._key = self._key, self._key + 1
        size = update.num_bytes()
        if self.held + size <= self.budget:
            self._entries[key] = update
            self.held += size
            return key
        if self._folder is None:
            self._folder = self._make_folder()
        path = self._folder / f"{key}.safetensors"
        _write(update, path)
        self._entries[key] = path
        return key

    def take(self, key: int) -> ClientUpdate | SparseUpdate:
        """The update kept under ``key``, forgotten by the store (its file deleted)."""
        entry = self._entries.pop(key)
        if not isinstance(entry, Path):
            self.held -= entry.num_bytes()
            return entry
        try:
            return _read(entry)
        finally:
            entry.unlink(missing_ok=True)

    def __iter__(self) -> Iterator[ClientUpdate | SparseUpdate]:
        """The updates in the order they were put, one spilled client read at a time."""
        for entry in list(self._entries.values()):
            yield _read(entry) if isinstance(entry, Path) else entry

    def close(self) -> None:
        """Forget the updates and delete the spilled files (again: nothing to do)."""
        self._entries.clear()
        self.held = 0
        self._folder = None
        if self._cleanup is not None:
            self._cleanup()  # a finalizer runs at most once: close, collection or exit
            self._cleanup = None

    def _make_folder(self) -> Path:
        """A new temporary folder in ``directory``, removed with the store however it ends."""
        if self.directory is not None:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=self.directory))
        # holds the path, not the store: the store can still be collected, which removes it
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(folder), True)
        return folder

    def __enter__(self) -> ReplyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_spill_folders(directory: str | Path) -> list[Path]:
    """Delete the reply stores' folders left in ``directory`` by a killed process; the ones
    removed. Only for a folder no live store uses: a run calls it on its own run folder
    while it holds that folder's lock, before its first round."""
    removed = []
    for path in sorted(Path(directory).glob(SPILL_PREFIX + "*")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d leftover reply folder(s) in %s", len(removed), directory)
    return removed


def _write(update: ClientUpdate | SparseUpdate, path: Path) -> None:
    """``update`` as one safetensors file: its tensors and a JSON header (no pickle)."""
    tensors, header = {}, {}
    if isinstance(update, SparseUpdate):
        for i, (name, v) in enumerate(update.values.items()):
            tensors[f"{i}.values"] = v.contiguous()
            header[str(i)] = {"module": name}
    else:
        for i, (name, f) in enumerate(update.factors.items()):
            tensors[f"{i}.A"] = f.A.contiguous()
            tensors[f"{i}.B"] = f.B.contiguous()
            header[str(i)] = {"module": name, "alpha": f.alpha, "use_rslora": f.use_rslora}
    meta = {
        "kind": "sparse" if isinstance(update, SparseUpdate) else "lora",
        "client_id": update.client_id,
        "num_examples": update.num_examples,
        "metrics": dict(update.metrics),
        "modules": header,
    }
    save_file(tensors, str(path), metadata={"flexlora": json.dumps(meta)})


def _read(path: Path) -> ClientUpdate | SparseUpdate:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["flexlora"])
        if meta.get("kind") == "sparse":
            values = {m["module"]: f.get_tensor(f"{i}.values") for i, m in meta["modules"].items()}
            return SparseUpdate(
                meta["client_id"], int(meta["num_examples"]), values, meta["metrics"]
            )
        factors = {
            m["module"]: LoRAFactors(
                A=f.get_tensor(f"{i}.A"),
                B=f.get_tensor(f"{i}.B"),
                alpha=float(m["alpha"]),
                use_rslora=bool(m["use_rslora"]),
            )
            for i, m in meta["modules"].items()
        }
    return ClientUpdate(meta["client_id"], int(meta["num_examples"]), factors, meta["metrics"])
