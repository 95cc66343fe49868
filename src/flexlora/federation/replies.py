"""The round's folded replies, kept for one pass after the aggregation, in bounded memory.

The ``update_survival`` diagnostic projects each client's update onto the factors the *new*
state gives its rank type, so it reads every folded update once more after the SVD. The
aggregation itself has already folded them as they arrived; this store is what keeps them
for that pass without holding the round in memory: updates stay in memory while they fit
the store's budget, and each further one is written to its own safetensors file in a
temporary folder (read back one client at a time). Nothing is pickled: tensors and a JSON
header.

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

from flexlora.types import ClientUpdate, LoRAFactors

log = logging.getLogger(__name__)

__all__ = ["REPLY_MEMORY_BYTES", "SPILL_PREFIX", "ReplyStore", "remove_spill_folders"]

#: updates the store keeps in memory before it spills to disk, in bytes of factors
REPLY_MEMORY_BYTES = 256 * 2**20
#: how a store's temporary folder is named (``<directory>/flexlora-replies-XXXXXXXX``)
SPILL_PREFIX = "flexlora-replies-"


class ReplyStore:
    """Folded updates for a second pass: in memory up to ``budget`` bytes (default
    REPLY_MEMORY_BYTES), then on disk.

    ``directory`` is where the temporary folder goes, created at the first spill (the
    drivers give their run folder; default: the system's temporary folder). The folder and
    its files are removed by :meth:`close` (also on leaving a ``with`` block) or, if the
    store is dropped without it, when it is garbage-collected or the interpreter exits.
    Holds at most ``budget`` bytes of factors in memory, plus one spilled client's while it
    is written or read back.
    """

    def __init__(self, budget: int | None = None, directory: str | Path | None = None) -> None:
        self.budget = REPLY_MEMORY_BYTES if budget is None else int(budget)
        self.directory = directory
        self.held = 0
        self._entries: list[ClientUpdate | Path] = []
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
        return sum(1 for e in self._entries if isinstance(e, Path))

    def put(self, update: ClientUpdate) -> None:
        """Keep ``update`` (a reference while it fits the budget, else a file)."""
        size = update.num_bytes()
        if self.held + size <= self.budget:
            self._entries.append(update)
            self.held += size
            return
        if self._folder is None:
            self._folder = self._make_folder()
        path = self._folder / f"{len(self._entries)}.safetensors"
        tensors, header = {}, {}
        for i, (name, f) in enumerate(update.factors.items()):
            tensors[f"{i}.A"] = f.A.contiguous()
            tensors[f"{i}.B"] = f.B.contiguous()
            header[str(i)] = {"module": name, "alpha": f.alpha, "use_rslora": f.use_rslora}
        meta = {
            "client_id": update.client_id,
            "num_examples": update.num_examples,
            "metrics": dict(update.metrics),
            "modules": header,
        }
        save_file(tensors, str(path), metadata={"flexlora": json.dumps(meta)})
        self._entries.append(path)

    def __iter__(self) -> Iterator[ClientUpdate]:
        """The updates in the order they were put, one spilled client read at a time."""
        for entry in self._entries:
            yield entry if isinstance(entry, ClientUpdate) else _read(entry)

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


def _read(path: Path) -> ClientUpdate:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["flexlora"])
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
