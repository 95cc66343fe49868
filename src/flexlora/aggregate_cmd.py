"""``flexlora aggregate``: PEFT adapter folders of any ranks -> PEFT adapters at given ranks.

Needs only the adapter folders: no base model, no network. All inputs are read and checked and
every output is computed before anything is written, so bad input writes nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flexlora.aggregation import get_aggregator
from flexlora.errors import InvalidUpdateError, RankError, UsageError
from flexlora.lora.peft_io import LoadedAdapter, load_adapter, write_adapters_atomically
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientSpec:
    folder: str
    weight: float = 1.0


def parse_client(spec: str) -> ClientSpec:
    """``DIR`` or ``DIR:WEIGHT`` (a trailing ``:number`` is a weight; other colons are path)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return ClientSpec(spec)
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidUpdateError(head, None, "weight", f"weight must be > 0, got {tail}")
        return ClientSpec(head, weight)
    return ClientSpec(spec)


def output_alphas(adapters: Sequence[LoadedAdapter], alpha: float | None) -> dict[str, float]:
    """Per-module output alpha: ``alpha`` if given, else the inputs' (which must agree)."""
    modules = list(adapters[0].factors)
    if alpha is not None:
        if not (math.isfinite(alpha) and alpha > 0):
            raise UsageError(f"--alpha must be a positive number, got {alpha}")
        return dict.fromkeys(modules, float(alpha))
    out: dict[str, float] = {}
    for module in modules:
        values = {a.source: a.factors[module].alpha for a in adapters if module in a.factors}
        if len(set(values.values())) > 1:
            listing = ", ".join(f"{src}: {v:g}" for src, v in values.items())
            raise UsageError(
                f"module {module}: the clients use different lora_alpha ({listing}); "
                "pass --alpha to choose the output alpha"
            )
        out[module] = next(iter(values.values()))
    return out


def energy_kept(state: GlobalUpdate, rank: int) -> float:
    """Share of ‖ΔW‖²_F kept by the rank-``rank`` truncation, over all modules."""
    total = kept = 0.0
    for d in state.modules.values():
        if d.truncation != "svd":
            return float("nan")
        s2 = d.S.double() ** 2
        total += float(s2.sum())
        kept += float(s2[:rank].sum())
    return kept / total if total > 0 else 1.0


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that could never be written as a folder, before any work is done."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UsageError(f"--out {out}: {folder} exists and is not a folder")
            return


def run_aggregate(
    clients: Sequence[str],
    ranks: Sequence[int],
    out: str | Path,
    strategy: str = "flexlora",
    alpha: float | None = None,
    split: str = "B",
    svd: str = "auto",
    dtype: str = "float32",
) -> list[Path]:
    """Aggregate adapter folders and write ``out/rank-R/`` for each R in ``ranks``."""
    if not clients:
        raise UsageError("give at least one --client DIR[:WEIGHT]")
    if not ranks:
        raise UsageError("give at least one --rank R")
    for r in ranks:
        if r <= 0:
            raise UsageError(f"--rank must be positive, got {r}")
    check_out(Path(out))
    specs = [parse_client(c) for c in clients]
    adapters = [load_adapter(s.folder) for s in specs]
    bases = {str(a.meta.raw.get("base_model_name_or_path")) for a in adapters}
    if len(bases) > 1:
        raise UsageError(f"the adapters were trained on different base models: {sorted(bases)}")
    options: dict[str, object] = {}
    if strategy == "flexlora":
        options["svd"] = svd
    elif strategy == "hetlora":
        # HetLoRA weighs clients by ||s*B*A||_F; the --client weights multiply those
        options["weight_by_examples"] = True
    aggregator = get_aggregator(strategy, dtype=dtype, **options)
    updates = [
        ClientUpdate(client_id=a.source, num_examples=1, factors=a.factors) for a in adapters
    ]
    alphas = output_alphas(adapters, alpha)
    state = aggregator.aggregate(updates, weights=[s.weight for s in specs])
    out_dtype = next(iter(adapters[0].factors.values())).A.dtype
    outputs: dict[str, dict[str, LoRAFactors]] = {}
    for r in dict.fromkeys(ranks):
        try:
            outputs[f"rank-{r}"] = state.factors(
                r,
                alphas,
                use_rslora=adapters[0].meta.use_rslora,
                split=split,
                dtype=torch.float32,
            )
        except RankError as exc:
            raise UsageError(f"--rank {r}: {exc}") from None
    template = dict(adapters[0].meta.raw)
    template.pop("rank_pattern", None)
    template.pop("alpha_pattern", None)
    written = write_adapters_atomically(out, outputs, template, dtype=out_dtype)
    for r, path in zip(dict.fromkeys(ranks), written, strict=True):
        kept = energy_kept(state, r)
        note = "" if math.isnan(kept) else f", keeps {100 * kept:.2f}% of ||dW||^2"
        print(f"wrote {path} (rank {r}{note})")
    return written
