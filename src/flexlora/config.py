"""The run configuration: dataclasses with defaults and help, shared by the CLI and Flower.

The defaults are the offline embedded job (`make run`): SmolLM2-135M-Instruct on the Natural
Instructions tasks shipped in the ``bigbench`` sdist, FlexLoRA under ``heavy-tail-light``.
A TOML file sets any subset of keys; ``--set dotted.key=value`` overrides on top.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flexlora.config_io import apply_overrides, from_dict, load_toml, to_toml
from flexlora.data.config import DataConfig
from flexlora.errors import UsageError
from flexlora.methods.compose import OPTIMIZERS, local_optimizer

__all__ = [
    "PAPER_RANK_TYPES",
    "PAPER_SLORA_DENSITIES",
    "EvalConfig",
    "FederationConfig",
    "HetLoRAConfig",
    "LoRASettings",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
]

#: SLoRA's stage-1 density per paper rank type in the FlexLoRA reference code (``get_density``;
#: 0.0012 for everyone at a homogeneous rank, which is rank 8 there).
PAPER_SLORA_DENSITIES: dict[str, float] = {
    "8": 0.0012,
    "30": 0.0246,
    "30-200": 0.0822,
    "200": 0.1222,
}

#: The paper's four client resource types: (attention rank, feed-forward rank).
PAPER_RANK_TYPES: dict[str, list[int]] = {
    "8": [8, 8],
    "30": [30, 30],
    "30-200": [30, 200],
    "200": [200, 200],
}


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")
#: other spellings of the dtypes people write (torch's, the usual short forms)
DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    **{f"torch.{n}": n for n in ("float32", "bfloat16", "float16")},
}
#: other spellings of model.quantization: (quantization, 4-bit data type or None)
QUANTIZATION_ALIASES: dict[str, tuple[str, str | None]] = {
    "": ("none", None),
    "no": ("none", None),
    "off": ("none", None),
    "false": ("none", None),
    "4": ("4bit", None),
    "4-bit": ("4bit", None),
    "int4": ("4bit", None),
    "qlora": ("4bit", None),
    "nf4": ("4bit", "nf4"),
    "fp4": ("4bit", "fp4"),
    "8": ("8bit", None),
    "8-bit": ("8bit", None),
    "int8": ("8bit", None),
    "llm.int8": ("8bit", None),
}


def _dtype_name(value: object) -> object:
    """A dtype name in the form DTYPE_NAMES lists (``bf16``, ``torch.float16``: aliases)."""
    if isinstance(value, str):
        key = value.strip().lower()
        return DTYPE_ALIASES.get(key, key)
    return value


#: lora.target_modules' default (LLaMA-style names): the paper's q, v and feed-forward layers
DEFAULT_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
DEVICE_MAPS = ("", "auto", "balanced", "balanced_low_0", "sequential")
#: a device_map that names one device (what from_pretrained also takes): cpu, cuda:0, 0, ...
DEVICE_PATTERN = r"cpu|mps|cuda(:\d+)?|\d+"


@dataclass
class ModelConfig:
    name: str = _help(
        "base causal LM: a hub id, a local folder, 'smollm2-135m-instruct' (offline default) or "
        "'tiny-llama' (tests)",
        default="smollm2-135m-instruct",
    )
    dtype: str = _help("weights dtype: float32, bfloat16, float16 or auto", default="float32")
    threads: int = _help("torch CPU threads (0 = torch's default)", default=0)
    device: str = _help(
        "where clients train and evaluate: auto (cuda when available, else cpu), cpu, cuda, "
        "cuda:N or mps (the server step: federation.server_device)",
        default="auto",
    )

    # read as text once built; TOML's and --set's bare 4, 8 and false are spellings of it too
    quantization: str | int | bool = _help(
        "quantize the frozen base on load with bitsandbytes: none, 4bit (QLoRA) or 8bit; the "
        "LoRA weights stay float32 (`pip install 'flexlora[quant]'`)",
        default="none",
    )
    bnb_4bit_quant_type: str = _help("4-bit data type: nf4 (QLoRA) or fp4", default="nf4")
    bnb_4bit_use_double_quant: bool = _help(
        "4-bit: quantize the quantization constants too (~0.4 bit a weight less)", default=True
    )
    bnb_4bit_compute_dtype: str = _help(
        "4-bit: dtype of the matmuls: auto (model.dtype, bfloat16 when that is auto), "
        "bfloat16, float16 or float32",
        default="auto",
    )
    device_map: str | int = _help(
        "transformers device map: empty puts the whole model on model.device as it loads; "
        "auto, balanced, balanced_low_0 or sequential spread it over the visible GPUs; one "
        "device (cpu, cuda, cuda:N, mps, or a GPU index) puts it all there",
        default="",
    )
    attn_implementation: str = _help(
        "attention kernel passed to from_pretrained (eager, sdpa, flash_attention_2, ...); "
        "empty: transformers' default",
        default="",
    )

    def __post_init__(self) -> None:
        self.dtype = _dtype_name(self.dtype)  # type: ignore[assignment]
        self.bnb_4bit_compute_dtype = _dtype_name(self.bnb_4bit_compute_dtype)  # type: ignore[assignment]
        self.bnb_4bit_quant_type = str(self.bnb_4bit_quant_type).strip().lower()
        quant = self.quantization
        if quant is None or quant is False:
            quant = "none"
        key = str(quant).strip().lower()
        if key in QUANTIZATION_ALIASES:  # nf4 / fp4 name the 4-bit data type as well
            key, data_type = QUANTIZATION_ALIASES[key]
            if data_type is not None:
                self.bnb_4bit_quant_type = data_type
        self.quantization = key
        if self.dtype not in DTYPE_NAMES:
            raise UsageError(f"model.dtype: {self.dtype!r} is not float32/bfloat16/float16/auto")
        self.device = self.device.strip().lower()  # "CUDA", "cpu "
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UsageError(f"model.device: {self.device!r} is not auto, cpu, cuda, cuda:N or mps")
        if self.quantization not in ("none", "4bit", "8bit"):
            raise UsageError(f"model.quantization: {self.quantization!r} is not none, 4bit or 8bit")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise UsageError(
                f"model.bnb_4bit_quant_type: {self.bnb_4bit_quant_type!r} is not nf4 or fp4"
            )
        if self.bnb_4bit_compute_dtype not in DTYPE_NAMES:
            raise UsageError(
                f"model.bnb_4bit_compute_dtype: {self.bnb_4bit_compute_dtype!r} is not "
                "auto/bfloat16/float16/float32"
            )
        if isinstance(self.device_map, int) and not isinstance(self.device_map, bool):
            self.device_map = str(self.device_map)  # a GPU index: TOML's 0 or --set ...=0
        one_device = re.fullmatch(DEVICE_PATTERN, self.device_map) is not None
        if self.device_map not in DEVICE_MAPS and not one_device:
            raise UsageError(
                f"model.device_map: {self.device_map!r} is not one of "
                f"{', '.join(repr(m) for m in DEVICE_MAPS)} nor one device (cpu, cuda, cuda:N, "
                "mps or a GPU index)"
            )
        if one_device and self.device != "auto" and self.device != self.device_map:
            raise UsageError(
                f"model.device_map = {self.device_map!r} puts the model on one device; it "
                f"disagrees with model.device = {self.device!r} (leave one of them out)"
            )
        if self.device_map and not one_device and self.device not in ("auto", "cuda"):
            raise UsageError(
                f"model.device_map = {self.device_map!r} spreads the model over the GPUs; it "
                f"cannot be combined with model.device = {self.device!r} (leave one of them out)"
            )
        if self.attn_implementation and not re.fullmatch(
            r"[A-Za-z0-9_\-/.]+", self.attn_implementation
        ):
            raise UsageError(
                f"model.attn_implementation: {self.attn_implementation!r} is not a kernel name"
            )


@dataclass
class LoRASettings:
    target_modules: list[str] = _help(
        "leaf names of the linear layers to adapt (the default, on a model with none of these "
        "names, becomes PEFT's default for its model type)",
        default_factory=lambda: list(DEFAULT_TARGETS),
    )
    ffn_modules: list[str] = _help(
        "which of the target modules are feed-forward (they take the rank type's FFN rank); a "
        "name matches a module's leaf name or a dotted suffix of its path (GPT-2's mlp.c_proj)",
        default_factory=lambda: [
            "gate_proj",
            "up_proj",
            "down_proj",
            "gate_up_proj",
            "fc1",
            "fc2",
            "c_fc",
            "mlp.c_proj",
            "dense_h_to_4h",  # Falcon, GPT-NeoX, Bloom
            "dense_4h_to_h",
            "fc_in",  # GPT-J, CodeGen
            "fc_out",
        ],
    )
    alpha: float = _help(
        "lora_alpha (scaling is alpha/r, or alpha/sqrt(r) with rsLoRA)", default=16.0
    )
    dropout: float = _help("lora_dropout", default=0.05)
    use_rslora: bool = _help("rank-stabilised scaling alpha/sqrt(r)", default=False)

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise UsageError("lora.target_modules must name at least one module")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise UsageError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    local_steps: int = _help(
        "optimizer steps per client per round (0: use local_epochs)", default=8
    )
    local_epochs: float = _help("passes over the client's data when local_steps is 0", default=1.0)
    batch_size: int = _help("examples per micro-batch", default=4)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    cutoff_len: int = _help("truncate prompt+response to this many tokens", default=128)
    train_on_inputs: bool = _help(
        "also train on the prompt tokens (off: response only)", default=False
    )
    optimizer: str = _help(
        "auto (the strategy's method decides: sgd for fedavg, adamw for fedit and slora, "
        "adamw for the others), adamw or sgd; a value that contradicts the method is refused",
        default="auto",
    )
    lr: float = _help("learning rate", default=3e-4)
    lr_schedule: str = _help(
        "constant, linear or cosine decay over the local steps", default="constant"
    )
    warmup_steps: int = _help("linear warm-up steps at the start of each local run", default=0)
    weight_decay: float = _help("weight decay", default=0.0)
    momentum: float = _help("SGD momentum", default=0.0)
    max_grad_norm: float = _help("clip the gradient norm (0: off)", default=1.0)
    precision: str = _help("fp32 or bf16 (autocast)", default="fp32")
    parallel_clients: int | str = _help(
        "clients trained together in one batched pass over the base model (1: one at a "
        "time; 'auto': as many as fit in memory, at most federation.clients_per_round); "
        "each client's result is the same as alone",
        default=1,
    )
    gradient_checkpointing: bool = _help(
        "recompute each decoder layer's activations in the backward pass instead of keeping "
        "them (less memory, ~30 % more compute; use_reentrant=False)",
        default=False,
    )

    def __post_init__(self) -> None:
        pc = self.parallel_clients
        if pc != "auto" and (isinstance(pc, bool) or not isinstance(pc, int) or pc < 1):
            raise UsageError(
                f"train.parallel_clients must be an integer >= 1 or 'auto', got {pc!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"train.optimizer must be auto, adamw or sgd, got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise UsageError(
                f"train.lr_schedule must be constant/linear/cosine, got {self.lr_schedule!r}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise UsageError(f"train.precision must be fp32 or bf16, got {self.precision!r}")
        for name in ("batch_size", "grad_accum", "cutoff_len"):
            if getattr(self, name) <= 0:
                raise UsageError(f"train.{name} must be positive")
        if self.local_steps < 0 or (self.local_steps == 0 and self.local_epochs <= 0):
            raise UsageError("train.local_steps must be >= 0, and local_epochs > 0 when it is 0")
        if not (self.lr > 0):
            raise UsageError(f"train.lr must be positive, got {self.lr}")


@dataclass
class FederationConfig:
    strategy: str = _help(
        "METHOD+AGGREGATION (method fedavg: local SGD, fedit: AdamW, or slora; aggregation "
        "homogeneous, flexlora or hetlora), or one of flexlora, fedit, fedavg, hetlora, flora, "
        "ffa, fedex, fedsa, slora; fedit-min / fedit-max hold every client to the smallest / "
        "largest rank type",
        default="flexlora",
    )
    rounds: int = _help("communication rounds", default=3)
    clients_per_round: int = _help(
        "clients sampled per round (seeded by seed and round)", default=4
    )
    distribution: str = _help(
        "client resource types: uniform, heavy-tail-light, heavy-tail-strong, normal, or "
        "'explicit' with client_types",
        default="heavy-tail-light",
    )
    client_types: list[str] = _help(
        "explicit rank type per client (distribution='explicit'), in client order; cycled",
        default_factory=list,
    )
    rank_types: dict[str, list[int]] = _help(
        "resource types: name -> [attention rank, FFN rank]",
        default_factory=lambda: {k: list(v) for k, v in PAPER_RANK_TYPES.items()},
    )
    seed: int = _help(
        "seed of client sampling, rank draw, data order and initialisation", default=42
    )
    slora_rounds: int = _help(
        "slora: rounds of the sparse first stage (counted within rounds)", default=1
    )
    slora_density: float | dict[str, float] | str = _help(
        "slora: share of each adapted weight's entries the sparse stage trains: one number "
        "for every client, a table rank type -> number, or 'paper' (the FlexLoRA reference "
        "code's: 8 -> 0.0012, 30 -> 0.0246, 30-200 -> 0.0822, 200 -> 0.1222)",
        default=0.01,
    )
    svd: str = _help("flexlora decomposition: auto, factored, dense, randomized", default="auto")
    keep_rank: int | str = _help(
        "singular triplets the flexlora state keeps per module: 'max' (the largest rank any "
        "client receives there: every client gets what the whole state would give it), 'all' "
        "(the exact dW), or a number",
        default="max",
    )
    server_device: str = _help(
        "where the server step runs: cpu, cuda, cuda:N or auto (cuda when torch sees one); "
        "the state always comes back to the CPU",
        default="cpu",
    )
    split: str = _help(
        "singular values into B ('B') or sqrt(S) into both ('balanced')", default="B"
    )
    min_clients: int = _help(
        "fewest valid updates a round needs to change the global state", default=1
    )
    max_update_norm: float = _help(
        "reject updates with ||s*B*A||_F above this (0: off)", default=0.0
    )
    dp_clip: float = _help(
        "client-level DP: clip each client's dW to this norm (0: off)", default=0.0
    )
    dp_noise_multiplier: float = _help("client-level DP: Gaussian noise multiplier", default=0.0)
    dp_delta: float = _help("client-level DP: delta of the reported (epsilon, delta)", default=1e-5)
    fail_rate: float = _help(
        "fault injection: share of sampled clients that fail each round", default=0.0
    )
    client_timeout: float = _help(
        "seconds a client's local training may take; a later reply is discarded as a "
        "straggler's (0: no limit; Flower uses it as the message timeout)",
        default=0.0,
    )

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise UsageError(f"federation.rounds must be >= 0, got {self.rounds}")
        if self.clients_per_round <= 0:
            raise UsageError("federation.clients_per_round must be positive")
        if not self.rank_types:
            raise UsageError("federation.rank_types must define at least one type")
        for name, ranks in self.rank_types.items():
            if len(ranks) != 2 or min(ranks) <= 0:
                raise UsageError(
                    f"federation.rank_types.{name} must be [attention rank, FFN rank] > 0, "
                    f"got {ranks}"
                )
        if self.split not in ("B", "balanced"):
            raise UsageError(f"federation.split must be 'B' or 'balanced', got {self.split!r}")
        if self.min_clients < 1:
            raise UsageError("federation.min_clients must be >= 1")
        if self.slora_rounds < 0:
            raise UsageError(f"federation.slora_rounds must be >= 0, got {self.slora_rounds}")
        self._check_slora_density()
        if isinstance(self.keep_rank, str):  # "MAX", " all ": as eval.global_rank, any case
            self.keep_rank = self.keep_rank.strip().lower()
        if isinstance(self.keep_rank, str) and re.fullmatch(r"[0-9]+", self.keep_rank):
            self.keep_rank = int(self.keep_rank)  # a Flower run config or --set spelled "200"
        if isinstance(self.keep_rank, str) and self.keep_rank not in ("max", "all"):
            raise UsageError(
                f"federation.keep_rank must be 'max', 'all' or a positive integer, "
                f"got {self.keep_rank!r}"
            )
        if isinstance(self.keep_rank, int) and self.keep_rank <= 0:
            raise UsageError(f"federation.keep_rank must be positive, got {self.keep_rank}")
        self.server_device = self.server_device.strip().lower()  # "CPU", "CUDA:0"
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.server_device):
            raise UsageError(
                f"federation.server_device: {self.server_device!r} is not cpu, cuda, cuda:N or auto"
            )
        if not 0 <= self.fail_rate < 1:
            raise UsageError("federation.fail_rate must be in [0, 1)")
        for name in ("max_update_norm", "dp_clip", "dp_noise_multiplier", "client_timeout"):
            if getattr(self, name) < 0:
                raise UsageError(f"federation.{name} must be >= 0")

    def slora_densities(self, types: Sequence[str]) -> dict[str, float]:
        """``slora_density`` resolved for each of ``types`` (rank type names)."""
        d = self.slora_density
        table = PAPER_SLORA_DENSITIES if d == "paper" else d
        if isinstance(table, dict):
            unknown = sorted(set(types) - set(table))
            if unknown:
                raise UsageError(
                    f"federation.slora_density gives no density for rank type(s) "
                    f"{', '.join(unknown)}"
                )
            return {t: float(table[t]) for t in types}
        return dict.fromkeys(types, float(table))  # type: ignore[arg-type]

    def _check_slora_density(self) -> None:
        """A number in (0, 1], ``paper`` with the paper's type names, or a table of every type."""
        d = self.slora_density
        if isinstance(d, str):
            if d != "paper":
                raise UsageError(
                    f"federation.slora_density: {d!r} is not a number, a table or 'paper'"
                )
            missing = sorted(set(self.rank_types) - set(PAPER_SLORA_DENSITIES))
            if missing:
                raise UsageError(
                    "federation.slora_density = 'paper' gives the reference code's density of "
                    f"the paper's rank types {', '.join(PAPER_SLORA_DENSITIES)}; rank type(s) "
                    f"{', '.join(missing)} have none: give a table rank type -> density"
                )
            return
        table = d if isinstance(d, dict) else {"": d}
        if isinstance(d, dict):
            unknown = sorted(set(d) - set(self.rank_types))
            missing = sorted(set(self.rank_types) - set(d))
            if unknown:
                raise UsageError(
                    f"federation.slora_density names rank type(s) {', '.join(unknown)} that "
                    f"federation.rank_types does not define ({', '.join(self.rank_types)})"
                )
            if missing:
                raise UsageError(
                    f"federation.slora_density gives no density for rank type(s) "
                    f"{', '.join(missing)}"
                )
        for name, value in table.items():
            if not (math.isfinite(value) and 0 < value <= 1):
                key = f"federation.slora_density.{name}" if name else "federation.slora_density"
                raise UsageError(f"{key} must be in (0, 1], got {value}")


@dataclass
class HetLoRAConfig:
    self_pruning: bool = _help(
        "HetLoRA's local rank self-pruning (hetlora aggregation only): clients train with the "
        "tail regulariser and shrink their own rank when it works; off: every client trains "
        "at its type's ranks",
        default=False,
    )
    reg_weight: float = _help(
        "self-pruning: lambda of the regulariser lambda * sum ||B[:, t:r]||_F ||A[t:r]||_F, "
        "t = floor(gamma r)",
        default=1e-3,
    )
    gamma: float = _help(
        "self-pruning: decay factor in (0, 1); the last (1 - gamma) r components are "
        "penalised, and a pruning client's rank r becomes floor(gamma r)",
        default=0.9,
    )
    min_rank: int = _help("self-pruning: no module is pruned below this rank", default=1)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.reg_weight) and self.reg_weight >= 0):
            raise UsageError(f"hetlora.reg_weight must be >= 0, got {self.reg_weight}")
        if not 0 < self.gamma < 1:
            raise UsageError(f"hetlora.gamma must be in (0, 1), got {self.gamma}")
        if self.min_rank < 1:
            raise UsageError(f"hetlora.min_rank must be >= 1, got {self.min_rank}")


@dataclass
class EvalConfig:
    every: int = _help(
        "evaluate every N rounds (and after the last); 0: only at the end", default=1
    )
    at_start: bool = _help("evaluate the base model before round 1 (round 0)", default=True)
    unseen: bool = _help("zero-shot Rouge-L on the unseen clients' test sets", default=True)
    seen: bool = _help("Rouge-L on the seen clients' test sets", default=False)
    max_clients: int = _help("evaluate at most this many clients of each kind (0: all)", default=0)
    max_examples_per_client: int = _help("test examples per client (0: all)", default=8)
    max_new_tokens: int = _help("greedy generation length", default=48)
    stop: list[str] = _help(
        "an answer ends where one of these strings first appears (the template's marker)",
        default_factory=lambda: ["###"],
    )
    max_prompt_tokens: int = _help(
        "keep the last N prompt tokens (0: train.cutoff_len, as in training)", default=0
    )
    batch_size: int = _help("prompts per generation batch", default=16)
    patience: int = _help(
        "stop after this many evaluations without improvement (0: off)", default=0
    )
    global_rank: str | int = _help(
        "what global model is scored, one rule for every strategy: 'max' (the largest rank any "
        "client receives, i.e. the top exported adapter), 'full' (the whole server state) or "
        "an integer rank (per module at most what the state holds)",
        default="max",
    )

    harness_tasks: list[str] = _help(
        "lm-evaluation-harness tasks (lm-eval's names) that score the final global model at "
        "the end of the run, into metrics.jsonl (needs the 'eval' extra); empty: none",
        default_factory=list,
    )
    harness_include_path: str = _help(
        "folder of lm-eval task YAMLs for harness_tasks (only its tasks are indexed)",
        default="",
    )
    harness_limit: int = _help("first N examples of each harness task (0: all)", default=0)
    harness_batch_size: int = _help("lm-eval batch size of the harness tasks", default=8)

    def __post_init__(self) -> None:
        rank = self.global_rank
        if isinstance(rank, str) and re.fullmatch(r"\s*[0-9]+\s*", rank):
            rank = self.global_rank = int(rank)  # a Flower run config or --set spelled "16"
        if isinstance(rank, str) and rank.strip().lower() in ("max", "full"):
            rank = self.global_rank = rank.strip().lower()  # as model.dtype's names: any case
        if isinstance(rank, str) and rank not in ("max", "full"):
            raise UsageError(f"eval.global_rank: {rank!r} is not 'max', 'full' or an integer")
        if isinstance(rank, int) and rank <= 0:
            raise UsageError(f"eval.global_rank must be a positive rank, got {rank}")


@dataclass
class OutputConfig:
    dir: str = _help("output folder", default="runs/default")
    progress: bool = _help("progress bars", default=True)
    checkpoint: bool = _help("write a resumable checkpoint after every round", default=True)
    save_adapters: bool = _help(
        "write adapters/rank-R/ for every rank type at the end", default=True
    )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRASettings = field(default_factory=LoRASettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    hetlora: HetLoRAConfig = field(default_factory=HetLoRAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def client_train(self) -> TrainConfig:
        """``train`` as the clients use it: the optimizer resolved by the strategy's method.

        Raises ``UsageError`` when ``train.optimizer`` contradicts the method (see
        :func:`flexlora.methods.compose.local_optimizer`).
        """
        opt = local_optimizer(self.federation.strategy, self.train.optimizer)
        return self.train if opt == self.train.optimizer else replace(self.train, optimizer=opt)

    def eval_prompt_tokens(self) -> int:
        """The longest prompt an evaluation feeds the model: ``eval.max_prompt_tokens``, else
        ``train.cutoff_len`` (the server's and a Flower node's evaluations alike)."""
        return self.eval.max_prompt_tokens or self.train.cutoff_len

    def to_toml(self) -> str:
        return to_toml(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml(), encoding="utf-8")


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Defaults, then a TOML file, then ``values`` (a nested dict), then dotted overrides."""
    data: dict[str, Any] = load_toml(path) if path is not None else {}
    if values:
        _merge(data, values)
    apply_overrides(data, overrides)
    return from_dict(RunConfig, data)


def _merge(into: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
