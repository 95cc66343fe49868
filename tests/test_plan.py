"""`flexlora plan`: an 8B config planned on the meta device, sizes by hand, and the estimate
against the measured peak of a real (small) client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from flexlora.aggregation import get_aggregator
from flexlora.cli import main
from flexlora.config import load_config
from flexlora.errors import UsageError
from flexlora.models import build_tiny_llama
from flexlora.plan import (
    base_weight_bytes,
    client_memory,
    format_plan,
    model_shape,
    parse_size,
    server_memory,
)
from flexlora.types import ClientUpdate, LoRAFactors

ROOT = Path(__file__).resolve().parents[1]

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@pytest.fixture
def llama_8b(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return tmp_path


def test_plan_of_an_8b_config_allocates_no_weights(
    llama_8b: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    shape = model_shape(str(llama_8b), ["q_proj", "v_proj", "up_proj", "down_proj"])
    assert time.perf_counter() - start < 20
    assert psutil.Process().memory_info().rss - rss < 300 * 2**20  # 8B weights: 16 GB in bf16
    assert shape.params == 8_030_261_248  # LLaMA-3-8B's count
    assert len(shape.targets) == 4 * 32 and shape.kv_dim == 1024
    assert "lm_head" not in shape.quantizable and len(shape.quantizable) == 7 * 32

    cfg = load_config(values={"model": {"name": str(llama_8b), "dtype": "bfloat16"}})
    assert base_weight_bytes(shape, cfg) == 2 * shape.params
    q = shape.quantizable_params
    cfg4 = load_config(values={"model": {"name": str(llama_8b), "quantization": "4bit"}})
    # NF4: half a byte a weight, 8-bit absmax per 64 and a float32 per 256 of those; the rest
    # (embeddings, norms, lm_head) is float32 after the k-bit preparation
    assert base_weight_bytes(shape, cfg4) == int(q / 2 + q / 64 + 4 * q / 64 / 256) + 4 * (
        shape.params - q
    )

    code = main(
        [
            "plan",
            "--set",
            f"model.name={str(llama_8b)!r}",
            "--set",
            "model.quantization='4bit'",
            "--device-memory",
            "24GiB",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "8.030 B parameters" in out and "fits 24.00 GiB" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"8", "30", "30-200", "200"} <= rows.keys()
    assert rows["8"].rstrip(" |").endswith("yes")
    assert "state (U, S, Vh float32)" in out


def test_activations_and_fit_follow_checkpointing_and_batch(llama_8b: Path) -> None:
    shape = model_shape(str(llama_8b), ["q_proj", "v_proj"])
    small = load_config(values={"model": {"name": str(llama_8b)}})
    big = load_config(values={"model": {"name": str(llama_8b)}, "train": {"batch_size": 8}})
    (a,) = [c for c in client_memory(shape, small) if c.rank_type == "8"]
    (b,) = [c for c in client_memory(shape, big) if c.rank_type == "8"]
    assert b.activations == 2 * a.activations  # linear in tokens
    assert a.activations_checkpointed < a.activations / 3  # the logits stay
    assert a.total(True) < a.total(False) and a.gradients == a.adapter
    assert a.optimizer == 2 * a.adapter  # AdamW's two float32 moments


def test_server_state_is_capped_at_the_largest_client_rank() -> None:
    cfg = load_config(
        values={
            "model": {"name": "tiny-llama"},
            "lora": {"target_modules": ["q_proj", "up_proj"]},
            "federation": {"rank_types": {"a": [2, 4], "b": [8, 100]}, "clients_per_round": 3},
        }
    )
    shape = model_shape("tiny-llama", ["q_proj", "up_proj"])
    server = server_memory(shape, cfg)
    # q_proj (64, 64): k = 8; up_proj (128, 64): k = min(100, 64) = 64
    assert set(server.keep_rank.values()) == {8, 64}
    per_layer = 8 * (64 + 64 + 1) + 64 * (128 + 64 + 1)
    assert server.state == 4 * 2 * per_layer
    # stacks of 3 clients (3 * 8 * 128 < 64 * 64) vs the dense sum (3 * 100 * 192 > 128 * 64)
    assert server.accumulators == 4 * 2 * (3 * 8 * 128 + 128 * 64)


def test_parse_size() -> None:
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80 GB") == 80 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    with pytest.raises(UsageError, match="not a size"):
        parse_size("lots")
    assert parse_size(str(40 * 2**30)) == 40 * 2**30  # a number of bytes
    with pytest.raises(UsageError, match="no unit"):  # not 24 bytes: every type "no"
        parse_size("24")


@pytest.mark.parametrize("size", ["", "0", "0GiB"])
def test_an_empty_or_zero_device_memory_is_an_error(size: str) -> None:
    """``--device-memory ""`` was skipped as if not given, and ``0`` marked every type "no"."""
    from flexlora.cli import main

    with pytest.raises(UsageError, match="not a size"):
        parse_size(size)
    assert main(["plan", "--device-memory", size, "--set", "model.name='tiny-llama'"]) == 2


def measured_plan(folder: Path, batch: int, cutoff: int) -> str:
    """benchmarks/plan_check.py's output for 2 steps of the model in ``folder`` on the CPU
    (glibc returning freed activations at once, so the peak RSS is what training used)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    argv = ["--steps", "2", "--set", f"model.name={str(folder)!r}"]
    for setting in (
        f"train.batch_size={batch}",
        f"train.cutoff_len={cutoff}",
        "model.device='cpu'",
    ):
        argv += ["--set", setting]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plan_check.py"), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_estimate_is_close_to_the_measured_peak_of_a_small_client(tmp_path: Path) -> None:
    """A 4-layer LLaMA, 2,048 tokens a micro-batch: peak RSS of one client's training."""
    model, tokenizer = build_tiny_llama(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4
    )
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    stdout = measured_plan(tmp_path / "m", batch=8, cutoff=256)
    ratio = float(re.search(r"estimate / measured: ([0-9.]+)", stdout).group(1))
    assert 0.75 <= ratio <= 1.25, stdout  # the issue: within 25 % (measured 0.92)


#: SmolLM2-135M's shape (its config.json), the model `make run` trains
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def test_estimate_is_close_to_the_measured_peak_on_smollm2(tmp_path: Path) -> None:
    """SmolLM2-135M's shape with random weights (the tests have no hub), the default config
    (4 slots, the rank-200 client), batch 4 x 128: within 25 % of the measured peak RSS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flexlora.models.tiny import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()  # ids < 260 of the 49,152-entry embedding
    config = LlamaConfig(
        **SMOLLM2_135M,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    del model
    stdout = measured_plan(tmp_path / "m", batch=4, cutoff=128)
    assert "rank type 200" in stdout, stdout
    ratio = float(re.search(r"estimate / measured: ([0-9.]+)", stdout).group(1))
    assert 0.75 <= ratio <= 1.25, stdout


def test_server_keep_rank_all_and_a_number() -> None:
    shape = model_shape("tiny-llama", ["q_proj"])
    for keep, k in (("all", 64), (5, 5)):
        cfg = load_config(
            values={
                "model": {"name": "tiny-llama"},
                "lora": {"target_modules": ["q_proj"]},
                "federation": {"keep_rank": keep},
            }
        )
        assert set(server_memory(shape, cfg).keep_rank.values()) == {k}


def test_an_uncapped_server_state_is_planned_at_the_rounds_rank_not_min_m_n() -> None:
    """keep_rank = all (or a number above Σ r_i) keeps rank(ΔW) <= Σ r_i triplets, as the
    aggregator does: 3 clients of rank 8 give 24 on a 64 x 64 module, not 64."""
    shape = model_shape("tiny-llama", ["q_proj"])
    for keep, k in (("all", 24), (40, 24), (5, 5)):
        cfg = load_config(
            values={
                "model": {"name": "tiny-llama"},
                "lora": {"target_modules": ["q_proj"]},
                "federation": {
                    "keep_rank": keep,
                    "clients_per_round": 3,
                    "rank_types": {"r8": [8, 8]},
                },
            }
        )
        server = server_memory(shape, cfg)
        assert set(server.keep_rank.values()) == {k}
        assert server.state == 4 * 2 * k * (64 + 64 + 1)  # 2 layers of U, S, Vh in float32
    g = torch.Generator().manual_seed(0)
    updates = [
        ClientUpdate(f"c{i}", 1, {"q": LoRAFactors(torch.randn(8, 64, generator=g),
                                                   torch.randn(64, 8, generator=g), 16.0)})
        for i in range(3)
    ]  # fmt: skip
    assert get_aggregator("flexlora", keep_rank="all").aggregate(updates)["q"].rank == 24


def test_one_config_reader_for_every_kind_of_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plan, the Flower server's meta shapes and parallel_clients=auto read configs one way:
    a folder, its config.json and a GGUF file give the same model, and a GGUF file is read
    from its metadata (never converted just to learn shapes)."""
    from flexlora.models import gguf as gguf_mod
    from flexlora.models import target_linear_modules
    from flexlora.models.meta import meta_model, model_config
    from tests.helpers import write_llama_gguf

    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "cache"))
    model, tokenizer = build_tiny_llama(seed=5, hidden_size=32, intermediate_size=64)
    model.save_pretrained(tmp_path / "folder")
    tokenizer.save_pretrained(tmp_path / "folder")
    gguf = write_llama_gguf(model, tokenizer, tmp_path / "m.gguf")

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted a GGUF file to read its config")

    monkeypatch.setattr(gguf_mod, "convert_gguf", no_conversion)
    targets = ["q_proj", "v_proj", "down_proj"]
    expected = target_linear_modules(model, targets)
    for name in (tmp_path / "folder", tmp_path / "folder" / "config.json", gguf):
        assert model_config(str(name)).hidden_size == 32, name
        meta = meta_model(str(name))
        assert all(p.is_meta for p in meta.parameters())
        assert target_linear_modules(meta, targets) == expected, name
        assert model_shape(str(name), targets).targets == expected, name
    with pytest.raises(UsageError, match="does not exist"):
        model_config(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no config\.json"):
        model_config(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UsageError, match="local Hugging Face cache"):
        model_config("some-org/not-cached-model")


def test_parallel_clients_auto_uses_the_plans_client_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One more client of a batched pass costs what plan says a client needs beside the base
    (largest rank type, at the configured checkpointing); auto fits that into half the free
    memory."""
    from flexlora.models import target_linear_modules
    from flexlora.schedule import module_ranks
    from flexlora.training import capacity

    model, _ = build_tiny_llama()
    needs = {}
    for checkpointing in (False, True):
        cfg = load_config(
            values={
                "model": {"name": "tiny-llama"},
                "train": {"parallel_clients": "auto", "gradient_checkpointing": checkpointing},
                "federation": {"clients_per_round": 8},
            }
        )
        shapes = target_linear_modules(model, cfg.lora.target_modules)
        slots = {
            t: module_ranks(list(shapes), r, cfg.lora.ffn_modules)
            for t, r in cfg.federation.rank_types.items()
        }
        need = capacity.client_bytes(model, slots, cfg)
        shape = model_shape("tiny-llama", list(cfg.lora.target_modules))
        rows = client_memory(shape, cfg)
        assert need == max(c.total() - c.base for c in rows)
        monkeypatch.setattr(capacity, "free_bytes", lambda device, n=need: 2 * 3 * n + 1)
        assert capacity.auto_parallel_clients(model, slots, cfg) == 3
        monkeypatch.setattr(capacity, "free_bytes", lambda device, n=need: 100 * n)
        assert capacity.auto_parallel_clients(model, slots, cfg) == 8  # clients_per_round
        needs[checkpointing] = need
    assert needs[True] < needs[False]  # checkpointing leaves room for more clients


@pytest.mark.parametrize(("strategy", "modelled"), [("flexlora", True), ("hetlora", False)])
def test_server_table_says_when_it_is_not_the_strategys_own(strategy: str, modelled: bool) -> None:
    cfg = load_config(
        values={"model": {"name": "tiny-llama"}, "federation": {"strategy": strategy}}
    )
    text = format_plan(cfg)
    assert "server memory" in text
    assert ("does not model" in text) != modelled, text


def _saved_bytes_per_token(model_dir: Path, layers: int, tokens: int = 16) -> int:
    """Bytes autograd saves for the backward pass of a LoRA forward (parameters excluded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir / str(layers), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    params = {p.data_ptr() for p in peft.parameters()}
    seen: dict[tuple[int, tuple[int, ...]], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peft(input_ids=torch.randint(0, 128, (1, tokens))).logits.sum()
    return sum(seen.values())


@pytest.mark.parametrize("head_dim", [16, 32])
def test_layer_activations_follow_the_configs_own_head_dim(tmp_path: Path, head_dim: int) -> None:
    """A config's explicit head_dim (Gemma, Qwen3: heads x head_dim != hidden) sizes q, k, v
    and the attention's output; the estimate was hidden-sized and fell short by 15 % here.
    Per layer and token: the saved bytes of a 2-layer model minus those of a 1-layer one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flexlora.plan.memory import layer_activation_bytes

    for layers in (1, 2):
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            vocab_size=128,
        )
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / str(layers))
    tokens = 16
    two, one = (_saved_bytes_per_token(tmp_path, n, tokens) for n in (2, 1))
    measured = (two - one) / tokens
    shape = model_shape(str(tmp_path / "1"), ["q_proj", "v_proj"])
    assert shape.q_dim == 4 * head_dim and shape.kv_dim == 2 * head_dim
    cfg = load_config(
        values={
            "model": {"name": str(tmp_path / "1"), "dtype": "float32"},
            "lora": {"dropout": 0.0},
        }
    )
    estimate = layer_activation_bytes(shape, cfg, dict.fromkeys(shape.targets, 4))
    assert abs(estimate - measured) <= 0.01 * measured, (estimate, measured)


def test_a_soft_cap_on_the_logits_keeps_one_more_logits_tensor(tmp_path: Path) -> None:
    """Gemma 2 computes cap·tanh(logits / cap): autograd keeps the tanh's output, one more
    logits-sized tensor (the logits term was 14 % low in bf16). The saved bytes of the same
    model with and without the cap differ by exactly what the plan adds."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from flexlora.plan.memory import activation_bytes
    from tests.test_architectures import LLAMA_LIKE

    tokens, extra = 16, {}
    for cap in (30.0, None):
        one_layer = {**LLAMA_LIKE, "num_hidden_layers": 1}
        config = Gemma2Config(**one_layer, head_dim=8, vocab_size=128, final_logit_softcapping=cap)
        folder = tmp_path / str(cap) / "1"
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        saved = _saved_bytes_per_token(folder.parent, 1, tokens)
        shape = model_shape(str(folder), ["q_proj", "v_proj"])
        assert shape.logit_softcapping == (cap is not None)
        cfg = load_config(
            values={
                "model": {"name": str(folder), "dtype": "float32"},
                "train": {"batch_size": 1, "cutoff_len": tokens},
            }
        )
        planned = activation_bytes(shape, cfg, dict.fromkeys(shape.targets, 4), False)
        extra[cap] = (saved, planned)
    measured = extra[30.0][0] - extra[None][0]
    assert measured == 4 * tokens * 128  # one float32 (tokens, vocab) tensor
    assert extra[30.0][1] - extra[None][1] == measured


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_gpt2_layer_keeps_its_composed_gelu_and_its_dropout(
    tmp_path: Path, dropout: float
) -> None:
    """GPT-2's gelu_new is composed of ops that keep 4 tensors of the MLP's width (a fused
    GELU keeps 1), and its dropout (0.1 by default, active while clients train) keeps masks
    and, on the CPU, the attention probabilities (sdpa's math path): the estimate was 0.67 of
    the measured peak there. Per layer and token, training mode, float32 on the CPU: the
    saved bytes of a 2-layer model minus those of a 1-layer one."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from flexlora.plan.memory import layer_activation_bytes

    tokens, rates = 32, {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    saved = {}
    for layers in (1, 2):
        config = GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=128, **rates)
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(tmp_path / str(layers))
        model = GPT2LMHeadModel.from_pretrained(tmp_path / str(layers), dtype=torch.float32)
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0))
        peft.train()
        params = {p.data_ptr() for p in peft.parameters()}
        seen: dict[int, int] = {}

        def pack(
            t: torch.Tensor, seen: dict[int, int] = seen, params: set = params
        ) -> torch.Tensor:
            storage = t.untyped_storage()
            if t.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            peft(input_ids=torch.randint(0, 128, (1, tokens))).logits.sum()
        saved[layers] = sum(seen.values())
    measured = (saved[2] - saved[1]) / tokens
    shape = model_shape(str(tmp_path / "1"), ["c_attn"])
    assert shape.act_saved == 4.0 and shape.attn_dropout == shape.hidden_dropout == dropout
    cfg = load_config(
        values={
            "model": {"name": str(tmp_path / "1"), "dtype": "float32", "device": "cpu"},
            "lora": {"dropout": 0.0},
            "train": {"cutoff_len": tokens},
        }
    )
    estimate = layer_activation_bytes(shape, cfg, dict.fromkeys(shape.targets, 4))
    assert abs(estimate - measured) <= 0.1 * measured, (estimate, measured)
