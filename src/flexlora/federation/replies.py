"""The round's folded replies, kept for one pass after the aggregation, in bounded memory.

The ``update_survival`` diagnostic projects each client's update onto the factors the *new*
state gives its rank type, so it reads every folded update once more after the SVD. The
aggregation itself has already folded them as they arrived; this store is what keeps them
for that pass without holding the round in memory: updates stay in memory while they fit
the store's budget, and each further one is written to its own safetensors file in a
temporary folder (read back one client at a time, deleted when the store closes). Nothing is
pickled: tensors and a JSON header.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from flexlora.types import ClientUpdate, LoRAFactors

__all__ = ["REPLY_MEMORY_BYTES", "ReplyStore"]

#: updates the store keeps in memory before it spills to disk, in bytes of factors
REPLY_MEMORY_BYTES = 256 * 2**20


class ReplyStore:
    """Folded updates for a second pass: in memory up to ``budget`` bytes (default
    REPLY_MEMORY_BYTES), then on disk.

    ``directory`` is where the temporary folder goes (default: the system's). Holds at most
    ``budget`` bytes of factors in memory, plus one spilled client's while it is read back.
    """

    def __init__(self, budget: int | None = None, directory: str | Path | None = None) -> None:
        self.budget = REPLY_MEMORY_BYTES if budget is None else int(budget)
        self.directory = directory
        self.held = 0
        self._entries: list[ClientUpdate | Path] = []
        self._folder: Path | None = None

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
            self._folder = Path(tempfile.mkdtemp(prefix="flexlora-replies-", dir=self.directory))
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
        """Forget the updates and delete the spilled files."""
        self._entries.clear()
        self.held = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> ReplyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
