"""Per-client state that stays with the client across rounds, on disk: FedSA-LoRA's own B,
HetLoRA's self-pruned ranks.

A client that keeps its own factors between rounds needs them back the next time it is sampled,
possibly many rounds later, while the population may be far larger than memory. Each client has
a folder of safetensors files, one per round it trained in (``round-000007.safetensors``),
written atomically (temporary file, then ``os.replace``); only the sampled clients' files are
read. A round reads the newest version written *before* it, so a round that is run again after
a crash (``flexlora resume`` restarts at the round after the checkpoint) reads what the
uninterrupted run read, bit for bit: each client keeps its newest version and the one before
(the one a re-run of its newest round needs), older ones are deleted.

The simulator keeps the store under the run folder (``client_state/``, ``client_ranks/``), a
Flower node under its own output folder: the server never reads it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexlora.errors import InvalidUpdateError
from flexlora.training.pruning import keep_prefix
from flexlora.types import LoRAFactors, lora_scaling

__all__ = [
    "CLIENT_RANKS",
    "CLIENT_STATE",
    "LocalStore",
    "own_eval_factors",
    "rank_tensors",
    "with_local_B",
    "with_own_ranks",
]

#: Folder under the run's (simulator) or the node's (Flower) output folder holding the store.
CLIENT_STATE = "client_state"
#: The same for HetLoRA's self-pruned ranks (a store of its own: a round writes each once).
CLIENT_RANKS = "client_ranks"

_VERSION = re.compile(r"^round-(\d{6,})\.safetensors$")


class LocalStore:
    """Per-client tensors by round, in ``folder/<client>/round-NNNNNN.safetensors``."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def client_dir(self, client: str) -> Path:
        """A folder name safe for any client id: a readable part and a digest of the id."""
        readable = re.sub(r"[^A-Za-z0-9_-]", "_", client)[:48]
        digest = hashlib.sha256(client.encode("utf-8")).hexdigest()[:12]
        return self.folder / f"{readable}-{digest}"

    def versions(self, client: str) -> list[int]:
        """The rounds ``client`` has a saved version for, ascending."""
        folder = self.client_dir(client)
        if not folder.is_dir():
            return []
        found = (_VERSION.match(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, client: str, before_round: int) -> dict[str, torch.Tensor] | None:
        """The newest tensors ``client`` saved in a round before ``before_round`` (or ``None``)."""
        older = [v for v in self.versions(client) if v < before_round]
        if not older:
            return None
        path = self.client_dir(client) / f"round-{older[-1]:06d}.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118

    def save(self, client: str, round_: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write ``client``'s tensors of ``round_`` atomically; keep it and the version before."""
        folder = self.client_dir(client)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"round-{round_:06d}.safetensors"
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        older = [v for v in self.versions(client) if v < round_]
        for v in older[:-1]:  # the newest older one serves a re-run of round_
            (folder / f"round-{v:06d}.safetensors").unlink(missing_ok=True)


def with_local_B(
    client: str, start: Mapping[str, LoRAFactors], own: Mapping[str, torch.Tensor] | None
) -> dict[str, LoRAFactors]:
    """``start`` with each module's B replaced by the client's own (zeros the first time)."""
    out: dict[str, LoRAFactors] = {}
    for name, f in start.items():
        B = own.get(name) if own is not None else None
        if B is None:
            B = torch.zeros_like(f.B)  # (m, r): a new client starts from B = 0
        elif tuple(B.shape) != tuple(f.B.shape):
            raise InvalidUpdateError(
                client,
                name,
                "shape",
                f"the client's own B is {tuple(B.shape)}, its slot needs {tuple(f.B.shape)}",
            )
        out[name] = LoRAFactors(A=f.A, B=B.to(f.B.dtype), alpha=f.alpha, use_rslora=f.use_rslora)
    return out


def rank_tensors(factors: Mapping[str, LoRAFactors]) -> dict[str, torch.Tensor]:
    """A client's per-module ranks as the store keeps them (one int64 per module)."""
    return {name: torch.tensor([f.rank], dtype=torch.int64) for name, f in factors.items()}


def with_own_ranks(
    client: str, start: Mapping[str, LoRAFactors], own: Mapping[str, torch.Tensor] | None
) -> dict[str, LoRAFactors]:
    """``start`` cut to the ranks the client pruned itself to (HetLoRA; ``None``: unchanged).

    Each module keeps its first r components with B rescaled so that their update is
    unchanged (:func:`~flexlora.training.pruning.keep_prefix`): for HetLoRA's prefix state the
    result is exactly what the server would send at rank r.
    """
    if own is None:
        return dict(start)
    out: dict[str, LoRAFactors] = {}
    for name, f in start.items():
        stored = own.get(name)
        rank = f.rank if stored is None else int(stored.reshape(-1)[0])
        if not 0 < rank <= f.rank:
            raise InvalidUpdateError(
                client, name, "rank", f"the client's own rank {rank} exceeds its slot's {f.rank}"
            )
        out[name] = keep_prefix(f, rank)
    return out


def own_eval_factors(
    client: str, factors: Mapping[str, LoRAFactors], own: Mapping[str, torch.Tensor] | None
) -> dict[str, LoRAFactors]:
    """FedSA-LoRA's seen-client model: the global evaluation ``factors`` with the client's own B.

    ``factors`` are the global model at ``eval.global_rank`` (Ā[:k] and B̄, what unseen clients
    are scored with); each module of a client with rank-r B becomes s_r·B·Ā[:r], cut to
    k' = min(r, k) components with B rescaled by s_r/s_k' (:func:`keep_prefix`'s rule) when
    the evaluation rank is below the client's. A client that never trained (``own`` is
    ``None``) is scored on the global factors, like an unseen one. Holds only the returned
    factors (views of its inputs when nothing is cut).
    """
    if own is None:
        return dict(factors)
    out: dict[str, LoRAFactors] = {}
    for name, f in factors.items():
        B = own.get(name)
        if B is None or B.ndim != 2 or int(B.shape[0]) != f.B.shape[0]:
            shape = None if B is None else tuple(B.shape)
            raise InvalidUpdateError(
                client, name, "shape", f"the client's own B is {shape}, the module needs (m, r)"
            )
        r = int(B.shape[1])
        k = min(r, f.rank)
        ratio = lora_scaling(f.alpha, r, f.use_rslora) / lora_scaling(f.alpha, k, f.use_rslora)
        B = B[:, :k].to(f.B.dtype)  # (m, k)
        out[name] = LoRAFactors(
            A=f.A[:k],  # (k, n): the shared Ā's prefix
            B=B if k == r else (B * ratio).contiguous(),
            alpha=f.alpha,
            use_rslora=f.use_rslora,
        )
    return out
