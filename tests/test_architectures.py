"""Causal LMs other than LLaMA, with their own module names: tiny random models built from
configs (nothing downloaded), saved as folders and given to ``flexlora run`` as ``model.name``.

Covers fused projections (Phi-3's ``qkv_proj`` / ``gate_up_proj``, Falcon's and GPT-NeoX's
``query_key_value``, MPT's ``Wqkv``), GPT-2's ``Conv1D``, OPT's feed-forward on flattened
``(tokens, hidden)`` inputs, Mamba (no attention; reads an adapted layer's weight directly),
and the clear errors: a layer kind that cannot be adapted, and a base model whose own dropout
would break batched clients.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import PeftModel
from safetensors.torch import load_file

from flexlora.errors import UsageError
from flexlora.models import build_byte_tokenizer, resolve_targets, target_linear_modules
from flexlora.models.meta import meta_model
from flexlora.models.targets import DEFAULT_TARGETS
from flexlora.plan.shape import model_shape, shape_of
from flexlora.simulation.runner import FederatedRun
from tests.sim_helpers import make_dataset, tiny_config

IDS = {"vocab_size": 260, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
LLAMA_LIKE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
GATED = (["q_proj", "v_proj", "up_proj", "down_proj"], ["up_proj", "down_proj"])
NEOX = (
    ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    ["dense_h_to_4h", "dense_4h_to_h"],
)

#: name -> (config, target_modules, ffn_modules): each model's own layer names
ARCHITECTURES: dict[str, tuple[Callable[[], tf.PretrainedConfig], list[str], list[str]]] = {
    "gpt2": (
        lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **IDS),
        ["c_attn", "c_proj", "c_fc"],
        ["c_fc", "mlp.c_proj"],
    ),
    "phi3": (
        lambda: tf.Phi3Config(**LLAMA_LIKE, **IDS),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        ["gate_up_proj", "down_proj"],
    ),
    "falcon": (
        lambda: tf.FalconConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
            **IDS,
        ),
        *NEOX,
    ),
    "gpt_neox": (
        lambda: tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **IDS
        ),
        *NEOX,
    ),
    "qwen2": (lambda: tf.Qwen2Config(**LLAMA_LIKE, **IDS), *GATED),
    "mistral": (lambda: tf.MistralConfig(**LLAMA_LIKE, **IDS), *GATED),
    "gemma2": (lambda: tf.Gemma2Config(**LLAMA_LIKE, head_dim=8, **IDS), *GATED),
    "opt": (
        lambda: tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            dropout=0.0,
            **IDS,
        ),
        ["q_proj", "v_proj", "out_proj", "fc1", "fc2"],
        ["fc1", "fc2"],
    ),
    "mamba": (  # attention-free; reads x_proj.weight (its device) while training
        lambda: tf.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, **IDS),
        ["in_proj", "x_proj"],
        ["in_proj"],
    ),
    "mpt": (
        lambda: tf.MptConfig(
            d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=128, **IDS
        ),
        ["Wqkv", "out_proj", "up_proj", "down_proj"],
        ["up_proj", "down_proj"],
    ),
}


def save_model(config: tf.PretrainedConfig, folder: Path) -> Path:
    """A seeded random model of ``config`` and the byte tokenizer, as ``save_pretrained`` writes."""
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


def run_on(
    folder: Path,
    out: Path,
    targets: list[str],
    ffn: list[str],
    model: dict[str, object] | None = None,
    **train: object,
) -> list:
    """One round of two clients (local SGD, so batched and sequential agree to rounding),
    evaluated after round 1, adapters exported; ``model`` adds model settings."""
    cfg = tiny_config(
        str(out),
        model={"name": str(folder), **(model or {})},
        lora={"target_modules": targets, "ffn_modules": ffn},
        train={"local_steps": 2, "lr": 0.5, **train},
        federation={"strategy": "fedavg+flexlora", "rounds": 1, "clients_per_round": 2},
        eval={"at_start": False, "max_examples_per_client": 1, "max_new_tokens": 2},
    )
    return FederatedRun(cfg, dataset=make_dataset(n_seen=4, n_unseen=1, per_client=6)).run()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_flexlora_run_trains_evaluates_and_exports_on_each_architecture(
    arch: str, tmp_path: Path
) -> None:
    make, targets, ffn = ARCHITECTURES[arch]
    folder = save_model(make(), tmp_path / arch)
    base = tf.AutoModelForCausalLM.from_pretrained(folder)
    shapes = target_linear_modules(base, targets)
    assert {n.rsplit(".", 1)[-1] for n in shapes} == {t.rsplit(".", 1)[-1] for t in targets}
    # the Flower server's and flexlora plan's view: the same shapes with no weight allocated
    meta = meta_model(str(folder))
    assert all(p.is_meta for p in meta.parameters())
    assert target_linear_modules(meta, targets) == shapes

    rows = run_on(folder, tmp_path / "run", targets, ffn)
    assert rows[0]["aggregated"] and not rows[0]["failed"]
    assert rows[0]["train_loss"] > 0 and "rouge_l_unseen" in rows[0]
    exported = tmp_path / "run" / "adapters" / "rank-8"  # the "8" rank type: ranks [8, 8]
    peft = PeftModel.from_pretrained(base, exported)
    stored = load_file(exported / "adapter_model.safetensors")
    loaded = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(stored) == 2 * len(shapes)
    for (
        key,
        value,
    ) in stored.items():  # PEFT keys "...lora_A.weight" load as "...lora_A.default.weight"
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value), key
    ids = torch.randint(4, 260, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = peft(input_ids=ids).logits
        with peft.disable_adapter():
            plain = peft(input_ids=ids).logits
    assert not torch.equal(tuned, plain)  # the trained adapter changes the model


@pytest.mark.parametrize("arch", ["opt", "phi3", "falcon", "mamba"])
def test_batched_clients_equal_sequential_on_other_architectures(arch: str, tmp_path: Path) -> None:
    """OPT feeds its feed-forward (tokens, hidden) inputs; Phi-3 and Falcon fused projections;
    Mamba reads its adapted x_proj's weight directly."""
    make, targets, ffn = ARCHITECTURES[arch]
    folder = save_model(make(), tmp_path / arch)
    one = run_on(folder, tmp_path / "one", targets, ffn)
    two = run_on(folder, tmp_path / "two", targets, ffn, parallel_clients=2)
    assert one[0]["train_loss"] == pytest.approx(two[0]["train_loss"], rel=1e-5)
    # compared as s·B·A: the exported factors are an SVD, whose near-equal singular values
    # may rotate with float32 rounding while the product does not
    for rank_type in ("2", "4", "2-8", "8"):
        a = exported_deltas(tmp_path / "one" / "adapters" / f"rank-{rank_type}")
        b = exported_deltas(tmp_path / "two" / "adapters" / f"rank-{rank_type}")
        assert a.keys() == b.keys() and len(a) == 2 * len(targets)
        for key, delta in a.items():
            assert delta.norm() > 0, key
            assert (delta - b[key]).norm() <= 1e-5 * delta.norm(), key


def exported_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Module -> B·A of an exported PEFT adapter (its scaling is the same in both runs)."""
    tensors = load_file(folder / "adapter_model.safetensors")
    return {
        key.removesuffix(".lora_A.weight"): tensors[key.replace("lora_A", "lora_B")] @ A
        for key, A in tensors.items()
        if key.endswith(".lora_A.weight")
    }


def test_base_dropout_applied_functionally_is_refused_for_batched_clients(tmp_path: Path) -> None:
    """OPT applies its config's dropout with F.dropout (no nn.Dropout module to find)."""
    make, targets, ffn = ARCHITECTURES["opt"]
    config = make()
    config.dropout = 0.1
    folder = save_model(config, tmp_path / "opt")
    with pytest.raises(UsageError, match=r"without dropout of its own \(config\.dropout=0\.1\)"):
        run_on(folder, tmp_path / "run", targets, ffn, parallel_clients=2)


def test_a_layer_kind_that_cannot_adapt_names_module_and_kind() -> None:
    """Mixtral's experts are one module of stacked expert weights, not linear layers."""
    config = tf.MixtralConfig(**LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1, **IDS)
    model = meta_model(config)
    with pytest.raises(
        UsageError,
        match=r"target module model\.layers\.0\.mlp\.experts is a .*MixtralExperts, which cannot "
        r"be adapted; adaptable layer kinds: torch\.nn\.Linear",
    ):
        target_linear_modules(model, ["q_proj", "experts"])
    assert len(target_linear_modules(model, ["q_proj", "o_proj"])) == 4  # attention adapts


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("gpt2", (2, 32, 2, 2, 128)), ("falcon", (2, 32, 4, 2, 128)), ("mpt", (2, 32, 4, 4, 64))],
)
def test_plan_reads_each_architectures_own_config_names(
    arch: str, expected: tuple[int, ...], tmp_path: Path
) -> None:
    """layers, hidden, heads, kv heads (Falcon's num_kv_heads) and MLP width from the config."""
    make, targets, _ = ARCHITECTURES[arch]
    folder = save_model(make(), tmp_path / arch)
    s = model_shape(str(folder), targets)
    assert (s.layers, s.hidden, s.heads, s.kv_heads, s.intermediate) == expected
    assert s.targets == target_linear_modules(meta_model(str(folder)), targets)


def test_a_target_peft_refuses_is_a_clear_error() -> None:
    """Mamba's out_proj is a Linear, but PEFT refuses LoRA on it: a UsageError naming it
    (flexlora run's clear error), not PEFT's ValueError traceback."""
    from flexlora.training.adapters import AdapterHost

    torch.manual_seed(0)
    config = tf.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, **IDS)
    model = tf.MambaForCausalLM(config).eval()
    targets = ["in_proj", "out_proj"]
    ranks = dict.fromkeys(target_linear_modules(model, targets), 2)
    with pytest.raises(UsageError, match=r"PEFT cannot adapt .*'out_proj'.*MambaForCausalLM"):
        AdapterHost(model, targets, {"t": ranks})


def test_a_layer_whose_weight_the_model_reads_directly_is_refused_as_a_target() -> None:
    """Mamba computes ``dt_proj.weight @ time_step``: an adapter on dt_proj would never train
    (its factors got no gradient); refused by name, on the meta device too."""
    config = tf.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, **IDS)
    with torch.device("meta"):
        model = tf.MambaForCausalLM(config)
    with pytest.raises(UsageError, match=r"backbone\.layers\.0\.mixer\.dt_proj: mamba multiplies"):
        target_linear_modules(model, ["in_proj", "dt_proj"])
    assert len(target_linear_modules(model, ["in_proj", "x_proj"])) == 4


def test_plan_of_an_attention_free_model(tmp_path: Path) -> None:
    """Mamba has no attention heads in its config: flexlora plan (and so
    train.parallel_clients = auto) plans it without attention terms instead of refusing."""
    from flexlora.config import load_config
    from flexlora.plan import format_plan

    folder = tmp_path / "mamba"
    tf.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, **IDS).save_pretrained(folder)
    targets = ["in_proj", "x_proj"]
    s = model_shape(str(folder), targets)
    assert (s.layers, s.hidden, s.heads, s.kv_dim, s.intermediate) == (2, 32, 0, 0, 64)
    cfg = load_config(values={"model": {"name": str(folder)}, "lora": {"target_modules": targets}})
    text = format_plan(cfg, device_memory=2**30)
    assert "MambaForCausalLM" in text and "no attention" in text and "| yes |" in text
    # its selective scan is not modelled: said, and train.parallel_clients = auto takes 1
    assert "state-space model" in text and "lower bounds" in text
    from flexlora.training.capacity import auto_parallel_clients

    model = tf.MambaForCausalLM(tf.MambaConfig.from_pretrained(folder))
    assert auto_parallel_clients(model, {"8": dict.fromkeys(s.targets, 8)}, cfg) == 1
    # a config that names its heads some other way is still an error, not "no attention"
    with torch.device("meta"):
        llama = tf.LlamaForCausalLM(
            tf.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, **IDS)
        )
    vars(llama.config)["num_attention_heads"] = None  # as if its config named them otherwise
    with pytest.raises(UsageError, match="num_attention_heads"):
        shape_of(llama, ["q_proj"])


def test_feed_forward_names_of_other_architectures_and_the_warning_when_none_match() -> None:
    """Falcon's dense_h_to_4h takes the FFN rank by default; a model whose feed-forward
    names are not in lora.ffn_modules is warned about (its rank types would act as attention)."""
    import warnings

    from flexlora.config import load_config
    from flexlora.server import Coordinator

    types = {"c0": "2-8", "c1": "4-4"}
    rank_types = {"2-8": [2, 8], "4-4": [4, 4]}
    falcon = {"h.0.self_attention.query_key_value": (24, 8), "h.0.mlp.dense_h_to_4h": (32, 8)}
    cfg = load_config(values={"federation": {"rank_types": rank_types}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: a feed-forward module is found
        coord = Coordinator(cfg, falcon, types)
    assert coord.slot_ranks["2-8"] == {
        "h.0.self_attention.query_key_value": 2,
        "h.0.mlp.dense_h_to_4h": 8,
    }
    moe = {"layers.0.attn.wq": (8, 8), "layers.0.ffn.w1": (16, 8)}
    with pytest.warns(UserWarning, match=r"no target module \['w1', 'wq'\] matches lora.ffn"):
        Coordinator(cfg, moe, types)
    named = load_config(
        values={"federation": {"rank_types": rank_types}, "lora": {"ffn_modules": ["w1"]}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Coordinator(named, moe, types).slot_ranks["2-8"]["layers.0.ffn.w1"] == 8


def test_default_targets_become_peft_defaults_on_a_model_without_those_names(
    tmp_path: Path,
) -> None:
    """GPT-2 has no q_proj / v_proj / up_proj / down_proj: with lora.target_modules left at
    its default, a run adapts PEFT's default for GPT-2 (c_attn) and exports adapters with it;
    names a user chose that match nothing stay the clear error."""
    folder = save_model(ARCHITECTURES["gpt2"][0](), tmp_path / "gpt2")
    meta = meta_model(str(folder))
    assert resolve_targets(meta, list(DEFAULT_TARGETS)) == ["c_attn"]
    assert resolve_targets(meta, ["c_fc"]) == ["c_fc"]
    llama = meta_model("tiny-llama")
    assert resolve_targets(llama, list(DEFAULT_TARGETS)) == list(DEFAULT_TARGETS)
    assert set(model_shape(str(folder), list(DEFAULT_TARGETS)).targets) == {
        f"transformer.h.{i}.attn.c_attn" for i in range(2)
    }
    cfg = tiny_config(
        str(tmp_path / "run"),
        model={"name": str(folder)},
        train={"local_steps": 1},
        federation={"rounds": 1, "clients_per_round": 2},
        eval={"at_start": False, "max_examples_per_client": 1, "max_new_tokens": 2},
    )
    cfg.lora.target_modules = list(DEFAULT_TARGETS)
    rows = FederatedRun(cfg, dataset=make_dataset(n_seen=4, n_unseen=1, per_client=6)).run()
    assert rows[0]["aggregated"] and not rows[0]["failed"]
    stored = load_file(tmp_path / "run" / "adapters" / "rank-8" / "adapter_model.safetensors")
    assert stored and all(".attn.c_attn." in k for k in stored)
    with pytest.raises(UsageError, match="no adaptable layer matches"):
        target_linear_modules(meta, resolve_targets(meta, ["q_proj"]))


def test_plan_says_when_no_target_takes_the_feed_forward_rank(tmp_path: Path) -> None:
    """Attention-only targets with rank types whose FFN rank differs: flexlora plan says what
    the run warns (every module takes the attention rank), and nothing when one matches."""
    from flexlora.config import load_config
    from flexlora.plan import format_plan

    folder = save_model(ARCHITECTURES["phi3"][0](), tmp_path / "phi3")
    rank_types = {"small": [2, 8], "big": [4, 4]}
    only_attention = load_config(
        values={
            "model": {"name": str(folder)},
            "lora": {"target_modules": ["qkv_proj", "o_proj"]},
            "federation": {"rank_types": rank_types},
        }
    )
    text = format_plan(only_attention)
    assert re.search(
        r"note: rank types \['small'\] .* no target module \['o_proj', 'qkv_proj'\]", text
    )
    with_mlp = load_config(
        values={
            "model": {"name": str(folder)},
            "lora": {"target_modules": ["qkv_proj", "gate_up_proj"]},
            "federation": {"rank_types": rank_types},
        }
    )
    assert "note:" not in format_plan(with_mlp)


HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (the 'quant' extra)")
def test_a_4bit_base_keeps_a_layer_the_model_reads_directly_in_full_precision(
    tmp_path: Path,
) -> None:
    """Mamba computes ``dt_proj.weight @ time_step``: with dt_proj quantized its forward
    failed (a packed 4-bit weight in a matmul). It stays a plain Linear, the output head
    stays out as transformers' default, the rest is 4-bit, and a run trains; flexlora plan
    counts the same layers as quantized."""
    import bitsandbytes as bnb

    from flexlora.models.loading import load_base_model

    config = tf.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, **IDS)
    folder = save_model(config, tmp_path / "mamba")
    model, _ = load_base_model(str(folder), "float32", quantization="4bit")
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["backbone.layers.0.mixer.dt_proj"] is torch.nn.Linear
    assert kinds["lm_head"] is torch.nn.Linear
    quantized = {n for n, k in kinds.items() if k is bnb.nn.Linear4bit}
    layers = ("in_proj", "x_proj", "out_proj")
    assert quantized == {f"backbone.layers.{i}.mixer.{p}" for i in range(2) for p in layers}
    assert set(model_shape(str(folder), ["in_proj"]).quantizable) == quantized
    rows = run_on(folder, tmp_path / "run", ["in_proj", "x_proj"], [], {"quantization": "4bit"})
    assert rows[0]["aggregated"] and rows[0]["train_loss"] > 0


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (the 'quant' extra)")
def test_linear_subclasses_transformers_does_not_quantize_are_named_and_planned_as_such(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers quantizes nn.Linear itself only: Falcon's FalconLinear layers load in
    the loading dtype. The load says so, by class and count, and flexlora plan does not
    count them as 4-bit."""
    from flexlora.models.loading import load_base_model

    make, targets, _ = ARCHITECTURES["falcon"]
    folder = save_model(make(), tmp_path / "falcon")
    with caplog.at_level("WARNING", logger="flexlora.models.loading"):
        model, _ = load_base_model(str(folder), "bfloat16", quantization="4bit")
    assert "left 8 FalconLinear layer(s)" in caplog.text
    assert model.transformer.h[0].self_attention.query_key_value.weight.dtype == torch.bfloat16
    assert model_shape(str(folder), targets).quantizable == {}


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (the 'quant' extra)")
@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_checkpointing_a_model_that_cannot_is_a_clear_error_quantized_or_not(
    tmp_path: Path, quantization: str
) -> None:
    """CTRL has no gradient checkpointing: train.gradient_checkpointing is refused by name on
    a full-precision base and on a quantized one (PEFT's k-bit preparation raised a bare
    ValueError there)."""
    from flexlora.config import TrainConfig
    from flexlora.models.loading import load_base_model
    from flexlora.models.prepare import prepare_for_training

    config = tf.CTRLConfig(n_embd=32, n_layer=2, n_head=4, dff=64, vocab_size=260, n_positions=64)
    folder = save_model(config, tmp_path / "ctrl")
    model, _ = load_base_model(str(folder), "float32", quantization=quantization)
    with pytest.raises(UsageError, match="CTRLLMHeadModel does not support gradient checkpointing"):
        prepare_for_training(model, TrainConfig(gradient_checkpointing=True))


def test_every_adapter_slot_adapts_a_moe_models_shared_expert(tmp_path: Path) -> None:
    """Qwen2-MoE's shared expert is plain Linear layers named like the fused experts'
    projections. PEFT 0.22 kept them as modules for the first adapter and rewrote them into
    expert parameters for every later one (the modules were LoRA wrappers by then), so the
    second rank type's slot missed them (a KeyError mid-run). Every slot now adapts the same
    layers, at its own ranks, and the run trains, evaluates and exports."""
    from flexlora.training.adapters import AdapterHost

    config = tf.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, **IDS,
    )  # fmt: skip
    folder = save_model(config, tmp_path / "qwen2moe")
    targets = ["q_proj", "shared_expert.down_proj"]
    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    paths = [
        n for n, m in model.named_modules() if n.endswith(("q_proj", "shared_expert.down_proj"))
    ]
    host = AdapterHost(model, targets, alpha=16.0, dropout=0.0)
    host.add_slot("a", dict.fromkeys(paths, 2))
    host.add_slot("b", {p: 4 if p.endswith("q_proj") else 8 for p in paths})
    for path, layer in host.layers.items():
        assert set(layer.lora_A) >= {"a", "b"}, path
        want = 4 if path.endswith("q_proj") else 8
        assert layer.lora_A["b"].weight.shape[0] == want, path
    assert sorted(host.layers) == sorted(paths)
    rows = run_on(folder, tmp_path / "run", targets, [])
    assert rows[-1]["aggregated"] and rows[-1]["rouge_l_unseen"] is not None
