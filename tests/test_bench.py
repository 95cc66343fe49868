"""``flexlora bench``: Student-t intervals, the summary's arithmetic, config layering, and the
grid end to end on tiny-llama (files, shared round 0, skipping finished runs, resuming)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from flexlora.bench.cli import parse_seeds
from flexlora.bench.presets import PRESETS, get_preset
from flexlora.bench.results import COLUMNS
from flexlora.bench.runner import MARKER, RunKey, base_config, run_bench, run_configs
from flexlora.bench.stats import mean_ci, paired_diff, t_quantile
from flexlora.bench.summary import BenchContext, summarize
from flexlora.config import load_config
from flexlora.errors import UsageError
from flexlora.training.model import build_tiny_llama
from tests.sim_helpers import TINY_PAPER_TYPES, make_dataset, tiny_config

# ------------------------------------------------------------------ statistics
# Two-sided 95 % (p = 0.975) and 99 % (p = 0.995) critical values of Student's t, from tables.
T_TABLE = {
    (0.975, 1): 12.7062,
    (0.975, 2): 4.3027,
    (0.975, 4): 2.7764,
    (0.975, 9): 2.2622,
    (0.975, 30): 2.0423,
    (0.975, 1000): 1.9623,
    (0.995, 2): 9.9248,
    (0.995, 5): 4.0321,
}


@pytest.mark.parametrize(("p", "df"), list(T_TABLE))
def test_t_quantile_matches_tables(p: float, df: int) -> None:
    assert t_quantile(p, df) == pytest.approx(T_TABLE[p, df], abs=1e-4)


def test_t_quantile_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 6, 17, 64):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_mean_ci_and_paired_difference_by_hand() -> None:
    est = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1
    assert (est.mean, est.std, est.n) == (2.0, 1.0, 3)
    assert est.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    one = mean_ci([0.5])
    assert one.n == 1 and math.isnan(one.half_width) and one.format() == "0.5000"
    assert mean_ci([]).format() == "—"
    # differences 0.02, 0.03, 0.01 on the shared seeds; seed 9 has no partner
    diff, wins = paired_diff({0: 0.12, 1: 0.23, 2: 0.31, 9: 1.0}, {0: 0.1, 1: 0.2, 2: 0.3})
    assert diff.n == 3 and wins == 3
    assert diff.mean == pytest.approx(0.02)
    assert diff.half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)


def _row(strategy: str, seed: int, round_: int, score: float) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "distribution": "uniform",
        "seed": seed,
        "round": round_,
        "rouge_l_unseen": score,
        "seconds_train": 1.0,
        "bytes_up": 2**20,
    }


def test_summary_reports_last_round_paired_gain_and_seed_values() -> None:
    rows = []
    for seed, (ref, flex) in enumerate([(0.1, 0.12), (0.2, 0.23), (0.3, 0.31)]):
        for strategy, final in (("fedit-min", ref), ("flexlora", flex)):
            rows += [
                _row(strategy, seed, 0, 0.05),
                _row(strategy, seed, 1, 0.9),  # not the last round: must not count
                _row(strategy, seed, 2, final),
            ]
    ctx = BenchContext(["flexlora", "fedit-min"], ["uniform"], [0, 1, 2], load_config())
    text = summarize(rows, ctx)
    assert "after round 2" in text
    assert "| fedit-min | 0.2000 ± 0.2484 |" in text  # mean 0.2, sd 0.1
    assert "| flexlora | +0.0200 ± 0.0248 (3/3) |" in text
    assert "| fedit-min | 0.1000 / 0.2000 / 0.3000 |" in text
    assert "| base model (round 0) | 0.0500 ± 0.0000 |" in text
    assert "| flexlora | 2 | " in text  # two rounds of 1 s training per run


# ------------------------------------------------------------------ configuration
def test_seeds_and_presets_parse() -> None:
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("4,7") == [4, 7]
    assert parse_seeds("7,") == [7]
    for bad in ("0", "x", "1,1", ","):
        with pytest.raises(UsageError):
            parse_seeds(bad)
    with pytest.raises(UsageError, match="2core"):
        get_preset("nope")
    two = PRESETS["2core"]
    assert {"flexlora", "fedit-min", "hetlora"} <= set(two.strategies)
    assert {"heavy-tail-light", "heavy-tail-strong"} <= set(two.distributions)
    assert two.seeds == 3


def test_settings_layer_preset_then_file_then_set(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 0.005\nlocal_steps = 3\n", encoding="utf-8")
    cfg = base_config(path, get_preset("2core"), ["train.local_steps=4"])
    assert cfg.train.lr == 0.005  # the file beats the preset
    assert cfg.train.local_steps == 4  # --set beats the file
    assert cfg.eval.every == PRESETS["2core"].values["eval"]["every"]  # the preset beats defaults
    with pytest.raises(UsageError, match=r"data\.path"):
        base_config(None, get_preset("paper"))
    with pytest.raises(UsageError, match="nope"):
        base_config(None, None, ["train.nope=1"])


# ------------------------------------------------------------------ end to end
def _tiny_base(out: Path) -> Any:
    cfg = tiny_config(
        str(out / "unused"),
        federation={
            "rounds": 1,
            "distribution": "heavy-tail-light",
            # the paper's type names (the distributions use them) at tiny ranks
            "rank_types": TINY_PAPER_TYPES,
        },
    )
    return cfg


def _model(cfg: Any) -> Any:
    return build_tiny_llama(seed=0)


def _bench(out: Path, lines: list[str], **kw: Any) -> Any:
    return run_bench(
        ["flexlora", "fedit-min"],
        ["heavy-tail-light"],
        [0],
        out,
        base=kw.pop("base", None) or _tiny_base(out),
        dataset=make_dataset(),
        model_factory=_model,
        echo=lines.append,
        **kw,
    )


def test_bench_writes_tables_and_plots_and_skips_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    lines: list[str] = []
    first = _bench(out, lines)
    keys = [RunKey(0, "heavy-tail-light", s) for s in ("flexlora", "fedit-min")]
    assert first.status == dict.fromkeys(keys, "ran")
    assert any(x.startswith("[base] seed 0") for x in lines)
    assert sum(x.startswith("[1/2]") or x.startswith("[2/2]") for x in lines) == 2

    with (out / "results.csv").open(encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert sorted((r["strategy"], r["round"]) for r in rows) == [
        ("fedit-min", "0"),
        ("fedit-min", "1"),
        ("flexlora", "0"),
        ("flexlora", "1"),
    ]
    assert {(r["distribution"], r["seed"]) for r in rows} == {("heavy-tail-light", "0")}
    # round 0 is the base model, evaluated once and shared by both strategies
    round0 = [r for r in rows if r["round"] == "0"]
    assert round0[0]["rouge_l_unseen"] == round0[1]["rouge_l_unseen"] != ""
    base = json.loads((out / "baseline" / "seed-0.json").read_text())
    assert float(round0[0]["rouge_l_unseen"]) == base["row"]["rouge_l_unseen"]
    # round 1 comes from each run's own metrics.jsonl
    for r in (r for r in rows if r["round"] == "1"):
        folder = out / "runs" / "heavy-tail-light" / r["strategy"] / "seed-0"
        (m,) = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert m["round"] == 1, "the runs must not evaluate round 0 themselves"
        assert float(r["train_loss"]) == pytest.approx(m["train_loss"])
        assert int(r["bytes_up"]) == m["bytes_up"] > 0
        assert float(r["rouge_l_unseen"]) == pytest.approx(m["rouge_l_unseen"])
    # fedit-min holds every client to the smallest rank: it uploads less than flexlora
    up = {r["strategy"]: int(r["bytes_up"]) for r in rows if r["round"] == "1"}
    assert up["fedit-min"] < up["flexlora"]

    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert summary == first.summary and lines[-1] == summary
    assert "Gain over fedit-min, paired by seed" in summary
    assert "| flexlora |" in summary and "| base model (round 0) |" in summary
    assert ": 2 runs and 1 base-model evaluations (0 runs already done) in " in summary
    for name in ("rouge_by_round.png", "final_rouge.png", "gain_over_fedit-min.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    markers = {k: k.folder(out) / MARKER for k in keys}
    stamps = {k: p.stat().st_mtime_ns for k, p in markers.items()}
    base_stamp = (out / "baseline" / "seed-0.json").stat().st_mtime_ns

    # repeated: nothing runs again, the same tables come out
    lines.clear()
    again = _bench(out, lines)
    assert again.status == dict.fromkeys(keys, "skipped")
    assert "2 already done, 0 to run, 0 base-model evaluations" in lines[0]
    assert {k: p.stat().st_mtime_ns for k, p in markers.items()} == stamps
    assert (out / "baseline" / "seed-0.json").stat().st_mtime_ns == base_stamp
    assert again.rows == first.rows
    # the summary keeps the wall time of the call that did the work, and adds this one
    calls = [json.loads(x) for x in (out / "invocations.jsonl").read_text().splitlines()]
    assert [(c["ran"], c["skipped"], c["base_evals"]) for c in calls] == [(2, 0, 1), (0, 2, 0)]
    assert ": 2 runs and 1 base-model evaluations (0 runs already done) in " in again.summary
    assert ": 0 runs and 0 base-model evaluations (2 runs already done) in " in again.summary

    # an unfinished run (no marker, valid checkpoint) resumes; the other is still skipped
    markers[keys[0]].unlink()
    lines.clear()
    third = _bench(out, lines)
    assert third.status == {keys[0]: "ran", keys[1]: "skipped"}
    assert any("(resumed)" in x for x in lines)
    assert markers[keys[0]].is_file()

    # other settings in the same folder are refused before anything runs
    changed = _tiny_base(out)
    changed.train.lr = 0.5
    with pytest.raises(UsageError, match=r"train\.lr: 0\.01 -> 0\.5"):
        _bench(out, [], base=changed)


def test_seeds_share_the_data_split_and_the_base_evaluation_unless_vary_data(
    tmp_path: Path,
) -> None:
    base = _tiny_base(tmp_path)
    base.data.seed = 7
    keys = [RunKey(s, "heavy-tail-light", "flexlora") for s in (0, 1)]
    fixed = run_configs(base, keys, tmp_path / "a")
    assert [(c.federation.seed, c.data.seed) for c in fixed.values()] == [(0, 7), (1, 7)]
    varied = run_configs(base, keys, tmp_path / "b", vary_data=True)
    assert [(c.federation.seed, c.data.seed) for c in varied.values()] == [(0, 0), (1, 1)]

    lines: list[str] = []
    out = tmp_path / "two-seeds"

    def bench() -> Any:
        lines.clear()
        return run_bench(
            ["flexlora"],
            ["heavy-tail-light"],
            [0, 1],
            out,
            base=_tiny_base(out),
            dataset=make_dataset(),
            model_factory=_model,
            echo=lines.append,
        )

    result = bench()
    # greedy generation on the same data: one base-model evaluation serves both seeds
    assert "1 base-model evaluations" in lines[0]
    assert sorted(p.name for p in (out / "baseline").iterdir()) == ["seed-0.json"]
    round0 = {r["seed"]: r["rouge_l_unseen"] for r in result.rows if r["round"] == 0}
    assert set(round0) == {0, 1} and round0[0] == round0[1]
    assert "data.seed 0 in every seed (the same unseen tasks)" in result.summary
    # a repeated call reuses the saved evaluation for both seeds
    bench()
    assert "0 base-model evaluations" in lines[0]


def test_runs_identical_to_another_are_copied_not_run(tmp_path: Path) -> None:
    """fedit-min holds everyone to the smallest type: the same run under both distributions."""
    out = tmp_path / "dedupe"
    lines: list[str] = []

    def bench() -> Any:
        lines.clear()
        return run_bench(
            ["fedit-min", "flexlora"],
            ["heavy-tail-light", "heavy-tail-strong"],
            [0],
            out,
            base=_tiny_base(out),
            dataset=make_dataset(n_seen=20),
            model_factory=_model,
            echo=lines.append,
        )

    first = bench()
    light, strong = (RunKey(0, d, "fedit-min") for d in ("heavy-tail-light", "heavy-tail-strong"))
    assert first.status[light] == "ran" and first.status[strong] == "copied"
    assert all(
        first.status[RunKey(0, d, "flexlora")] == "ran"
        for d in (light.distribution, strong.distribution)
    )
    assert "1 identical to another run (copied, not run)" in lines[0]
    assert any(x.startswith("[same] heavy-tail-strong fedit-min seed 0") for x in lines)
    # the copy is the run: same metrics and adapters, its own config, marked as a copy
    a, b = light.folder(out), strong.folder(out)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    for f in (a / "adapters").rglob("*.safetensors"):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
    marker = json.loads((b / MARKER).read_text())
    assert marker["same_as"] == light.label()
    assert marker["config"]["federation"]["distribution"] == "heavy-tail-strong"
    assert 'distribution = "heavy-tail-strong"' in (b / "config.toml").read_text()
    rows = {(r["distribution"], r["round"]): r for r in first.rows if r["strategy"] == "fedit-min"}
    assert (
        rows["heavy-tail-light", 1]["rouge_l_unseen"]
        == rows["heavy-tail-strong", 1]["rouge_l_unseen"]
    )
    # flexlora gives each client its own type: never merged
    fl = [
        RunKey(0, d, "flexlora").folder(out) / "metrics.jsonl"
        for d in ("heavy-tail-light", "heavy-tail-strong")
    ]
    assert fl[0].read_text() != fl[1].read_text()

    # repeated: everything is done, nothing runs or copies again
    again = bench()
    assert set(again.status.values()) == {"skipped"}
    assert again.rows == first.rows
    # a copy whose marker is gone is copied again from the finished run
    (b / MARKER).unlink()
    third = bench()
    assert third.status[strong] == "copied" and third.status[light] == "skipped"


def test_flowertune_preset_is_the_leaderboard_general_nlp_setting() -> None:
    """Mistral-7B on 4 bits, alpaca-gpt4 in 20 clients, 2 a round, 200 rounds, MMLU by lm-eval;
    FedAvg at the leaderboard's r = 32 (fedit-max) beside the heterogeneous-rank strategies."""
    preset = get_preset("flowertune-general-nlp")
    cfg = base_config(None, preset)
    assert (cfg.model.name, cfg.model.quantization) == ("mistralai/Mistral-7B-v0.3", "4bit")
    assert (cfg.data.source, cfg.data.path, cfg.data.num_clients) == (
        "hub",
        "vicgalle/alpaca-gpt4",
        20,
    )
    assert (cfg.federation.rounds, cfg.federation.clients_per_round) == (200, 2)
    assert max(max(r) for r in cfg.federation.rank_types.values()) == 32 and cfg.lora.alpha == 64
    assert cfg.eval.harness_tasks == ["mmlu_stem", "mmlu_social_sciences", "mmlu_humanities"]
    assert "fedit-max" in preset.strategies and "flexlora" in preset.strategies
    keys = [RunKey(0, d, s) for s in preset.strategies for d in preset.distributions]
    for key, run in run_configs(cfg, keys, Path("unused")).items():
        types = {tuple(run.federation.rank_types[t]) for t in run.federation.rank_types}
        assert run.federation.strategy == key.strategy and (32, 32) in types
