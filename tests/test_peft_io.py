"""PEFT adapter folders <-> flexlora factors: round trips, PEFT itself, and every refusal."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flexlora.errors import InvalidUpdateError
from flexlora.lora import peft_io
from flexlora.lora.peft_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_config,
    load_adapter,
    write_adapter,
    write_adapters_atomically,
)
from flexlora.types import match_pattern

PREFIX = "base_model.model."
SHAPES = {  # the tiny LLaMA of conftest: (out, in) per target
    "q_proj": (32, 32),
    "k_proj": (16, 32),
    "v_proj": (16, 32),
    "o_proj": (32, 32),
    "gate_proj": (64, 32),
    "up_proj": (64, 32),
    "down_proj": (32, 64),
}


def module_path(layer: int, leaf: str) -> str:
    block = "mlp" if leaf in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{block}.{leaf}"


def tiny_factors(make_factors, ranks: dict[str, int], alphas: dict[str, float]):
    """Factors for every target of the tiny LLaMA; ranks and alphas by module (default 4/8)."""
    out = {}
    for layer in range(2):
        for i, (leaf, (m, n)) in enumerate(SHAPES.items()):
            name = module_path(layer, leaf)
            r, alpha = ranks.get(name, 4), alphas.get(name, 8.0)
            out[name] = make_factors(m, n, r, seed=10 * layer + i, alpha=alpha, dtype=torch.float32)
    return out


def write_raw(folder: Path, config: object, tensors: dict[str, torch.Tensor] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / ADAPTER_CONFIG).write_text(text)
    if tensors is not None:
        save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    return folder


def good_tensors(r: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(r, 6, generator=g),
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(5, r, generator=g),
    }


CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 16}


# --- round trips -----------------------------------------------------------------------------


def test_write_then_load_round_trips_ranks_and_alphas(tmp_path, make_factors) -> None:
    ranks = {module_path(0, "gate_proj"): 6, module_path(1, "gate_proj"): 6}
    ranks[module_path(1, "up_proj")] = 2  # layer-specific: needs the full module name
    alphas = {module_path(0, "down_proj"): 3.5, module_path(1, "down_proj"): 3.5}
    factors = tiny_factors(make_factors, ranks, alphas)
    write_adapter(tmp_path / "a", factors, template={"base_model_name_or_path": "tiny"})
    cfg = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == {"gate_proj": 6, module_path(1, "up_proj"): 2}
    assert cfg["alpha_pattern"] == {"down_proj": 3.5}
    assert cfg["base_model_name_or_path"] == "tiny" and cfg["inference_mode"] is True
    assert sorted(cfg["target_modules"]) == sorted(SHAPES)
    loaded = load_adapter(tmp_path / "a")
    assert loaded.source == str(tmp_path / "a")
    assert set(loaded.factors) == set(factors)
    for name, f in factors.items():
        g = loaded.factors[name]
        assert torch.equal(g.A, f.A) and torch.equal(g.B, f.B)
        assert (g.alpha, g.rank, g.use_rslora) == (f.alpha, f.rank, False)


def test_patterns_we_write_mean_the_same_to_peft(make_factors) -> None:
    from peft.utils.other import get_pattern_key

    ranks = {module_path(1, "up_proj"): 2, module_path(0, "k_proj"): 5, module_path(1, "k_proj"): 5}
    cfg = adapter_config(tiny_factors(make_factors, ranks, {}))
    for name in tiny_factors(make_factors, {}, {}):
        ours = match_pattern(cfg["rank_pattern"], name)
        peft_key = get_pattern_key(cfg["rank_pattern"].keys(), name)
        peft_rank = cfg["rank_pattern"].get(peft_key, cfg["r"])
        assert (cfg["rank_pattern"][ours] if ours else cfg["r"]) == peft_rank == ranks.get(name, 4)


def test_adapter_written_by_us_loads_in_peft(tmp_path, make_factors, tiny_llama, peft_tools):
    """PEFT reads our rank_pattern / alpha_pattern and rebuilds the same ΔW per module."""
    from peft import PeftModel

    _, load_base = peft_tools
    ranks = {module_path(1, "up_proj"): 2, module_path(0, "gate_proj"): 7}
    alphas = {module_path(0, "q_proj"): 5.0, module_path(1, "q_proj"): 5.0}
    factors = tiny_factors(make_factors, ranks, alphas)
    write_adapter(tmp_path / "ours", factors, template={"task_type": "CAUSAL_LM"})
    model = PeftModel.from_pretrained(load_base(tiny_llama), tmp_path / "ours")
    seen = set()
    for name, module in model.base_model.model.named_modules():
        if name in factors:
            f = factors[name]
            assert module.r["default"] == f.rank
            assert module.scaling["default"] == pytest.approx(f.scaling)
            delta = module.scaling["default"] * (
                module.lora_B["default"].weight @ module.lora_A["default"].weight
            )
            torch.testing.assert_close(delta, f.delta())
            seen.add(name)
    assert seen == set(factors)


def test_loads_an_adapter_saved_by_peft(tmp_path, tiny_llama, peft_tools) -> None:
    """Ranks and alphas from PEFT's own rank_pattern / alpha_pattern and its key layout."""
    from peft import PeftModel

    save_peft_adapter, load_base = peft_tools
    folder = save_peft_adapter(
        tiny_llama,
        tmp_path / "peft",
        3,
        seed=1,
        alpha=12.0,
        rank_pattern={"gate_proj": 5},
        alpha_pattern={"down_proj": 4.0},
    )
    loaded = load_adapter(folder)
    model = PeftModel.from_pretrained(load_base(tiny_llama), folder)
    modules = dict(model.base_model.model.named_modules())
    assert len(loaded.factors) == 14
    for name, f in loaded.factors.items():
        leaf = name.rsplit(".", 1)[-1]
        assert f.rank == (5 if leaf == "gate_proj" else 3)
        assert f.alpha == (4.0 if leaf == "down_proj" else 12.0)
        module = modules[name]
        torch.testing.assert_close(f.A, module.lora_A["default"].weight)
        torch.testing.assert_close(f.B, module.lora_B["default"].weight)
        assert f.scaling == pytest.approx(module.scaling["default"])
        assert bool(f.B.abs().sum() > 0)  # init_lora_weights=False: not a no-op


def test_loads_keys_with_an_adapter_name() -> None:
    meta = peft_io.AdapterMeta(r=2, lora_alpha=4.0)
    t = good_tensors()
    named = {k.replace(".weight", ".default.weight"): v for k, v in t.items()}
    out = peft_io.factors_from_state_dict(named, meta, "c")
    assert list(out) == ["model.layers.0.self_attn.q_proj"]


# --- refusals --------------------------------------------------------------------------------


def expect_refusal(folder: Path, reason: str, *needles: str) -> InvalidUpdateError:
    with pytest.raises(InvalidUpdateError) as info:
        load_adapter(folder)
    err = info.value
    assert err.reason == reason, str(err)
    assert err.client == str(folder) and str(folder) in str(err)
    for needle in needles:
        assert needle in str(err)
    return err


def test_refuses_a_missing_folder_config_or_weights(tmp_path) -> None:
    expect_refusal(tmp_path / "nope", "missing", "does not exist")
    (tmp_path / "empty").mkdir()
    expect_refusal(tmp_path / "empty", "missing", ADAPTER_CONFIG)
    expect_refusal(write_raw(tmp_path / "noweights", CFG, None), "missing", ADAPTER_WEIGHTS)


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_refuses_adapter_model_bin_without_unpickling_it(tmp_path) -> None:
    folder = write_raw(tmp_path / "bin", CFG, None)
    marker = tmp_path / "unpickled"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    err = expect_refusal(folder, "missing", "adapter_model.bin", "safe_serialization=True")
    assert "never loaded" in err.detail
    assert not marker.exists()
    pickle.loads((folder / "adapter_model.bin").read_bytes()).close()  # the trap is armed
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"],
)
def test_refuses_corrupt_safetensors(tmp_path, payload: bytes) -> None:
    folder = write_raw(tmp_path / "bad", CFG, None)
    (folder / ADAPTER_WEIGHTS).write_bytes(payload)
    expect_refusal(folder, "unreadable", ADAPTER_WEIGHTS)


def test_refuses_truncated_safetensors(tmp_path) -> None:
    folder = write_raw(tmp_path / "cut", CFG, good_tensors())
    data = (folder / ADAPTER_WEIGHTS).read_bytes()
    (folder / ADAPTER_WEIGHTS).write_bytes(data[: len(data) - 20])
    expect_refusal(folder, "unreadable", ADAPTER_WEIGHTS)


@pytest.mark.parametrize(
    ("config", "reason", "needle"),
    [
        ("{not json", "unreadable", ADAPTER_CONFIG),
        ("[1, 2]", "config", "not an object"),
        ({"peft_type": "IA3", "r": 2}, "config", "IA3"),
        ({"peft_type": "LORA", "r": 2, "use_dora": True}, "config", "use_dora"),
        ({"peft_type": "LORA"}, "config", "'r'"),
        ({"peft_type": "LORA", "r": "two"}, "config", "not a valid LoRA config"),
        ({"peft_type": "LORA", "r": 2, "rank_pattern": {"q_proj": "x"}}, "config", "valid"),
    ],
)
def test_refuses_bad_configs(tmp_path, config: object, reason: str, needle: str) -> None:
    expect_refusal(write_raw(tmp_path / "cfg", config, good_tensors()), reason, needle)


def test_refuses_a_non_utf8_config(tmp_path) -> None:
    folder = write_raw(tmp_path / "latin", CFG, good_tensors())
    (folder / ADAPTER_CONFIG).write_bytes(b'{"r": "\xff"}')
    expect_refusal(folder, "unreadable", ADAPTER_CONFIG)


Q_NAME = "model.layers.0.self_attn.q_proj"


def bad_state(kind: str) -> dict[str, torch.Tensor]:
    t = good_tensors()
    a_key, b_key = list(t)
    if kind == "unsupported_key":
        t[f"{PREFIX}model.embed_tokens.lora_embedding_A"] = torch.ones(2, 4)
    elif kind == "missing_factor":
        del t[b_key]
    elif kind == "duplicate":
        t[a_key.replace(".weight", ".default.weight")] = t[a_key].clone()
    elif kind == "rank":
        t = good_tensors(r=3)
    elif kind == "shape":
        t[b_key] = torch.ones(5, 3)
    elif kind == "shape3d":
        t[a_key] = torch.ones(2, 6, 1)
    elif kind in ("nan", "inf"):
        t[b_key][1, 1] = float("nan") if kind == "nan" else float("inf")
    elif kind == "dtype":
        t[a_key] = torch.ones(2, 6, dtype=torch.int32)
    elif kind == "empty":
        t = {}
    return t


@pytest.mark.parametrize(
    ("kind", "reason", "module"),
    [
        ("unsupported_key", "unsupported_key", None),
        ("missing_factor", "missing_factor", Q_NAME),
        ("duplicate", "duplicate", Q_NAME),
        ("rank", "rank", Q_NAME),
        ("shape", "shape", Q_NAME),
        ("shape3d", "shape", Q_NAME),
        ("nan", "nonfinite", Q_NAME),
        ("inf", "nonfinite", Q_NAME),
        ("dtype", "dtype", Q_NAME),
        ("empty", "empty", None),
    ],
)
def test_refuses_bad_tensors_naming_the_module(tmp_path, kind, reason, module) -> None:
    err = expect_refusal(write_raw(tmp_path / kind, CFG, bad_state(kind)), reason)
    assert err.module == module
    if module is not None:
        assert f"module {module}" in str(err)


# --- writing, all or nothing -----------------------------------------------------------------


def test_write_adapters_atomically_writes_each_and_replaces_old(tmp_path, make_factors) -> None:
    f = {Q_NAME: make_factors(5, 6, 2, seed=0, dtype=torch.float32)}
    out = tmp_path / "out"
    (out / "rank-2").mkdir(parents=True)
    (out / "rank-2" / "stale.txt").write_text("old")
    (out / "keep.txt").write_text("not ours")
    written = write_adapters_atomically(out, {"rank-2": f, "rank-4": f}, dtype=torch.bfloat16)
    assert written == [out / "rank-2", out / "rank-4"]
    assert not (out / "rank-2" / "stale.txt").exists() and (out / "keep.txt").exists()
    back = load_adapter(out / "rank-4").factors[Q_NAME]
    assert back.A.dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind


def test_write_adapters_atomically_leaves_out_untouched_on_error(
    tmp_path, make_factors, monkeypatch
) -> None:
    f = {Q_NAME: make_factors(5, 6, 2, seed=0, dtype=torch.float32)}
    real = peft_io.write_adapter
    calls = []

    def failing(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(peft_io, "write_adapter", failing)
    with pytest.raises(OSError, match="disk full"):
        write_adapters_atomically(tmp_path / "out", {"rank-2": f, "rank-8": f})
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
