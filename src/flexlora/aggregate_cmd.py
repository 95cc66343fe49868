"""``flexlora aggregate``: PEFT adapter folders of any ranks -> PEFT adapters at given ranks.

Needs only the adapter folders: no base model, no network. All inputs are read and checked and
every output is computed before anything is written, so bad input writes nothing.

For a streaming strategy (FlexLoRA, FLoRA, FedIT, FFA-LoRA, HetLoRA, FedEx-LoRA) the folders
are read module by module (safetensors ``safe_open``): the peak memory is one module's
accumulator (for FlexLoRA its factor stacks or dense sum, whichever is smaller) and its
decomposition, plus the outputs. It grows with the clients only until Σ r_i reaches a module's
min(m, n) (then the dense sum and its full SVD, fixed by the module's shape). HetLoRA's
per-client weights (the norm of a client's whole update) take one more pass over the modules
first. Other strategies load every adapter.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flexlora.aggregation import Aggregator, get_aggregator
from flexlora.aggregation.base import check_factors
from flexlora.aggregation.hetlora import HetLoRA
from flexlora.errors import InvalidUpdateError, RankError, UsageError
from flexlora.lora.finite import all_finite
from flexlora.lora.norms import update_norm
from flexlora.lora.peft_io import (
    FROZEN_DELTA,
    AdapterReader,
    LoadedAdapter,
    load_adapter,
    open_adapter,
    write_adapters_atomically,
)
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors, ModuleDelta

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


def output_alphas(
    adapters: Sequence[LoadedAdapter | AdapterReader], alpha: float | None
) -> dict[str, float]:
    """Per-module output alpha: ``alpha`` if given, else the inputs' (which must agree)."""
    modules = list(_modules(adapters[0]))
    if alpha is not None:
        if not (math.isfinite(alpha) and alpha > 0):
            raise UsageError(f"--alpha must be a positive number, got {alpha}")
        return dict.fromkeys(modules, float(alpha))
    out: dict[str, float] = {}
    for module in modules:
        values = {a.source: a.meta.alpha_for(module) for a in adapters if module in _modules(a)}
        if len(set(values.values())) > 1:
            listing = ", ".join(f"{src}: {v:g}" for src, v in values.items())
            raise UsageError(
                f"module {module}: the clients use different lora_alpha ({listing}); "
                "pass --alpha to choose the output alpha"
            )
        out[module] = next(iter(values.values()))
    return out


def _modules(adapter: LoadedAdapter | AdapterReader) -> Mapping[str, object]:
    return adapter.factors if isinstance(adapter, LoadedAdapter) else adapter.shapes


def energy_kept(state: GlobalUpdate, rank: int) -> float:
    """Share of ‖ΔW‖²_F kept by the rank-``rank`` truncation, over all modules."""
    return spectrum_energy_kept(
        {
            n: (d.S, d.cut_energy) if d.truncation == "svd" else None
            for n, d in state.modules.items()
        },
        rank,
    )


def spectrum_energy_kept(
    spectra: Mapping[str, tuple[torch.Tensor, float] | None], rank: int
) -> float:
    """As :func:`energy_kept`, from each module's singular values and the ‖·‖²_F a cap left
    out of them (``None``: not an SVD: NaN)."""
    total = kept = 0.0
    for spectrum in spectra.values():
        if spectrum is None:
            return float("nan")
        S, cut = spectrum
        s2 = S.double() ** 2
        total += float(s2.sum()) + cut
        kept += float(s2[:rank].sum())
    return kept / total if total > 0 else 1.0


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that could never be written as a folder, before any work is done."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UsageError(f"--out {out}: {folder} exists and is not a folder")
            return


def check_distinct(specs: Sequence[ClientSpec]) -> None:
    """Refuse a folder given twice under any spelling (``a``, ``a/``, ``./a``, a symlink):
    it would count that client twice."""
    seen: dict[Path, str] = {}
    for spec in specs:
        key = Path(spec.folder).resolve()
        if key in seen:
            raise InvalidUpdateError(
                spec.folder, None, "duplicate", f"the same folder as client {seen[key]}"
            )
        seen[key] = spec.folder


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
    check_distinct(specs)
    readers = [open_adapter(s.folder) for s in specs]
    bases = {str(a.meta.raw.get("base_model_name_or_path")) for a in readers}
    if len(bases) > 1:
        raise UsageError(f"the adapters were trained on different base models: {sorted(bases)}")
    options: dict[str, object] = {}
    if strategy == "flexlora":
        options["svd"] = svd
        # no rank written needs more triplets than the largest: the SVD forms only those (and
        # the randomized one, approximate, finds only those); each rank's share of ||dW||^2
        # comes from the energy the cap left out
        options["keep_rank"] = max(ranks)
    elif strategy == "hetlora":
        # HetLoRA weighs clients by ||s*B*A||_F; the --client weights multiply those
        options["weight_by_examples"] = True
    aggregator = get_aggregator(strategy, dtype=dtype, **options)
    alphas = output_alphas(readers, alpha)
    use_rslora = readers[0].meta.use_rslora
    weights = [s.weight for s in specs]
    outputs: dict[str, dict[str, LoRAFactors]] = {f"rank-{r}": {} for r in dict.fromkeys(ranks)}
    # S per module and the ||dW||^2 a cap left out (None: not an SVD state)
    spectra: dict[str, tuple[torch.Tensor, float] | None] = {}
    frozen: dict[str, ModuleDelta] = {}  # FedEx-LoRA's residual, per module
    if aggregator.streams:
        deltas = stream_modules(aggregator, readers, weights, frozen)
    else:
        adapters = [load_adapter(s.folder) for s in specs]
        updates = [ClientUpdate(a.source, 1, a.factors) for a in adapters]
        whole = aggregator.aggregate(updates, weights=weights)
        frozen.update(whole.frozen)
        deltas = iter(whole.modules.items())
    # a rank past what a module's update holds (Σ r_i, or min(m, n)) is written as the
    # simulator hands it out: the extra components have zero B (ΔW unchanged) and A drawn as
    # PEFT initialises it, so the adapter loads at the rank asked for and every component can
    # train on; for FLoRA, whose clients merge the whole ΔW, this writes all of it at any rank
    pads = {r: torch.Generator().manual_seed(r) for r in ranks}
    padded: dict[int, list[str]] = {r: [] for r in ranks}  # modules written past their rank
    for module, delta in deltas:
        for r in dict.fromkeys(ranks):
            if r > delta.rank:
                padded[r].append(f"{module} ({delta.rank})")
            try:
                outputs[f"rank-{r}"][module] = delta.for_rank(r, padded=True).factors(
                    r,
                    alphas[module],
                    use_rslora=use_rslora,
                    split=split,
                    pad=pads[r],
                    dtype=torch.float32,
                    module=module,
                )
            except RankError as exc:
                raise UsageError(f"--rank {r}: {exc}") from None
        # a capped state knows the ||dW||^2 its cap left out
        spectra[module] = (delta.S, delta.cut_energy) if delta.truncation == "svd" else None
        del delta  # else this module's state (U, S, Vh) lives on while the next one is reduced
    # the clients' widest storage dtype (bf16 and fp16 clients together: float32)
    out_dtype = functools.reduce(torch.promote_types, (a.dtype for a in readers))
    check_finite(outputs, out_dtype, aggregator.dtype)
    template = dict(readers[0].meta.raw)
    template.pop("rank_pattern", None)
    template.pop("alpha_pattern", None)
    # a frozen part no adapter carries goes beside them, as `flexlora run` exports it
    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    if frozen:
        files[FROZEN_DELTA] = GlobalUpdate(modules=frozen, strategy=aggregator.name).to_tensors()
    written = write_adapters_atomically(out, outputs, template, dtype=out_dtype, files=files)
    for r, path in zip(dict.fromkeys(ranks), written, strict=True):
        share = spectrum_energy_kept(spectra, r)
        note = "" if math.isnan(share) else f", keeps {100 * share:.2f}% of ||dW||^2"
        if padded[r] and not aggregator.merges_into_base:
            note += (
                f"; {len(padded[r])} module(s) hold fewer components, padded with zero-B ones: "
                f"{', '.join(padded[r][:3])}{', ...' if len(padded[r]) > 3 else ''}"
            )
        print(f"wrote {path} (rank {r}{note})")
    if frozen:
        print(
            f"wrote {Path(out) / FROZEN_DELTA} ({strategy}: the residual U·S·Vh of the averaged "
            "factors, which these adapters need in their base: W0 + U·S·Vh, per module)"
        )
    return written


def check_finite(
    outputs: Mapping[str, Mapping[str, LoRAFactors]], dtype: torch.dtype, compute: torch.dtype
) -> None:
    """Refuse output factors that hold NaN or Inf once in ``dtype`` (the inputs' dtype), naming
    the module: an update too large for the ``compute`` dtype or for ``dtype`` itself."""
    for name, factors in outputs.items():
        for module, f in factors.items():
            if not (all_finite(f.A.to(dtype)) and all_finite(f.B.to(dtype))):
                raise InvalidUpdateError(
                    None,
                    module,
                    "nonfinite",
                    f"the {name} factors hold NaN or Inf: the clients' values are too large "
                    f"for the {compute} computation or the {dtype} output "
                    "(--dtype float64 may hold the first)",
                )


def whole_norm(adapter: AdapterReader) -> float:
    """‖ΔW‖_F of one client's whole adapter, reading one module at a time (HetLoRA's weight)."""
    return update_norm(adapter.factors(m) for m in adapter.shapes)


def stream_modules(
    aggregator: Aggregator,
    readers: Sequence[AdapterReader],
    weights: Sequence[float],
    frozen: dict[str, ModuleDelta] | None = None,
) -> Iterator[tuple[str, ModuleDelta]]:
    """Each module's global update in turn, reading one module of one client at a time; a
    strategy's frozen part (FedEx-LoRA's residual) goes into ``frozen`` by module.

    Every client must adapt the same modules; a module's shape is the one most clients
    agree on (an odd one out is blamed by name). Holds one module's accumulator at a time
    (and the frozen parts, each as small as the module's state).
    """
    owners: dict[str, str] = {}  # module -> the first client that sent it
    for a in readers:
        for module in a.shapes:
            owners.setdefault(module, a.source)
    for a in readers:
        for module, owner in owners.items():
            if module not in a.shapes:
                raise InvalidUpdateError(
                    a.source,
                    module,
                    "missing_module",
                    f"module is missing here but client {owner} sent it",
                )
    if len({a.source for a in readers}) < len(readers):
        raise InvalidUpdateError(None, None, "duplicate", "a client folder is given twice")
    # p_i = w_i / Σ w in float64 first: a raw weight past float32's range (3.4e38) would
    # overflow the accumulator's w_i·s_i·B_i
    raw_total = math.fsum(weights)
    weights = [w / raw_total for w in weights]
    total = math.fsum(weights)
    options: dict[str, object] = {}
    if isinstance(aggregator, HetLoRA) and aggregator.weighting == "client":
        options["client_norms"] = {a.source: whole_norm(a) for a in readers}
    for module in owners:
        shape = Counter(a.shapes[module] for a in readers).most_common(1)[0][0]
        acc = aggregator.start_module(module, shape, None, **options)
        for a, w in zip(readers, weights, strict=True):
            f = a.factors(module)
            check_factors(a.source, module, f, shape)
            acc.check(a.source, f)
            acc.fold(a.source, f, w)
            del f
        try:
            delta = acc.result(total)
        except torch.linalg.LinAlgError:  # the SVD of a sum that overflowed
            raise InvalidUpdateError(
                None,
                module,
                "nonfinite",
                f"the weighted sum of the clients' updates is not finite in {aggregator.dtype} "
                "(--dtype float64 may hold it)",
            ) from None
        part = acc.frozen()
        if part is not None and frozen is not None:
            frozen[module] = part
        del acc, part  # the stacks or the dense sum go before the caller cuts the outputs
        yield module, delta
        del delta
