"""``flexlora eval`` through lm-evaluation-harness on a tiny-llama run, offline, with a local
multiple-choice task and a local generation task (YAML + JSONL written here): the base and
every adapter are scored on the same prompts; the adapters change the answers and so the
scores; unknown tasks, missing datasets and a base that does not fit are clear errors;
``eval.harness_tasks`` scores the final global model of each bench run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from flexlora.cli import main
from flexlora.simulation.runner import FederatedRun
from tests.reliability_helpers import one_torch_thread  # noqa: F401 (fixture)
from tests.sim_helpers import TINY_PAPER_TYPES, WORDS, make_dataset, tiny_config

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MC_YAML = """task: t_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: t_mc.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GEN_YAML = """task: t_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: t_gen.jsonl
output_type: generate_until
test_split: test
doc_to_text: "Repeat the word: {{word}}\\nAnswer:"
doc_to_target: "{{word}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(folder: Path) -> Path:
    """A 24-question, 4-choice task and a 6-item generation task (relative data_files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with (folder / "t_mc.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(24):
            choices = rng.sample(WORDS, 4)
            fh.write(
                json.dumps(
                    {
                        "question": f"Which word is number {i}?",
                        "choices": choices,
                        "answer": rng.randrange(4),
                    }
                )
                + "\n"
            )
    with (folder / "t_gen.jsonl").open("w", encoding="utf-8") as fh:
        for w in WORDS[:6]:
            fh.write(json.dumps({"word": w}) + "\n")
    (folder / "t_mc.yaml").write_text(MC_YAML, encoding="utf-8")
    (folder / "t_gen.yaml").write_text(GEN_YAML, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = tiny_config(str(out), federation={"rounds": 1}, eval={"at_start": False})
    FederatedRun(cfg, dataset=make_dataset()).run()
    return out


def test_eval_scores_the_base_and_every_adapter_side_by_side(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "scores.json"
    argv = ["eval", str(run_dir), "--tasks", "t_mc,t_gen", "--include-path", str(tasks)]
    assert main([*argv, "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    labels = ["base model", "rank-2", "rank-2-8", "rank-4", "rank-8"]
    assert list(report["scores"]) == labels
    assert report["samples"] == {"t_mc": 24, "t_gen": 6}
    assert report["base"] == str((run_dir / "base-model").resolve())
    assert "| model | t_mc acc | t_gen exact_match |" in printed
    for label, per_task in report["scores"].items():
        assert set(per_task) == {"t_mc", "t_gen"}
        acc = per_task["t_mc"]["acc"]
        assert 0 <= acc <= 1 and (acc * 24).is_integer()
        assert f"| {label} | {acc:.4f} |" in printed
    # the trained adapters move the answers: scores that ignored them would all be the base's
    scores = report["scores"]
    base_acc = scores["base model"]["t_mc"]["acc"]
    assert any(scores[x]["t_mc"]["acc"] != base_acc for x in labels[1:])

    # one adapter folder, --limit: the same numbers for that adapter on the first items
    argv = ["eval", str(run_dir / "adapters" / "rank-2"), "--tasks", "t_mc"]
    one = tmp_path / "one.json"
    assert main([*argv, "--include-path", str(tasks), "--limit", "24", "--out", str(one)]) == 0
    single = json.loads(one.read_text())["scores"]
    assert single["rank-2"] == {"t_mc": report["scores"]["rank-2"]["t_mc"]}
    assert single["base model"]["t_mc"] == report["scores"]["base model"]["t_mc"]


def test_eval_errors_are_clear(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flexlora.models import build_tiny_llama

    tasks = write_tasks(tmp_path / "tasks")
    base = ["eval", str(run_dir), "--include-path", str(tasks)]
    assert main([*base, "--tasks", "t_mcq"]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s) 't_mcq' (did you mean t_mc?)" in err

    (tasks / "t_gone.yaml").write_text(
        MC_YAML.replace("task: t_mc", "task: t_gone").replace("t_mc.jsonl", "missing.jsonl")
    )
    assert main([*base, "--tasks", "t_gone", "--no-base"]) == 2
    assert "a dataset could not be loaded offline" in capsys.readouterr().err

    other = tmp_path / "other-base"
    model, tok = build_tiny_llama(hidden_size=32, intermediate_size=64)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    assert main([*base, "--tasks", "t_mc", "--base", str(other)]) == 2
    err = capsys.readouterr().err
    assert "does not match base" in err and "(out, in) in the base but" in err


def test_harness_tasks_score_the_final_global_model_of_each_bench_run(tmp_path: Path) -> None:
    from flexlora.bench.runner import run_bench
    from flexlora.models import build_tiny_llama

    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "bench"
    base = tiny_config(
        str(out),
        federation={
            "rounds": 1,
            "distribution": "heavy-tail-light",
            "rank_types": TINY_PAPER_TYPES,
        },
        eval={
            "harness_tasks": ["t_mc"],
            "harness_include_path": str(tasks),
            "harness_batch_size": 4,
        },
    )
    result = run_bench(
        ["flexlora"],
        ["heavy-tail-light"],
        [0],
        out,
        base=base,
        dataset=make_dataset(),
        model_factory=lambda cfg: build_tiny_llama(),
        echo=lambda _: None,
    )
    assert not result.failed
    metrics = out / "runs" / "heavy-tail-light" / "flexlora" / "seed-0" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    acc = rows[-1]["harness/t_mc/acc"]
    assert 0 <= acc <= 1 and (acc * 24).is_integer()
    assert "lm-evaluation-harness scores of the final global model" in result.summary
    assert "| flexlora | heavy-tail-light | " + f"{acc:.4f}" in result.summary
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.endswith(",harness/t_mc/acc")


def test_eval_device_overrides_the_runs_device_map() -> None:
    """A run trained with model.device_map (auto, or one device) is scored with --device
    cpu: the whole model on the CPU, not a contradiction between two keys of config.toml."""
    from flexlora.config import ModelConfig
    from flexlora.evaluation.targets import EvalTarget, load_base

    for device_map in ("auto", "cpu"):
        target = EvalTarget(base="tiny-llama", model_cfg=ModelConfig(device_map=device_map))
        model, _ = load_base(target, "cpu")
        assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_eval_adds_the_fedex_residual_for_the_adapters_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedEx-LoRA's adapters are meant for W0 + U·S·Vh (adapters/frozen_delta.safetensors):
    each is scored on that base, as the run evaluated it; the base model row is W0."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from flexlora.evaluation import harness
    from flexlora.models import build_tiny_llama

    out = tmp_path / "run"
    cfg = tiny_config(
        str(out), federation={"rounds": 2, "strategy": "fedex"}, eval={"at_start": False}
    )
    FederatedRun(cfg, dataset=make_dataset()).run()
    prompt = torch.tensor([[1, 72, 101, 108, 108, 111, 32, 119]])
    seen: list[torch.Tensor] = []

    def logits(model, tokenizer, names, **kw):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            seen.append(model(prompt).logits[0, -1])
        return {}, {}

    monkeypatch.setattr(harness, "score", logits)
    tasks = write_tasks(tmp_path / "tasks")
    assert main(["eval", str(out), "--tasks", "t_mc", "--include-path", str(tasks)]) == 0

    base, _ = build_tiny_llama()
    torch.testing.assert_close(seen[0], base(prompt).logits[0, -1].detach())
    residual = load_file(out / "adapters" / "frozen_delta.safetensors")
    with torch.no_grad():
        for name, layer in base.named_modules():
            if f"{name}.U" in residual:
                U, S, Vh = (residual[f"{name}.{k}"] for k in ("U", "S", "Vh"))
                layer.weight += (U * S) @ Vh  # (m, n)
    want = PeftModel.from_pretrained(base, out / "adapters" / "rank-8")
    with torch.no_grad():
        torch.testing.assert_close(seen[-1], want(prompt).logits[0, -1], rtol=1e-5, atol=1e-5)
