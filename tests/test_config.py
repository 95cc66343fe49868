"""Config: defaults, TOML files, dotted overrides; unknown keys and wrong types are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexlora.config import RunConfig, load_config
from flexlora.config_io import load_toml
from flexlora.errors import UsageError


def test_defaults_are_the_embedded_job() -> None:
    cfg = load_config()
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.federation.strategy == "flexlora"
    assert cfg.federation.distribution == "heavy-tail-light"
    assert cfg.federation.rank_types == {
        "8": [8, 8],
        "30": [30, 30],
        "30-200": [30, 200],
        "200": [200, 200],
    }


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[federation]\nrounds = 7\nstrategy = "hetlora"\n[train]\nlr = 0.001\n')
    cfg = load_config(
        path, ["federation.rounds=2", "lora.target_modules=['q_proj']", "train.optimizer=sgd"]
    )
    assert cfg.federation.rounds == 2
    assert cfg.federation.strategy == "hetlora"
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.train.optimizer == "sgd"


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_config(overrides=["federation.seed=3", "eval.seen=true"])
    path = tmp_path / "config.toml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert isinstance(again, RunConfig)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federation.roundz=3", "unknown config key federation.roundz"),
        ("nosection.x=1", "unknown config key nosection"),
        ("federation.rounds='three'", "federation.rounds: expected an integer"),
        ("federation.rounds=2.5", "federation.rounds: expected an integer"),
        ("train.train_on_inputs=1", "expected true or false"),
        ("lora.target_modules='q_proj'", "expected a list"),
        ("train.optimizer=lion", "adamw or sgd"),
        ("train.precision=fp8", "fp32 or bf16"),
        ("federation.rank_types={a=[1]}", "attention rank, FFN rank"),
        ("lora.dropout=1.5", "dropout"),
        ("federation.clients_per_round=0", "clients_per_round"),
        ("model.dtype=int8", "model.dtype"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        load_config(overrides=[override])


def test_bad_toml_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = ")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(UsageError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match=r"dotted\.key=value"):
        load_config(overrides=["rounds"])


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"quantization": "nf4"}, ("4bit", "nf4", "float32")),
        ({"quantization": "FP4"}, ("4bit", "fp4", "float32")),
        ({"quantization": "int8", "dtype": "fp16"}, ("8bit", "nf4", "float16")),
        ({"quantization": " 4-bit ", "dtype": "bf16"}, ("4bit", "nf4", "bfloat16")),
        ({"quantization": "QLoRA", "dtype": "torch.bfloat16"}, ("4bit", "nf4", "bfloat16")),
        ({"quantization": "4bit", "bnb_4bit_quant_type": "FP4"}, ("4bit", "fp4", "float32")),
    ],
)
def test_model_dtype_and_quantization_take_their_usual_spellings(
    given: dict[str, str], expected: tuple[str, str, str]
) -> None:
    m = load_config(values={"model": given}).model
    assert (m.quantization, m.bnb_4bit_quant_type, m.dtype) == expected


@pytest.mark.parametrize(
    ("override", "expected"),
    [("model.quantization=4", "4bit"), ("model.quantization=8", "8bit"),
     ("model.quantization=false", "none"), ("model.quantization=nf4", "4bit")],
)  # fmt: skip
def test_quantization_may_be_a_bare_number_or_false(override: str, expected: str) -> None:
    """TOML's ``quantization = 4`` and ``--set model.quantization=4`` read as numbers."""
    assert load_config(overrides=[override]).model.quantization == expected
    assert load_config(values={"model": {"quantization": 8}}).model.quantization == "8bit"
    with pytest.raises(UsageError, match=r"model\.quantization: '2' is not none, 4bit or 8bit"):
        load_config(values={"model": {"quantization": 2}})


def test_keep_rank_and_devices_are_read_in_any_case() -> None:
    """As eval.global_rank and model.dtype: ``MAX``, `` All ``, ``CPU``, ``CUDA:1``."""
    cfg = load_config(
        values={
            "federation": {"keep_rank": "MAX", "server_device": "CPU"},
            "model": {"device": "CPU"},
        }
    )
    assert (cfg.federation.keep_rank, cfg.federation.server_device) == ("max", "cpu")
    assert cfg.model.device == "cpu"
    cfg = load_config(values={"federation": {"keep_rank": " All ", "server_device": "CUDA:1"}})
    assert (cfg.federation.keep_rank, cfg.federation.server_device) == ("all", "cuda:1")
    assert load_config(overrides=["federation.keep_rank=' 16 '"]).federation.keep_rank == 16
    with pytest.raises(UsageError, match="keep_rank must be 'max', 'all'"):
        load_config(values={"federation": {"keep_rank": "top"}})


def test_an_unknown_quantization_is_still_refused() -> None:
    with pytest.raises(UsageError, match=r"model\.quantization: 'gptq' is not none, 4bit or 8bit"):
        load_config(values={"model": {"quantization": "gptq"}})


def test_python_dash_m_flexlora_is_the_command_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "flexlora", "plan", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--device-memory" in done.stdout, done.stderr


@pytest.mark.parametrize(("given", "want"), [("MAX", "max"), (" Full ", "full"), ("16", 16)])
def test_eval_global_rank_spellings(given: str, want: str | int) -> None:
    """eval.global_rank's names in any case (as model.dtype's and quantization's), an integer
    as text too."""
    assert load_config(values={"eval": {"global_rank": given}}).eval.global_rank == want
