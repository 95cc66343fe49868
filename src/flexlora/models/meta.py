"""A model's modules without its weights: built from its config on the meta device.

A Flower ServerApp needs the adapted modules' shapes to plan a round, not the weights (its
nodes train); the weights are loaded only if the server evaluates.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from flexlora.errors import UsageError
from flexlora.models.loading import _offline_env, model_source
from flexlora.models.tiny import TINY_LLAMA, tiny_config

__all__ = ["meta_model"]


def meta_model(name: str) -> PreTrainedModel:
    """``model.name`` (any name :func:`~flexlora.models.load_base_model` takes) on the meta
    device: every module's class and shape, no weight allocated."""
    if name.strip().lower() == TINY_LLAMA:
        config = tiny_config()
    else:
        offline = _offline_env()
        source = model_source(name, offline)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=offline)
        except (OSError, ValueError) as exc:
            raise UsageError(f"could not read the config of model {name!r}: {exc}") from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
