"""The memory model of ``flexlora plan``: what a client and the server need, in bytes.

Pure arithmetic over a :class:`~flexlora.plan.shape.ModelShape` and the run config. A client
holds the frozen base, its adapter (float32), the adapter's gradients and optimizer state,
and the activations the backward pass needs; its peak is at the start of a backward pass of a
step after the first (the optimizer state exists, the gradients are being written, every
saved activation is alive and the loss' logits are being differentiated).

Activations, per token and decoder layer (LLaMA-style blocks; ``e`` the activation dtype's
bytes, ``h`` hidden, ``kv`` the key/value width, ``i`` intermediate): the two RMSNorm inputs
kept in float32 (8h), the attention's q, k, v and output (e·(2h + 2kv)), the MLP's gate,
activation and up outputs (3e·i; e·i without a gate), plus what the LoRA layers keep: each
adapted module's input in the adapter's float32 (shared by modules that read the same input
when dropout is off and no cast is needed; otherwise one copy per module, plus dropout's mask:
float32 on the CPU, 1 byte on CUDA) and its rank-r intermediate. The loss keeps the logits
and differentiates them through a float32 log-softmax: (e + 12) bytes per token and
vocabulary entry, e more for a soft cap on the logits (Gemma 2's cap·tanh(logits / cap)).
With gradient checkpointing each layer keeps only its input and one layer is
recomputed at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from flexlora.config import RunConfig
from flexlora.plan.shape import DTYPE_BYTES, ModelShape
from flexlora.schedule import module_ranks

__all__ = [
    "ClientMemory",
    "ServerMemory",
    "activation_bytes",
    "base_weight_bytes",
    "client_bytes",
    "client_memory",
    "server_memory",
]

F32 = 4
BNB_BLOCK = 64  # bitsandbytes' 4-bit block size: one absmax per 64 weights
BNB_BLOCK2 = 256  # double quantization: the absmaxes in 8 bits, one float32 per 256 of them
ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "attn.c_proj", "self_attention.dense")


@dataclass(frozen=True)
class ClientMemory:
    """Bytes a client of one rank type needs (``total`` at the configured checkpointing)."""

    rank_type: str
    base: int
    adapter: int  # this type's LoRA weights, float32
    other_slots: int  # the other rank types' slots (the simulator keeps one per type)
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    checkpointing: bool

    def total(self, checkpointing: bool | None = None, all_slots: bool = False) -> int:
        on = self.checkpointing if checkpointing is None else checkpointing
        act = self.activations_checkpointed if on else self.activations
        slots = self.other_slots if all_slots else 0
        return self.base + self.adapter + slots + self.gradients + self.optimizer + act


@dataclass(frozen=True)
class ServerMemory:
    """Bytes the server step needs (FlexLoRA: an SVD state capped at ``keep_rank``)."""

    state: int
    accumulators: int
    checkpoint: int
    keep_rank: dict[str, int]

    @property
    def peak(self) -> int:
        """The old and the new state and the round's accumulators at once."""
        return 2 * self.state + self.accumulators


def slot_ranks(shape: ModelShape, cfg: RunConfig) -> dict[str, dict[str, int]]:
    """Rank type -> per-module rank, as the Coordinator assigns them."""
    return {
        t: module_ranks(list(shape.targets), ranks, cfg.lora.ffn_modules)
        for t, ranks in cfg.federation.rank_types.items()
    }


def adapter_bytes(shape: ModelShape, ranks: Mapping[str, int]) -> int:
    """float32 A (r, n) and B (m, r) of every adapted module."""
    return F32 * sum(ranks[name] * (m + n) for name, (m, n) in shape.targets.items())


def _weights_dtype(shape: ModelShape, cfg: RunConfig) -> int:
    name = shape.checkpoint_dtype if cfg.model.dtype == "auto" else cfg.model.dtype
    return DTYPE_BYTES.get(name, F32)


def base_weight_bytes(shape: ModelShape, cfg: RunConfig) -> int:
    """The frozen base at ``model.dtype``, or quantized (bitsandbytes' storage layout).

    On a quantized base every parameter that is not quantized is float32 (PEFT's k-bit
    preparation casts it up, as QLoRA trains).
    """
    q = shape.quantizable_params
    rest = shape.params - q
    mc = cfg.model
    if mc.quantization == "none":
        return _weights_dtype(shape, cfg) * shape.params
    if mc.quantization == "8bit":
        scales = F32 * sum(m for m, _ in shape.quantizable.values())  # one per output row
        return q + scales + F32 * rest
    blocks = q / BNB_BLOCK
    # double quantization: 8-bit absmaxes and their float32 scales; else float32 absmaxes
    double = mc.bnb_4bit_use_double_quant
    absmax = blocks + F32 * blocks / BNB_BLOCK2 if double else F32 * blocks
    return int(q / 2 + absmax) + F32 * rest


def _activation_dtype(shape: ModelShape, cfg: RunConfig) -> int:
    if cfg.train.precision == "bf16":
        return 2
    if cfg.model.quantization != "none":
        return F32  # hidden states follow the float32 norms and embeddings
    return _weights_dtype(shape, cfg)


def _input_group(shape: ModelShape, name: str, n: int, ffn: list[str]) -> tuple[str, int]:
    """Which tensor a module reads, and its width: modules reading the same one share it."""
    if n == shape.intermediate and n != shape.hidden:
        return "mlp_mid", n
    if name.endswith(ATTN_OUT_NAMES):
        return "attn_out", n
    if any(name == f or name.endswith("." + f) for f in ffn):
        return "norm2", n
    return "norm1", n


def _on_cuda(cfg: RunConfig) -> bool:
    device = cfg.model.device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _mask_bytes(cfg: RunConfig) -> int:
    """Dropout keeps a float32 noise tensor on the CPU and a 1-byte mask on CUDA."""
    return 1 if _on_cuda(cfg) else F32


def layer_activation_bytes(shape: ModelShape, cfg: RunConfig, ranks: Mapping[str, int]) -> float:
    """Bytes one decoder layer keeps for the backward pass, per token.

    Checked tensor by tensor (``torch.autograd.graph.saved_tensors_hooks``) on SmolLM2 in
    float32 and bfloat16, with and without dropout: the count is exact for LLaMA blocks. Other
    blocks add what their config says: an activation composed of several ops (measured once,
    ``ModelShape.act_saved``) and the base model's own dropout (GPT-2's 0.1 everywhere).
    """
    e = _activation_dtype(shape, cfg)
    lora_e = 2 if cfg.train.precision == "bf16" else F32
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    saved = 2 * F32 * h  # the two norms' inputs, upcast to float32
    mask = _mask_bytes(cfg)
    if shape.heads:  # none in an attention-free model
        saved += e * (2 * q + 2 * kv)  # q and the attention output; k and v
        saved += F32 * shape.heads  # the attention's log-sum-exp
        probs = shape.heads * cfg.train.cutoff_len  # one row of every head's probabilities
        eager = cfg.model.attn_implementation == "eager"
        if eager:
            saved += 2 * e * probs  # scores and probabilities
        if shape.attn_dropout > 0 and (eager or not _on_cuda(cfg)):
            # the mask and the dropped probabilities; sdpa's CPU kernels take no dropout, so
            # it runs its math path, which keeps the probabilities too (CUDA's fused kernels
            # draw the mask again in the backward pass)
            saved += (mask + e) * probs + (0 if eager else e * probs)
    # the activation's input (more for one composed of several ops) and, gated, the two
    # inputs of the product with up
    act = shape.act_saved
    saved += e * ((act + 2) * i if shape.gated_mlp else act * i)
    if shape.hidden_dropout > 0:
        saved += 2 * mask * h  # both residual branches' masks
    if shape.act_dropout > 0:
        saved += mask * i
    groups: dict[str, int] = {}
    lora = 0
    for name, (_m, n) in shape.targets.items():
        lora += lora_e * ranks[name]  # lora_A's output, kept by lora_B
        if cfg.lora.dropout > 0:
            lora += (lora_e + _mask_bytes(cfg)) * n  # its own dropped-out input and mask
        elif e != lora_e:
            lora += lora_e * n  # its own float32 copy of the input
        else:
            group, width = _input_group(shape, name, n, list(cfg.lora.ffn_modules))
            groups[group] = width  # modules reading one input keep it once
    return saved + (lora + lora_e * sum(groups.values())) / shape.layers


def activation_bytes(
    shape: ModelShape, cfg: RunConfig, ranks: Mapping[str, int], checkpointing: bool
) -> int:
    """Activation bytes at the peak of a training step (one micro-batch at cutoff length)."""
    tokens = cfg.train.batch_size * cfg.train.cutoff_len
    parallel = cfg.train.parallel_clients if isinstance(cfg.train.parallel_clients, int) else 1
    tokens *= parallel
    e = _activation_dtype(shape, cfg)
    per_layer = layer_activation_bytes(shape, cfg, ranks) * tokens
    # the logits, a float32 log-softmax's three; a soft cap (Gemma 2) keeps its tanh's output
    logits = (e + 3 * F32 + (e if shape.logit_softcapping else 0)) * tokens * shape.vocab
    if checkpointing:
        layers = shape.layers * e * shape.hidden * tokens + per_layer  # inputs + one recomputed
    else:
        layers = shape.layers * per_layer
    return int(layers + logits)


def optimizer_moments(cfg: RunConfig) -> int:
    """float32 tensors the clients' optimizer keeps per LoRA weight (AdamW two, SGD its
    momentum; the optimizer as the strategy's method resolves it)."""
    tc = cfg.client_train()
    return 2 if tc.optimizer == "adamw" else (1 if tc.momentum > 0 else 0)


def client_bytes(shape: ModelShape, cfg: RunConfig, ranks: Mapping[str, int]) -> int:
    """What one client of these per-module ranks needs beside the frozen base: its adapter,
    gradients and optimizer state, and one micro-batch's activations at the configured
    checkpointing (what one more client adds to a batched pass)."""
    adapter = adapter_bytes(shape, ranks)
    checkpointing = cfg.train.gradient_checkpointing
    activations = activation_bytes(shape, cfg, ranks, checkpointing=checkpointing)
    return (2 + optimizer_moments(cfg)) * adapter + activations


def client_memory(shape: ModelShape, cfg: RunConfig) -> list[ClientMemory]:
    """One row per rank type."""
    ranks_by_type = slot_ranks(shape, cfg)
    sizes = {t: adapter_bytes(shape, r) for t, r in ranks_by_type.items()}
    base = base_weight_bytes(shape, cfg)
    tc = cfg.client_train()
    moments = optimizer_moments(cfg)
    rows = []
    for t, ranks in ranks_by_type.items():
        rows.append(
            ClientMemory(
                rank_type=t,
                base=base,
                adapter=sizes[t],
                other_slots=sum(sizes.values()) - sizes[t],
                gradients=sizes[t],
                optimizer=moments * sizes[t],
                activations=activation_bytes(shape, cfg, ranks, checkpointing=False),
                activations_checkpointed=activation_bytes(shape, cfg, ranks, checkpointing=True),
                checkpointing=tc.gradient_checkpointing,
            )
        )
    return rows


def server_memory(shape: ModelShape, cfg: RunConfig) -> ServerMemory:
    """FlexLoRA's server: the state at ``federation.keep_rank`` (``max``: the largest rank any
    client receives, per module; ``all`` or a number: at most Σ r_i of a round, clients per round
    times the largest rank, and min(m, n)), and per module the cheaper
    of the round's factor stacks and a dense sum."""
    ranks_by_type = slot_ranks(shape, cfg)
    keep_rank = getattr(cfg.federation, "keep_rank", "max")
    clients = cfg.federation.clients_per_round
    keep: dict[str, int] = {}
    state = accumulators = 0
    for name, (m, n) in shape.targets.items():
        r_max = max(r[name] for r in ranks_by_type.values())
        # rank(ΔW) <= Σ r_i <= clients·r_max: a larger cap (or none) keeps no more than that
        stacked = clients * r_max
        cap = {"all": stacked, "max": r_max}.get(keep_rank, keep_rank)  # type: ignore[arg-type]
        k = min(int(cap), stacked, m, n)
        keep[name] = k
        state += F32 * k * (m + n + 1)  # U (m, k), S (k), Vh (k, n)
        accumulators += F32 * min(clients * r_max * (m + n), m * n)
    return ServerMemory(state=state, accumulators=accumulators, checkpoint=state, keep_rank=keep)
