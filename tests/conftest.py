"""Shared fixtures: seeded random LoRA factors, and a tiny causal LM built from a config.

Nothing is downloaded: the tiny LLaMA is made from ``LlamaConfig`` and saved to a temporary
folder once per test session; PEFT adapters on it are made with ``init_lora_weights=False`` so
that B is never zero and no adapter is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from flexlora.types import LoRAFactors

# Tests are deterministic: hypothesis draws the same examples on every run (CI included), so a
# red build always reproduces; `--hypothesis-profile explore` draws fresh ones to hunt bugs.
settings.register_profile("default", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=200)
settings.load_profile("default")

# Tests use tiny models: one intra-op thread is as fast as two and, unlike two, does not collapse
# when the CPU is shared (OpenMP's spinning barriers slow tiny ops down tens of times).
torch.set_num_threads(1)

TINY_LLAMA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_factors(
    m: int,
    n: int,
    r: int,
    *,
    seed: int,
    alpha: float = 16.0,
    dtype: torch.dtype = torch.float64,
    use_rslora: bool = False,
) -> LoRAFactors:
    """Gaussian LoRA factors for a (m, n) weight at rank r, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=torch.float64) / n**0.5  # (r, n)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)  # (m, r)
    return LoRAFactors(A=A.to(dtype), B=B.to(dtype), alpha=alpha, use_rslora=use_rslora)


@pytest.fixture(scope="session")
def make_factors() -> Callable[..., LoRAFactors]:
    """Factory of seeded random factors (session-scoped, so hypothesis tests may use it)."""
    return random_factors


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer LLaMA (hidden 32) saved with ``save_pretrained``; returns its folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder


def load_base(folder: Path) -> torch.nn.Module:
    """A fresh float32 copy of the saved base model in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def save_peft_adapter(
    base: Path,
    out: Path,
    r: int,
    *,
    seed: int,
    alpha: float = 16.0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> Path:
    """Save a PEFT LoRA adapter with random non-zero A and B on the tiny model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=TARGETS,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(load_base(base), config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peft_tools() -> tuple[Callable[..., Path], Callable[[Path], torch.nn.Module]]:
    """``(save_peft_adapter, load_base)`` for tests that build real PEFT adapters."""
    return save_peft_adapter, load_base
