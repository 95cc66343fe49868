"""The benchmark scripts still run: their quick modes, end to end, with sane numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_aggregation_benchmark_quick_mode() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aggregation.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
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
