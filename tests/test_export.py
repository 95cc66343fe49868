"""Exports load where they were made: ``AutoPeftModelForCausalLM.from_pretrained`` on a run's
adapters, offline (``HF_HUB_OFFLINE=1`` in a fresh process), for tiny-llama (saved with the
run) and for the built-in SmolLM2 name backed by a converted GGUF in the cache; the model
card keeps PEFT's format and says where the base came from."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from flexlora.models import SMOLLM2, TINY_LLAMA, build_tiny_llama, convert_gguf, load_base_model
from flexlora.models import gguf as gguf_mod
from flexlora.simulation.export import BASE_FOLDER
from flexlora.simulation.runner import FederatedRun
from tests.helpers import write_llama_gguf
from tests.reliability_helpers import one_torch_thread  # noqa: F401 (fixture)
from tests.sim_helpers import make_dataset, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
PROMPT = [[1, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]]

LOADER = textwrap.dedent(
    """
    import json, sys, torch
    from peft import AutoPeftModelForCausalLM
    out = {}
    for folder in sys.argv[1:]:
        model = AutoPeftModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            logits = model(torch.tensor(PROMPT)).logits
        out[folder] = {
            "base": model.peft_config["default"].base_model_name_or_path,
            "logits": logits[0, -1].tolist(),
        }
    print(json.dumps(out))
    """
).replace("PROMPT", repr(PROMPT))


def run_tiny(out: Path, **model: str) -> Path:
    cfg = tiny_config(
        str(out),
        federation={"rounds": 1},
        eval={"at_start": False},
        **({"model": model} if model else {}),
    )
    FederatedRun(cfg, dataset=make_dataset()).run()
    return out


def load_offline(*folders: Path) -> dict[str, dict]:
    """Load each adapter with AutoPeftModelForCausalLM in a fresh, offline process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["TRANSFORMERS_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, *map(str, folders)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # base paths must not depend on the working directory
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peft_logits(base: torch.nn.Module, adapter: Path) -> list[float]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter)
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits[0, -1].tolist()


def card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_exports_load_offline_on_the_model_they_were_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tiny-llama, built in memory: saved with the run
    tiny = run_tiny(tmp_path / "tiny")
    tiny_adapters = sorted((tiny / "adapters").iterdir())
    assert [p.name for p in tiny_adapters] == ["rank-2", "rank-2-8", "rank-4", "rank-8"]
    base_dir = (tiny / BASE_FOLDER).resolve()
    assert (base_dir / "config.json").is_file() and (base_dir / "tokenizer.json").is_file()

    # the built-in SmolLM2 name, backed by a converted GGUF in the cache
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEXLORA_CACHE", str(cache))
    monkeypatch.setattr(gguf_mod, "SMOLLM2_MODULE", "flexlora_tests_no_such_package")
    gguf_model, gguf_tok = build_tiny_llama(seed=3)
    gguf_file = write_llama_gguf(gguf_model, gguf_tok, tmp_path / "tiny.gguf")
    smol_dir = cache / "models" / gguf_mod.SMOLLM2_DIRNAME
    convert_gguf(gguf_file, smol_dir, source="tests/tiny.gguf")
    smol = run_tiny(tmp_path / "smol", name=SMOLLM2)
    smol_adapter = smol / "adapters" / "rank-8"
    assert not (smol / BASE_FOLDER).exists()

    loaded = load_offline(tiny_adapters[-1], smol_adapter)
    got_tiny, got_smol = loaded[str(tiny_adapters[-1])], loaded[str(smol_adapter)]
    assert got_tiny["base"] == str(base_dir)
    assert got_smol["base"] == str(smol_dir.resolve())
    # the same numbers as the adapter on the very model each run trained
    want_tiny = peft_logits(build_tiny_llama()[0], tiny_adapters[-1])
    assert got_tiny["logits"] == pytest.approx(want_tiny, abs=1e-5)
    want_smol = peft_logits(load_base_model(SMOLLM2)[0], smol_adapter)
    assert got_smol["logits"] == pytest.approx(want_smol, abs=1e-5)
    with torch.no_grad():
        plain = build_tiny_llama()[0](torch.tensor(PROMPT)).logits[0, -1]
    assert (plain - torch.tensor(got_tiny["logits"])).abs().max() > 1e-4, "not a no-op"

    # the model card: where the base came from, strategy, rank type, metrics, config
    meta, body = card(smol_adapter)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in meta["tags"]
    assert f"`{smol_dir.resolve()}`" in body
    assert "dequantized from the GGUF file tests/tiny.gguf" in body
    assert "**Quantization while training**: none" in body
    assert "**Strategy**: flexlora" in body and "**Rank type**: 8 (LoRA rank 8," in body
    rows = [json.loads(x) for x in (smol / "metrics.jsonl").read_text().splitlines()]
    assert f"- rouge_l_unseen: {rows[-1]['rouge_l_unseen']:.4f} (round 1)" in body
    assert (smol / "config.toml").read_text().strip() in body
    meta, body = card(tiny_adapters[0])
    assert meta["base_model"] == str(base_dir) and "**Rank type**: 2 " in body


def test_the_card_keeps_the_format_peft_writes(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    theirs, _ = card(tmp_path / "peft")
    their_lines = (tmp_path / "peft" / "README.md").read_text().splitlines()

    ours_dir = run_tiny(tmp_path / "ours") / "adapters" / "rank-4"
    ours, _ = card(ours_dir)
    our_lines = (ours_dir / "README.md").read_text().splitlines()
    assert set(theirs) <= set(ours)  # base_model, library_name, tags, pipeline_tag
    headings = [x for x in their_lines if x.startswith("#")]
    our_headings = [x for x in our_lines if x.startswith("#")]
    assert headings[0] == "# Model Card for Model ID"  # the template's title, filled in ours
    assert our_headings[0] == "# Model Card for flexlora adapter rank-4 (strategy flexlora)"
    assert headings[1:] == our_headings[1:]
    assert their_lines[-1] == our_lines[-1]  # "- PEFT <version>" closes both


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (quant extra)"
)
def test_a_4bit_run_saves_tiny_llama_unquantized_so_both_bases_load(tmp_path: Path) -> None:
    """The card says the adapters load on the quantized or the full-precision base: the run
    saves tiny-llama as built (float32), and that folder loaded at 4 bits is the run's base."""
    run = run_tiny(tmp_path / "q", quantization="4bit")
    base_dir = run / BASE_FOLDER
    assert "quantization_config" not in json.loads((base_dir / "config.json").read_text())
    full, _ = load_base_model(str(base_dir))
    built = build_tiny_llama()[0].state_dict()
    assert all(torch.equal(v, built[k]) for k, v in full.state_dict().items())
    adapter = run / "adapters" / "rank-8"
    trained_on, _ = load_base_model(TINY_LLAMA, quantization="4bit")
    reloaded, _ = load_base_model(str(base_dir), quantization="4bit")
    assert peft_logits(reloaded, adapter) == peft_logits(trained_on, adapter)
    assert peft_logits(full, adapter) != peft_logits(reloaded, adapter)  # really float32
