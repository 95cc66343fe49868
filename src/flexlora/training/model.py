"""Base models (moved to :mod:`flexlora.models`); these names keep working from here."""

from __future__ import annotations

from flexlora.models import (
    DTYPES,
    PROVENANCE,
    SMOLLM2,
    TINY_LLAMA,
    build_byte_tokenizer,
    build_tiny_llama,
    cache_dir,
    convert_gguf,
    find_smollm2_gguf,
    gguf_folder,
    is_quantized,
    load_base_model,
    load_model,
    prepare_for_training,
    resolve_device,
    smollm2_folder,
    target_linear_modules,
)
from flexlora.models.gguf import SMOLLM2_DIRNAME, SMOLLM2_GGUF, SMOLLM2_MODULE, SMOLLM2_PIP
from flexlora.models.tiny import BYTE_SPECIALS

__all__ = [
    "BYTE_SPECIALS",
    "DTYPES",
    "PROVENANCE",
    "SMOLLM2",
    "SMOLLM2_DIRNAME",
    "SMOLLM2_GGUF",
    "SMOLLM2_MODULE",
    "SMOLLM2_PIP",
    "TINY_LLAMA",
    "build_byte_tokenizer",
    "build_tiny_llama",
    "cache_dir",
    "convert_gguf",
    "find_smollm2_gguf",
    "gguf_folder",
    "is_quantized",
    "load_base_model",
    "load_model",
    "prepare_for_training",
    "resolve_device",
    "smollm2_folder",
    "target_linear_modules",
]
