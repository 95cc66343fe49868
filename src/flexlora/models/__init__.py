"""Base models: loading (dtype, quantization, device map, GGUF), the tiny test model, targets.

``flexlora.training.model`` re-exports these names for code written before the split.
"""

from flexlora.models.gguf import (
    PROVENANCE,
    SMOLLM2,
    cache_dir,
    convert_gguf,
    find_smollm2_gguf,
    gguf_folder,
    smollm2_folder,
)
from flexlora.models.loading import (
    DTYPES,
    is_quantized,
    keep_4bit_layout,
    load_base_model,
    load_model,
    model_source,
    quantization_config,
    resolve_device,
)
from flexlora.models.prepare import prepare_for_training
from flexlora.models.targets import (
    ADAPTABLE_KINDS,
    is_adaptable,
    layer_kind,
    layer_shape,
    resolve_targets,
    target_linear_modules,
)
from flexlora.models.tiny import TINY_LLAMA, build_byte_tokenizer, build_tiny_llama, tiny_config

__all__ = [
    "ADAPTABLE_KINDS",
    "DTYPES",
    "PROVENANCE",
    "SMOLLM2",
    "TINY_LLAMA",
    "build_byte_tokenizer",
    "build_tiny_llama",
    "cache_dir",
    "convert_gguf",
    "find_smollm2_gguf",
    "gguf_folder",
    "is_adaptable",
    "is_quantized",
    "keep_4bit_layout",
    "layer_kind",
    "layer_shape",
    "load_base_model",
    "load_model",
    "model_source",
    "prepare_for_training",
    "quantization_config",
    "resolve_device",
    "resolve_targets",
    "smollm2_folder",
    "target_linear_modules",
    "tiny_config",
]
