"""Which layers of a causal LM can carry a LoRA adapter, and their ``(m, n)`` shapes.

Any model transformers loads keeps its own module names (``q_proj``, Phi-3's fused
``qkv_proj``, GPT-2's ``c_attn``): targets are matched on those names as PEFT matches them.
Adaptable kinds are ``torch.nn.Linear`` (bitsandbytes' ``Linear4bit`` and ``Linear8bitLt``
are subclasses: their packed weights are never read, only their declared features) and
transformers' GPT-2-style ``Conv1D``, whose weight is stored transposed as ``(in, out)``;
PEFT adapts it with ``fan_in_fan_out``. Shapes are always reported as ``(out, in)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from peft import PeftModel
from torch import nn
from transformers.pytorch_utils import Conv1D

from flexlora.config import DEFAULT_TARGETS
from flexlora.errors import UsageError

__all__ = [
    "ADAPTABLE_KINDS",
    "DEFAULT_TARGETS",
    "is_adaptable",
    "layer_kind",
    "layer_shape",
    "resolve_targets",
    "target_linear_modules",
]

log = logging.getLogger(__name__)

ADAPTABLE_KINDS = (
    "torch.nn.Linear (and bitsandbytes Linear4bit / Linear8bitLt), transformers Conv1D (GPT-2)"
)


def is_adaptable(layer: nn.Module) -> bool:
    """A linear layer (any ``nn.Linear`` subclass, quantized ones included) or a ``Conv1D``."""
    return isinstance(layer, (nn.Linear, Conv1D))


def _article(kind: str) -> str:
    """``kind`` with its indefinite article: "an Embedding", "a LayerNorm"."""
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def layer_kind(layer: nn.Module) -> str:
    """The layer's class, with its module for anything outside torch.nn (for error messages)."""
    cls = type(layer)
    return (
        cls.__name__
        if cls.__module__.startswith("torch.nn")
        else f"{cls.__module__}.{cls.__name__}"
    )


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(m, n)`` = (out_features, in_features) of an adaptable layer."""
    if isinstance(layer, Conv1D):
        n, m = layer.weight.shape  # (in, out): Conv1D computes x @ W + b
        return int(m), int(n)
    if isinstance(layer, nn.Linear):
        return int(layer.out_features), int(layer.in_features)
    raise UsageError(
        f"{_article(layer_kind(layer))} cannot be adapted; adaptable: {ADAPTABLE_KINDS}"
    )


#: linear layers whose weight a model type multiplies directly instead of calling the layer
#: (Mamba: ``dt_proj.weight @ time_step`` on every path): a LoRA adapter there would never
#: be applied in training, so targeting them is refused
WEIGHT_READ_DIRECTLY: dict[str, tuple[str, ...]] = {
    "mamba": ("dt_proj",),
    "falcon_mamba": ("dt_proj",),
}


def _matches(name: str, targets: Sequence[str]) -> bool:
    """Whether module ``name`` is targeted, as PEFT matches: equal to, or ending in ``.t``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def target_linear_modules(
    model: nn.Module, target_modules: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Module name -> ``(m, n)`` = (out_features, in_features) of each targeted layer.

    Targets match as in PEFT: a module named ``key`` matches ``t`` when ``key == t`` or ``key``
    ends with ``"." + t`` (so ``q_proj`` matches ``model.layers.0.self_attn.q_proj``). Names are
    the base model's own paths; a PEFT-wrapped model is accepted (its prefix is stripped and a
    LoRA layer reports its ``base_layer``'s shape). Works on a model on the meta device.
    """
    if isinstance(target_modules, str):
        raise UsageError("target_modules must be a list of module names, not one string")
    targets = list(target_modules)
    if not targets:
        raise UsageError("target_modules is empty")
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    shapes: dict[str, tuple[int, int]] = {}
    leaves: set[str] = set()
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    bypassed = WEIGHT_READ_DIRECTLY.get(model_type or "", ())
    for name, module in root.named_modules():
        layer = getattr(module, "base_layer", module)
        if is_adaptable(layer):
            leaves.add(name.rsplit(".", 1)[-1])
        if not _matches(name, targets):
            continue
        if not is_adaptable(layer):
            raise UsageError(
                f"target module {name} is {_article(layer_kind(layer))}, which cannot be adapted; "
                f"adaptable layer kinds: {ADAPTABLE_KINDS}"
            )
        if name.rsplit(".", 1)[-1] in bypassed:
            raise UsageError(
                f"target module {name}: {model_type} multiplies this layer's weight directly "
                "instead of calling the layer, so a LoRA adapter there would never be trained; "
                f"leave {list(bypassed)} out of lora.target_modules"
            )
        shapes[name] = layer_shape(layer)
    if not shapes:
        raise UsageError(
            f"no adaptable layer matches target_modules {targets}; this model's linear layers "
            f"are named {sorted(leaves - {'base_layer', 'default'})}"
        )
    return shapes


def resolve_targets(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """The target modules to use on ``model``: ``target_modules`` as given, except that the
    default (LLaMA-style names) on a model with none of them becomes PEFT's own default for
    the model type (GPT-2's ``c_attn``, GPT-NeoX's and Falcon's ``query_key_value``, ...), as
    PEFT does when no targets are named. Names a user chose are never replaced: a mismatch
    is :func:`target_linear_modules`' clear error. Works on the meta device.
    """
    targets = list(target_modules)
    if tuple(targets) != DEFAULT_TARGETS:
        return targets
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    names = [name for name, _ in root.named_modules()]
    if any(_matches(n, targets) for n in names):
        return targets
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(root, "config", None), "model_type", None)
    fallback = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
    if not fallback or not any(_matches(n, fallback) for n in names):
        return targets
    log.warning(
        "lora.target_modules: the default %s matches no layer of this %s model; using PEFT's "
        "default for it, %s (set lora.target_modules to choose)",
        list(DEFAULT_TARGETS),
        model_type,
        list(fallback),
    )
    return list(fallback)
