"""Getting a loaded base model ready for LoRA training: k-bit preparation, checkpointing.

Called once, where the base model is handed to the client worker, before PEFT wraps it.
"""

from __future__ import annotations

import inspect
import logging
import warnings

from torch import nn

from flexlora.config import TrainConfig
from flexlora.errors import UsageError
from flexlora.models.loading import is_quantized, keep_4bit_layout

__all__ = ["prepare_for_training"]

logger = logging.getLogger(__name__)

#: Non-reentrant checkpointing (PyTorch's recommendation): gradients reach the LoRA weights
#: inside a checkpointed block without the input embeddings having to require grad.
CHECKPOINT_KWARGS = {"use_reentrant": False}


def prepare_for_training(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Freeze the base; on a quantized base run PEFT's k-bit preparation; checkpoint if asked.

    On a bitsandbytes base, PEFT's ``prepare_model_for_kbit_training`` casts every parameter
    that is not quantized (embeddings, norms, the output head) to float32, as QLoRA does, so
    the float32 LoRA weights and the loss see float32 activations; the quantized weights are
    never touched (nor repacked: :func:`~flexlora.models.loading.keep_4bit_layout`).
    ``train.gradient_checkpointing`` recomputes each decoder layer's
    activations in the backward pass instead of keeping them (``use_reentrant=False``).
    Idempotent; returns ``model``.
    """
    model.requires_grad_(False)
    if cfg.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support "
            "gradient checkpointing"
        )
    if is_quantized(model):
        keep_4bit_layout(model)  # also for a base the caller loaded itself
        from peft import prepare_model_for_kbit_training

        # PEFT 0.22 renamed gradient_checkpointing_kwargs (deprecated, to go in 1.2)
        params = inspect.signature(prepare_model_for_kbit_training).parameters
        key = (
            "activation_checkpointing_kwargs"
            if "activation_checkpointing_kwargs" in params
            else "gradient_checkpointing_kwargs"
        )
        prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            **{key: dict(CHECKPOINT_KWARGS)},
        )
    elif cfg.gradient_checkpointing:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*use_cache=True.*", UserWarning)
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS)
                )
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS)
                )
    if cfg.gradient_checkpointing:
        logger.info("gradient checkpointing on (%s)", type(model).__name__)
    model.eval()
    return model
