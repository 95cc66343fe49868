"""A model's shape for the memory planner, read from its config on the meta device.

No weight is ever allocated: the config is read (a ``config.json``, a folder, a hub id's
config only, or a GGUF file's metadata) and the model is built on the meta device by
:mod:`flexlora.models.meta` (the reader the Flower server uses too), which gives every
module's class and shape, so an 8B model is planned on a laptop in a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flexlora.errors import UsageError
from flexlora.models.loading import bnb_converts, quantization_skips, skipped_by
from flexlora.models.meta import meta_model, model_config
from flexlora.models.targets import layer_shape, resolve_targets, target_linear_modules

__all__ = ["ModelShape", "model_config", "model_shape", "shape_of"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a causal LM."""

    architecture: str
    hidden: int
    layers: int
    intermediate: int
    heads: int  # 0: no attention (a state-space model such as Mamba)
    kv_heads: int
    vocab: int
    gated_mlp: bool
    params: int  # unique parameters (tied embeddings counted once)
    quantizable: dict[str, tuple[int, int]]  # linears bitsandbytes would quantize: (m, n)
    targets: dict[str, tuple[int, int]]  # the adapted modules: (m, n)
    checkpoint_dtype: str  # the config's own dtype (what model.dtype = "auto" loads)
    head_dim: int = 0  # the config's own (Gemma, Qwen3: not hidden / heads); 0: hidden / heads
    ssm_state: int = 0  # a state-space model's state size (Mamba: no attention); 0: none
    logit_softcapping: bool = False  # cap·tanh(logits / cap) (Gemma 2): one more logits tensor
    #: tensors the MLP's activation keeps for the backward pass, in units of its input: 1 for
    #: a fused kernel (SiLU, GELU keep their input), 4 for GPT-2's gelu_new (composed of ops)
    act_saved: float = 1.0
    #: the base model's own dropout, active while clients train: on the attention
    #: probabilities, on each residual branch, after the MLP's activation
    attn_dropout: float = 0.0
    hidden_dropout: float = 0.0
    act_dropout: float = 0.0

    @property
    def activations_modelled(self) -> bool:
        """Whether the activation estimate covers the layer: not a state-space model's
        selective scan, whose saved tensors (several per state entry on the CPU path, far fewer
        in the fused CUDA kernels) are not modelled: there it is a lower bound."""
        return not self.ssm_state

    @property
    def head_size(self) -> int:
        """Each head's width: the config's ``head_dim`` where it sets one, else hidden / heads."""
        if not self.heads:
            return 0
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        """Width of the queries and of the attention's output (before o_proj)."""
        return self.heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_size

    @property
    def quantizable_params(self) -> int:
        return sum(m * n for m, n in self.quantizable.values())


def model_shape(name: str, target_modules: list[str]) -> ModelShape:
    """Build the model on the meta device and read its shape (no weight is allocated)."""
    model = meta_model(name)
    assert all(p.is_meta for p in model.parameters())
    return shape_of(model, resolve_targets(model, target_modules))


def shape_of(model: Any, target_modules: list[str]) -> ModelShape:
    """The shape of a built model: on the meta device, or loaded (then ``params`` counts what
    is stored, a quantized layer's packed weights as such)."""
    config = model.config
    skip = quantization_skips(model)
    quantizable = {  # what a quantized load converts (Falcon's FalconLinear is not)
        n: layer_shape(m)
        for n, m in model.named_modules()
        if bnb_converts(m) and not skipped_by(n, skip)
    }
    params = sum(p.numel() for p in model.parameters())  # parameters() yields tied ones once
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(c, "hidden_size", "n_embd", "d_model")
    # a state-space model (Mamba) has no attention: planned without its terms; any other
    # config must say how many heads it has
    ssm_state = int(getattr(c, "state_size", 0) or 0)
    heads = _first(c, "num_attention_heads", "n_head", default=0 if ssm_state else None)
    names = {n.rsplit(".", 1)[-1] for n in quantizable}
    dtype = getattr(c, "dtype", None) or vars(c).get("torch_dtype") or "float32"
    return ModelShape(
        architecture=type(model).__name__,
        hidden=hidden,
        layers=_first(c, "num_hidden_layers", "n_layer", "num_layers"),
        intermediate=_first(
            c,
            "intermediate_size",
            "n_inner",
            "ffn_dim",
            "ffn_hidden_size",  # Falcon
            default=int(getattr(c, "expansion_ratio", 4) * hidden),  # MPT: d_model x ratio
        ),
        heads=heads,
        kv_heads=_first(c, "num_key_value_heads", "num_kv_heads", default=heads),
        vocab=_first(c, "vocab_size"),
        gated_mlp=bool(names & {"gate_proj", "gate_up_proj", "w1", "w3"}),
        params=int(params),
        quantizable=quantizable,
        targets=target_linear_modules(model, target_modules),
        checkpoint_dtype=str(dtype).removeprefix("torch."),
        head_dim=_first(c, "head_dim", default=0) if heads else 0,
        ssm_state=ssm_state,
        logit_softcapping=bool(getattr(c, "final_logit_softcapping", None)),
        act_saved=activation_saved(model),
        attn_dropout=_rate(c, "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"),
        hidden_dropout=_rate(c, "resid_pdrop", "hidden_dropout", "dropout", "hidden_dropout_prob"),
        act_dropout=_rate(c, "activation_dropout"),
    )


def _rate(config: Any, *names: str) -> float:
    """The first of these dropout rates the config sets (0.0 if none)."""
    for n in names:
        value = getattr(config, n, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return 0.0


def _is_activation(name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    if next(module.children(), None) is not None or next(module.parameters(), None) is not None:
        return False
    return type(module).__module__ == "transformers.activations" or leaf.startswith(
        ("act", "activation", "gelu")
    )


def activation_saved(model: Any) -> float:
    """What the model's activation module (its text MLP's: the first one outside a vision
    tower) keeps for the backward pass, in units of its input: run once on a small CPU tensor
    under ``saved_tensors_hooks``, each storage counted once. 1.0 where none is found or it
    cannot run there."""
    found = [(n, m) for n, m in model.named_modules() if _is_activation(n, m)]
    text = [m for n, m in found if not any(v in n.lower() for v in ("vision", "visual"))]
    if not found:
        return 1.0
    module = (text or [m for _, m in found])[0]
    x = torch.randn(1024, requires_grad=True)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
    except Exception:  # an activation that needs more than a tensor: the fused count
        return 1.0
    return round(sum(kept.values()) / x.untyped_storage().nbytes(), 2)


def _first(config: Any, *names: str, default: int | None = None) -> int:
    for n in names:
        value = getattr(config, n, None)
        if value:
            return int(value)
    if default is None:
        raise UsageError(f"model config {type(config).__name__} has none of {names}")
    return int(default)
