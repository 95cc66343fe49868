"""The paper-grid bench: paired t-tests, the Table 2/3/11 summary, aliases run once."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from flexlora.bench.paper_grid import grid_cell, paper_grid_section
from flexlora.bench.presets import PAPER_GRID, PRESETS
from flexlora.bench.runner import MARKER, RunKey, run_bench
from flexlora.bench.settings import config_changes, config_json, run_configs
from flexlora.bench.stats import paired_t_test
from flexlora.errors import UsageError
from flexlora.training.model import build_tiny_llama
from tests.sim_helpers import make_dataset, tiny_config


def test_paired_t_test_by_hand_and_against_scipy() -> None:
    a = {0: 0.12, 1: 0.23, 2: 0.31, 3: 0.40}
    b = {0: 0.10, 1: 0.20, 2: 0.30, 3: 0.35, 9: 1.0}  # seed 9 has no pair
    t, p, n = paired_t_test(a, b)
    diffs = [0.02, 0.03, 0.01, 0.05]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    assert n == 4 and t == pytest.approx(mean / (sd / 2))
    assert 0 < p < 0.05
    stats = pytest.importorskip("scipy.stats")
    want = stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)])
    assert t == pytest.approx(want.statistic, rel=1e-9)
    assert p == pytest.approx(want.pvalue, rel=1e-7)
    # identical runs (aliases of one computation): p = 1; one pair: no test
    assert paired_t_test(a, a)[1] == 1.0
    assert math.isnan(paired_t_test({0: 1.0}, {0: 0.5})[1])


def test_grid_cells_name_method_and_aggregation() -> None:
    assert grid_cell("fedavg+flexlora") == ("fedavg", "flexlora")
    assert grid_cell("flexlora") == ("fedit", "flexlora")
    assert grid_cell("fedit-min") == ("fedit", "homogeneous")
    assert grid_cell("slora") == ("slora", "homogeneous")
    assert grid_cell("flora") is None and grid_cell("nonsense+x") is None
    assert len(PAPER_GRID) == 9 and set(PRESETS["paper-grid"].strategies) == set(PAPER_GRID)
    assert PRESETS["paper-grid-2core"].seeds >= 2  # an interval needs two seeds


def test_paper_grid_section_has_tables_2_3_and_11() -> None:
    finals = {
        ("fedit+homogeneous", "uniform"): {0: 0.10, 1: 0.20, 2: 0.30},
        ("fedit+flexlora", "uniform"): {0: 0.12, 1: 0.23, 2: 0.31},
        ("fedit+hetlora", "uniform"): {0: 0.11, 1: 0.21, 2: 0.33},
        ("slora+homogeneous", "uniform"): {0: 0.10, 1: 0.10, 2: 0.10},
        ("slora+flexlora", "uniform"): {0: 0.15, 1: 0.15, 2: 0.15},
    }
    strategies = [*(s for s, _ in finals), "flora"]
    text = "\n".join(paper_grid_section(finals, strategies, ["uniform"]))
    assert "| FedIT homogeneous rank | 0.2000 ± 0.2484 |" in text
    assert "| FedIT + FlexLoRA | 0.2200 ± " in text
    assert "| SLoRA + FlexLoRA | 0.1500 ± 0.0000 |" in text
    assert "flora" not in text and "FedAvg" not in text
    # Table 3: 100 * (0.22 - 0.20) / 0.20 = +10.0 %, all 3 seeds won; SLoRA +50 %
    assert "| FedIT | +10.0 % (3/3) |" in text
    assert "| SLoRA | +50.0 % (3/3) |" in text
    # Table 11: paired t-test p-values; SLoRA's differences have no spread -> p = 0
    stats = pytest.importorskip("scipy.stats")
    p = stats.ttest_rel([0.12, 0.23, 0.31], [0.10, 0.20, 0.30]).pvalue
    assert f"| FedIT | {p:.3f} |" in text
    assert "| SLoRA | 0.0e+00 |" in text
    assert "over + HetLoRA" in text  # FedIT has all three rows
    assert paper_grid_section(finals, ["fedit+flexlora"], ["uniform"]) == []


def test_a_small_grid_runs_fedavg_apart_copies_true_aliases_and_writes_the_tables(
    tmp_path: Path,
) -> None:
    """FedAvg (SGD) and FedIT (AdamW) both run; ``flexlora`` (= fedit+flexlora) is copied;
    SLoRA's sparse stage uses the reference code's density per rank type."""
    out = tmp_path / "grid"
    lines: list[str] = []
    base = tiny_config(
        str(out / "unused"),
        federation={
            "rounds": 2,
            "distribution": "heavy-tail-light",
            "rank_types": {"8": [2, 2], "30": [4, 4], "30-200": [4, 8], "200": [8, 8]},
            "slora_density": "paper",
        },
        train={"local_steps": 1},
        eval={"every": 0, "max_examples_per_client": 1},
    )

    def model(cfg: Any) -> Any:
        return build_tiny_llama(seed=0)

    result = run_bench(
        ["fedavg+flexlora", "fedit+flexlora", "flexlora", "slora+flexlora", "slora+homogeneous"],
        ["heavy-tail-light"],
        [0],
        out,
        base=base,
        dataset=make_dataset(n_seen=12),
        model_factory=model,
        echo=lines.append,
    )
    seed = 0
    fedavg, fedit, alias = (
        RunKey(seed, "heavy-tail-light", s)
        for s in ("fedavg+flexlora", "fedit+flexlora", "flexlora")
    )
    assert result.status[fedavg] == "ran"
    assert {result.status[fedit], result.status[alias]} == {"ran", "copied"}
    copied = alias if result.status[alias] == "copied" else fedit
    assert json.loads((copied.folder(out) / MARKER).read_text())["same_as"]
    assert (fedit.folder(out) / "metrics.jsonl").read_text() == (
        alias.folder(out) / "metrics.jsonl"
    ).read_text()
    done = {k: json.loads((k.folder(out) / MARKER).read_text()) for k in (fedavg, fedit)}
    assert "same_as" not in done[fedavg]
    assert done[fedavg]["config"]["train"]["optimizer"] == "sgd"
    assert done[fedit]["config"]["train"]["optimizer"] == "adamw"

    def rows(key: RunKey) -> list[dict[str, Any]]:
        text = (key.folder(out) / "metrics.jsonl").read_text()
        return [json.loads(x) for x in text.splitlines()]

    # round 1's loss is measured before any step; round 2 starts from different global models
    loss = {k: next(r for r in rows(k) if r["round"] == 2)["train_loss"] for k in (fedavg, fedit)}
    assert loss[fedavg] != loss[fedit]
    # SLoRA's first round is its sparse stage, counted as values only: each client is sent the
    # whole union mask's values and sends back its own type's (no more than the union's)
    first = next(
        r for r in rows(RunKey(seed, "heavy-tail-light", "slora+flexlora")) if r["round"] == 1
    )
    assert first["stage"] == "sparse"
    assert first["bytes_down"] == 4 * first["sparse_nnz"] * len(first["clients"])
    assert 0 < first["bytes_up"] <= 4 * first["sparse_nnz"] * len(first["aggregated"])
    summary = result.summary
    assert "## The paper's grid (Table 2's form)" in summary
    for row in ("FedAvg + FlexLoRA", "FedIT + FlexLoRA", "SLoRA homogeneous rank"):
        assert f"| {row} | " in summary
    assert "| SLoRA | " in summary and "Table 11's form" in summary


def test_a_fedavg_run_finished_with_adamw_is_not_taken_for_one_with_sgd(tmp_path: Path) -> None:
    """DONE.json records the optimizer the clients used, so an old FedAvg run (a copy of FedIT,
    AdamW) is refused by a repeated bench call instead of mixed with new SGD runs."""
    base = tiny_config(str(tmp_path / "unused"))
    keys = [RunKey(0, "uniform", "fedavg+flexlora"), RunKey(0, "uniform", "fedit+flexlora")]
    configs = run_configs(base, keys, tmp_path)
    now = {k.strategy: config_json(c) for k, c in configs.items()}
    assert now["fedavg+flexlora"]["train"]["optimizer"] == "sgd"
    assert now["fedit+flexlora"]["train"]["optimizer"] == "adamw"
    old = json.loads(json.dumps(now["fedavg+flexlora"]))
    old["train"]["optimizer"] = "adamw"
    assert config_changes(old, now["fedavg+flexlora"]) == ["train.optimizer: 'adamw' -> 'sgd'"]
    base.train.optimizer = "adamw"  # contradicts FedAvg: refused before anything runs
    with pytest.raises(UsageError, match=r"write fedit\+flexlora"):
        run_configs(base, keys, tmp_path)
