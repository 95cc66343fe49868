"""The benchmark scripts still run: their quick modes, end to end, with sane numbers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``benchmarks/NAME`` with this interpreter; assert it exited 0."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_aggregation_benchmark_quick_mode() -> None:
    done = run_script("aggregation.py", "--quick")
    rows = [line.split() for line in done.stdout.splitlines()]
    rows = [row for row in rows if row[:1] in (["q_proj"], ["down_proj"])]
    assert sorted((row[0], row[2]) for row in rows) == [
        ("down_proj", "dense"),
        ("down_proj", "factored"),
        ("q_proj", "dense"),
        ("q_proj", "factored"),
    ]
    for row in rows:
        seconds, peak_mib, err, err_r = float(row[3]), float(row[4]), float(row[5]), float(row[6])
        assert seconds > 0 and peak_mib >= 0
        assert err <= 1e-4 and err_r <= 1e-4, row
    assert "speedup (dense time / factored time, whole layer)" in done.stdout
    assert "goal (factored >= 20x faster" in done.stdout


def test_training_benchmark_quick_mode_compares_batched_clients() -> None:
    done = run_script("training.py", "--quick")
    assert "load average" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines()]
    rows = [row for row in rows if len(row) == 5 and row[0] in ("1", "4")]
    assert [row[0] for row in rows] == ["1", "4"]
    for row in rows:
        seq, together, ratio, diff = float(row[1]), float(row[2]), row[3], float(row[4])
        assert seq > 0 and together > 0 and ratio.endswith("x")
        assert diff <= 1e-5  # together trains the same factors as one at a time


def test_gpu_throughput_benchmark_exits_cleanly_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run for real")
    done = run_script("gpu_throughput.py", timeout=120)
    assert "CUDA is not available: nothing measured" in done.stdout


def test_gpu_check_tiny_mode_runs_a_bf16_and_a_4bit_round_on_the_cpu() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| client-")]
    kinds = ["(none)", "(4bit)"] if importlib.util.find_spec("bitsandbytes") else ["(none)"]
    assert len(rows) == 4 * len(kinds) and all(any(k in r for k in kinds) for r in rows)
    assert all(float(r.split("|")[2].replace(",", "")) > 0 for r in rows)  # tokens/s
    assert done.stdout.count("| server step") == len(kinds)
    assert "batched clients" in done.stdout and "goal: >= 3x for K=8" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_so_and_exits_cleanly() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0 and "no CUDA device" in done.stdout
