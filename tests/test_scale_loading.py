"""Large-model loading on CPU: bf16, 4-bit (bitsandbytes NF4) and 8-bit (LLM.int8) runs,
gradient checkpointing, GGUF files as ``model.name``, GPT-2's Conv1D layers and the error for
layers that cannot adapt."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel

from flexlora.config import ModelConfig, TrainConfig, load_config
from flexlora.errors import UsageError
from flexlora.models import (
    build_tiny_llama,
    keep_4bit_layout,
    load_base_model,
    load_model,
    prepare_for_training,
    target_linear_modules,
)
from flexlora.models import gguf as gguf_mod
from flexlora.schedule import module_ranks
from flexlora.simulation.runner import FederatedRun
from flexlora.training.adapters import AdapterHost
from flexlora.training.client import IGNORE_INDEX, TokenizedExample, train_local
from flexlora.types import LoRAFactors
from tests.helpers import write_llama_gguf
from tests.sim_helpers import make_dataset, tiny_config

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _quick_run(
    tmp_path: Path, model: dict, evaluate: bool = True
) -> tuple[FederatedRun, list[dict]]:
    """One round of two clients on tiny-llama loaded from the config, evaluated after it."""
    cfg = tiny_config(
        str(tmp_path / "run"),
        model=model,
        train={"local_steps": 1, "gradient_checkpointing": True},
        federation={"rounds": 1, "clients_per_round": 2},
        eval={
            "at_start": False,
            "unseen": evaluate,
            "max_examples_per_client": 1,
            "max_new_tokens": 2,
        },
    )
    sim = FederatedRun(cfg, dataset=make_dataset(n_seen=4, n_unseen=1, per_client=6))
    return sim, sim.run()


def _frozen_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def _check_run(sim: FederatedRun, rows: list[dict], tmp_path: Path, evaluate: bool = True) -> None:
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["aggregated"] and ("rouge_l_unseen" in rows[0]) == evaluate
    lora = [p for n, p in sim.worker.host.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    folder = tmp_path / "run" / "adapters" / "rank-8"
    base, _ = build_tiny_llama(seed=0)
    peft = PeftModel.from_pretrained(base, folder)
    a = peft.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.shape == (8, 64) and torch.isfinite(a).all()


def test_bf16_run_trains_evaluates_and_exports(tmp_path: Path) -> None:
    sim, rows = _quick_run(tmp_path, {"name": "tiny-llama", "dtype": "bfloat16"})
    q = sim.worker.host.layers["model.layers.0.self_attn.q_proj"].get_base_layer()
    assert q.weight.dtype == torch.bfloat16
    _check_run(sim, rows, tmp_path)


def _quantized_run(tmp_path: Path, model: dict, kind: type) -> torch.nn.Module:
    """One round of two clients on a quantized tiny-llama, evaluated after it (through an
    adapter), adapters exported; returns the base whose quantized weights it checked."""
    cfg = tiny_config(
        str(tmp_path / "run"),
        model={"name": "tiny-llama", **model},
        train={"local_steps": 1, "gradient_checkpointing": True},
        federation={"rounds": 1, "clients_per_round": 2},
        eval={"at_start": False, "unseen": True, "max_examples_per_client": 1},
    )
    base, tokenizer = load_model(cfg.model)
    quantized = [m for m in base.modules() if isinstance(m, kind)]
    assert len(quantized) == 14  # 2 layers x 7 projections; lm_head stays unquantized
    assert target_linear_modules(base, ["q_proj"])["model.layers.0.self_attn.q_proj"] == (64, 64)
    # state_dict: what bitsandbytes stores (packed 4-bit weights, repacked reversibly for its
    # CPU kernel; int8 rows and their scales SCB), whichever attributes hold it in between
    packed = [{k: v.clone() for k, v in m.state_dict().items()} for m in quantized]
    sim = FederatedRun(
        cfg,
        dataset=make_dataset(n_seen=4, n_unseen=1, per_client=6),
        model_and_tokenizer=(base, tokenizer),
    )
    rows = sim.run()
    layer = sim.worker.host.layers["model.layers.0.self_attn.q_proj"].get_base_layer()
    assert isinstance(layer, kind)
    # k-bit preparation: what is not quantized is float32, as QLoRA trains
    assert sim.worker.host.model.base_model.model.model.embed_tokens.weight.dtype == torch.float32
    for m, before in zip(quantized, packed, strict=True):  # nothing written into the base
        after = m.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    assert rows[0]["train_loss"] > 0
    _check_run(sim, rows, tmp_path)
    return base


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (the 'quant' extra)")
def test_4bit_nf4_run_trains_evaluates_and_exports(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    model = {"quantization": "4bit", "bnb_4bit_quant_type": "nf4"}
    base = _quantized_run(
        tmp_path, {**model, "bnb_4bit_compute_dtype": "bfloat16"}, bnb.nn.Linear4bit
    )
    q = base.model.layers[0].self_attn.q_proj.get_base_layer()  # PEFT wrapped it in place
    assert q.weight.quant_type == "nf4" and q.compute_dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (the 'quant' extra)")
def test_4bit_fp4_without_double_quantization_runs(tmp_path: Path) -> None:
    """FP4 and single quantization (absmax kept in float32) train, evaluate and export too."""
    import bitsandbytes as bnb

    model = {"quantization": "4bit", "bnb_4bit_quant_type": "fp4"}
    base = _quantized_run(
        tmp_path, {**model, "bnb_4bit_use_double_quant": False}, bnb.nn.Linear4bit
    )
    q = base.model.layers[0].self_attn.q_proj.get_base_layer()
    assert q.weight.quant_type == "fp4" and not q.weight.quant_state.nested


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (the 'quant' extra)")
def test_4bit_layers_keep_their_stored_layout_on_every_cpu() -> None:
    """bitsandbytes repacks a Linear4bit for its AVX512-BF16 CPU kernel at a no-grad eval
    forward (scales rounded to bf16, re-quantized when read back), and with a bias every
    training forward after it fails in place; keep_4bit_layout turns that off, and undoes a
    repack that already happened, whatever this machine's CPU."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(64, 64), requires_grad=False, quant_type="nf4", compress_statistics=True
    )._quantize("cpu")
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.support_avx512bf16_for_cpu = True  # as on an AVX512-BF16 CPU
    layer.eval()
    x = torch.randn(3, 64)
    repacked = True
    try:
        with torch.no_grad():
            layer(x)
    except Exception:  # no fused kernel on this CPU: the packed layout cannot run here
        repacked = False
    if repacked:
        assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    model = torch.nn.Sequential(layer)
    assert keep_4bit_layout(model) == 1
    assert not layer.support_avx512bf16_for_cpu
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    with torch.no_grad():
        layer(x)  # an eval forward no longer repacks
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    layer.train()
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()  # the bias path that failed after a repack
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    if not repacked:  # a repack's round trip re-quantizes the scales: compare only without one
        after = layer.state_dict()
        assert all(torch.equal(after[k], v) for k, v in stored.items())


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (the 'quant' extra)")
def test_4bit_base_with_biases_trains_after_an_evaluation(tmp_path: Path) -> None:
    """Qwen2 (biased q/k/v) on a 4-bit base, evaluated at the start and after each round:
    every client of both rounds is aggregated, and the quantized base is unchanged."""
    import bitsandbytes as bnb
    import transformers as tf

    from tests.test_architectures import IDS, LLAMA_LIKE, save_model

    # bitsandbytes' CPU NF4 needs rows of at least one 64-entry block: hidden 64
    config = tf.Qwen2Config(**{**LLAMA_LIKE, "hidden_size": 64, "intermediate_size": 128}, **IDS)
    folder = save_model(config, tmp_path / "qwen2")
    cfg = tiny_config(
        str(tmp_path / "run"),
        model={"name": str(folder), "quantization": "4bit"},
        lora={"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        train={"local_steps": 1},
        federation={"rounds": 2, "clients_per_round": 2},
        eval={"at_start": True, "max_examples_per_client": 1, "max_new_tokens": 2},
    )
    base, tokenizer = load_model(cfg.model)
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and any(m.bias is not None for m in quantized)
    packed = [{k: v.clone() for k, v in m.state_dict().items()} for m in quantized]
    rows = FederatedRun(
        cfg,
        dataset=make_dataset(n_seen=4, n_unseen=1, per_client=6),
        model_and_tokenizer=(base, tokenizer),
    ).run()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(len(r["aggregated"]) == 2 and not r.get("failed") for r in rows[1:]), rows
    for m, before in zip(quantized, packed, strict=True):
        after = m.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (the 'quant' extra)")
def test_8bit_run_trains_evaluates_and_exports(tmp_path: Path) -> None:
    """LLM.int8 (bitsandbytes Linear8bitLt) runs on the CPU with bitsandbytes >= 0.50."""
    import bitsandbytes as bnb

    base = _quantized_run(tmp_path, {"quantization": "8bit"}, bnb.nn.Linear8bitLt)
    q = base.model.layers[0].self_attn.q_proj.get_base_layer()  # PEFT wrapped it in place
    assert q.weight.dtype == torch.int8 and set(q.state_dict()) >= {"weight", "SCB"}


def _grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    model, _ = build_tiny_llama(seed=3)
    prepare_for_training(model, TrainConfig(gradient_checkpointing=checkpointing))
    # transformers >= 5.2x renamed the flag (the old name warns)
    flag = getattr(type(model), "is_activation_checkpointing", None)
    on = model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing
    assert on == checkpointing
    modules = target_linear_modules(model, ["q_proj", "v_proj", "down_proj"])
    host = AdapterHost(
        model, ["q_proj", "v_proj", "down_proj"], {"s": dict.fromkeys(modules, 4)}, 8
    )
    params = host.activate("s")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)  # B != 0: A gets gradients too
    host.model.train()
    ids = torch.randint(4, 260, (2, 24), generator=torch.Generator().manual_seed(1))  # (b, t)
    out = host.model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in host.model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_leaves_gradients_unchanged() -> None:
    plain, checkpointed = _grads(False), _grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 3 * 2
    for name, g in plain.items():
        assert g.dtype == torch.float32 and g.abs().max() > 0, name
        assert (g - checkpointed[name]).abs().max() <= 1e-6, name


def test_gguf_file_as_model_name_converts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "cache"))
    model, tokenizer = build_tiny_llama(seed=5, hidden_size=32, intermediate_size=64)
    path = write_llama_gguf(model, tokenizer, tmp_path / "my-model.gguf")
    loaded, loaded_tok = load_base_model(str(path))
    state, again = model.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert loaded_tok("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    (folder,) = (tmp_path / "cache" / "models" / "gguf").iterdir()
    assert folder.name.startswith("my-model-")

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_mod, "convert_gguf", no_conversion)
    cached, _ = load_base_model(str(path), dtype="bfloat16")  # the cache, at another dtype
    assert cached.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with pytest.raises(UsageError, match="does not exist"):
        load_base_model(str(tmp_path / "missing.gguf"))


def test_a_gguf_file_that_cannot_be_read_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a GGUF, an empty file, an architecture transformers does not read: a UsageError
    naming the file (the run's clear error), not a ValueError traceback."""
    import gguf
    import numpy as np

    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "text.gguf").write_text("not a gguf\n", encoding="utf-8")
    (tmp_path / "empty.gguf").write_bytes(b"")
    writer = gguf.GGUFWriter(tmp_path / "rwkv.gguf", arch="rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for name, why in [("text", "magic"), ("empty", "empty"), ("rwkv", "rwkv6")]:
        path = tmp_path / f"{name}.gguf"
        with pytest.raises(UsageError, match=rf"could not convert GGUF file .*{name}\.gguf.*{why}"):
            load_base_model(str(path))
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-converted


def test_a_gguf_file_without_the_gguf_package_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers reads GGUF through the gguf package; without it the load says to install
    it, naming the file, rather than an ImportError traceback."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import import_utils

    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "cache"))
    model, tokenizer = build_tiny_llama(seed=5, hidden_size=32, intermediate_size=64)
    path = write_llama_gguf(model, tokenizer, tmp_path / "my-model.gguf")
    monkeypatch.setattr(import_utils, "is_gguf_available", lambda *a, **k: False)
    monkeypatch.setattr(gguf_utils, "is_gguf_available", lambda *a, **k: False, raising=False)
    with pytest.raises(UsageError, match=r"my-model\.gguf needs the gguf package"):
        load_base_model(str(path))


def _gpt2(**dropouts: float) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=260, n_positions=64, n_embd=32, n_layer=2, n_head=2, **dropouts)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


def test_gpt2_conv1d_layers_adapt_with_out_in_shapes() -> None:
    model = _gpt2()
    shapes = target_linear_modules(model, ["c_attn", "c_proj", "c_fc"])
    assert shapes["transformer.h.0.attn.c_attn"] == (96, 32)  # fused q, k, v
    assert shapes["transformer.h.0.attn.c_proj"] == (32, 32)
    assert shapes["transformer.h.0.mlp.c_fc"] == (128, 32)
    assert shapes["transformer.h.0.mlp.c_proj"] == (32, 128)
    ranks = module_ranks(list(shapes), [2, 6], ["c_fc", "mlp.c_proj"])
    assert ranks["transformer.h.1.mlp.c_proj"] == 6 and ranks["transformer.h.1.attn.c_proj"] == 2
    host = AdapterHost(model, ["c_attn", "c_proj", "c_fc"], {"t": ranks}, alpha=4)
    assert host.shapes() == shapes
    start = {}
    gen = torch.Generator().manual_seed(2)
    for name, (m, n) in shapes.items():
        r = ranks[name]
        start[name] = LoRAFactors(
            A=torch.randn(r, n, generator=gen), B=torch.randn(m, r, generator=gen), alpha=4
        )
    example = TokenizedExample(list(range(5, 25)), [IGNORE_INDEX] * 4 + list(range(9, 25)))
    cfg = TrainConfig(local_steps=1, batch_size=1, lr=1e-3)
    result = train_local(host, "t", start, [example], cfg, seed=0, pad_id=0)
    for name, (m, n) in shapes.items():
        f = result.factors[name]
        assert f.B.shape == (m, ranks[name]) and f.A.shape == (ranks[name], n), name
        assert not torch.equal(f.A, start[name].A), name
    # the adapter adds x @ (s·B·A)^T to the Conv1D's output: (out, in) is the right orientation
    host.load("t", start)
    host.activate("t")
    layer = host.layers["transformer.h.0.mlp.c_fc"]
    x = torch.randn(3, 32, generator=gen)  # (tokens, in)
    with torch.no_grad():
        added = layer(x) - layer.get_base_layer()(x)  # (tokens, out)
        f = start["transformer.h.0.mlp.c_fc"]
        expected = x @ (f.scaling * f.B @ f.A).T  # (tokens, out)
    assert torch.allclose(added, expected, atol=1e-5)


def test_unadaptable_layer_kind_is_a_clear_error() -> None:
    model, _ = build_tiny_llama()
    with pytest.raises(UsageError, match=r"model\.embed_tokens is an Embedding, which cannot"):
        target_linear_modules(model, ["embed_tokens"])
    with pytest.raises(UsageError, match=r"transformer\.h\.0\.ln_1 is a LayerNorm"):
        target_linear_modules(_gpt2(), ["c_attn", "ln_1"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("quantization", "3bit", "model.quantization"),
        ("bnb_4bit_quant_type", "int4", "nf4 or fp4"),
        ("bnb_4bit_compute_dtype", "float64", "bnb_4bit_compute_dtype"),
        ("device_map", "everywhere", "model.device_map"),
    ],
)
def test_model_loading_keys_are_checked(key: str, value: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ModelConfig(**{key: value})
    with pytest.raises(UsageError, match="cannot be combined"):
        ModelConfig(device="cpu", device_map="auto")


def test_device_map_naming_one_device_is_passed_on(tmp_path: Path) -> None:
    """``model.device_map = "cpu"`` (or cuda:N, or a GPU index) is one of from_pretrained's own
    forms: accepted alone or with the same model.device, refused against another device."""
    assert ModelConfig(device_map="cpu").device_map == "cpu"
    assert ModelConfig(device="cpu", device_map="cpu").device_map == "cpu"
    assert ModelConfig(device="cuda:1", device_map="cuda:1").device_map == "cuda:1"
    with pytest.raises(UsageError, match=r"disagrees with model\.device"):
        ModelConfig(device="cpu", device_map="cuda:0")
    # a GPU index as TOML or --set writes it, a number: the same as its text
    assert ModelConfig(device_map=0).device_map == "0"  # type: ignore[arg-type]
    assert load_config(values={"model": {"device_map": 1}}).model.device_map == "1"
    with pytest.raises(UsageError, match="device_map"):
        load_config(values={"model": {"device_map": True}})
    folder = tmp_path / "tiny"
    model, tokenizer = build_tiny_llama()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded, _ = load_base_model(str(folder), device="auto", device_map="cpu")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}


_FILE_PAGES = """
import sys
from flexlora.models.loading import load_base_model

def file_rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024

import gc

# a first load maps the libraries loading needs (file pages too); what a second load adds
# after the first is gone is the checkpoint itself
model, _ = load_base_model(sys.argv[1], "float32", quantization="4bit")
del model
gc.collect()
before = file_rss()
model, _ = load_base_model(sys.argv[1], "float32", quantization="4bit")
print(file_rss() - before)
"""


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (the 'quant' extra)")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_quantized_cpu_load_leaves_no_view_of_the_checkpoint_file(tmp_path: Path) -> None:
    """Float32 embeddings and norms loaded as float32 were views of the memory-mapped
    checkpoint, which kept the whole mapping (every page the quantization had read)
    resident: ~80 % of a 515 MiB SmolLM2-135M file after a 4-bit load. The load copies them."""
    import subprocess
    import sys

    model, tokenizer = build_tiny_llama(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4
    )
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    size = (tmp_path / "m" / "model.safetensors").stat().st_size  # ~35 MB of float32
    done = subprocess.run(
        [sys.executable, "-c", _FILE_PAGES, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grown = int(done.stdout.strip().splitlines()[-1])
    assert grown < 0.2 * size, (grown, size)
