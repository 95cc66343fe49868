"""A model's config and modules without its weights: built from its config on the meta device.

The one reader of a model's config for everything that needs shapes and not weights: a
Flower ServerApp planning a round (its nodes train; the weights are loaded only if the
server evaluates), ``flexlora plan`` and the batched trainer's memory estimate. Nothing is
downloaded but a hub id's ``config.json``, and nothing is converted: a GGUF file's config
comes from its metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from flexlora.errors import UsageError
from flexlora.models.gguf import SMOLLM2, SMOLLM2_DIRNAME, SMOLLM2_GGUF, cache_dir
from flexlora.models.loading import _offline_env, _resolve
from flexlora.models.tiny import TINY_LLAMA, tiny_config

__all__ = ["meta_model", "model_config"]


def model_config(name: str) -> PretrainedConfig:
    """The config of ``model.name`` (any name :func:`~flexlora.models.load_base_model`
    takes, or a ``config.json`` file) without reading or converting any weight.

    A hub id reads only its config (from the local cache when ``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` is set); a ``.gguf`` file and the built-in SmolLM2 read the GGUF
    metadata unless the converted folder is already cached.
    """
    key = name.strip().lower()
    if key == TINY_LLAMA:
        return tiny_config()
    offline = _offline_env()
    try:
        if key == SMOLLM2:
            folder = cache_dir() / "models" / SMOLLM2_DIRNAME
            if (folder / "config.json").is_file():
                return AutoConfig.from_pretrained(folder)
            from flexlora.models.gguf import find_smollm2_gguf

            gguf = find_smollm2_gguf()
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=SMOLLM2_GGUF)
        path = Path(name).expanduser()
        if key.endswith(".gguf"):
            if not path.is_file():
                raise UsageError(f"model.name is a GGUF file {name!r} that does not exist")
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if path.is_file():  # a config.json
            return AutoConfig.from_pretrained(path)
        source = _resolve(name, offline)  # a folder, or a hub id (its config only)
        return AutoConfig.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not read the config of model {name!r}: {exc}") from exc


def meta_model(name: str | PretrainedConfig) -> PreTrainedModel:
    """``model.name`` (or a config read by :func:`model_config`) on the meta device: every
    module's class and shape, no weight allocated."""
    config = model_config(name) if isinstance(name, str) else name
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
