"""``flexlora data stats`` on fixture files (and the offline default from a synthetic sdist)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flexlora.cli import main
from flexlora.data import offline
from flexlora.data.cli import guess_source
from flexlora.errors import UsageError
from tests.fixtures_data import DOLLY_CATEGORIES, write_bigbench_sdist, write_dolly, write_ni_v2


def _stats(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["data", "stats", *argv]) == 0
    return capsys.readouterr().out


def test_stats_on_ni_v2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_ni_v2(
        tmp_path / "ni",
        {"task001_a": 10, "task002_b": 30, "task003_c": 20},
        test=["task003_c"],
    )
    out = _stats(capsys, str(root))
    assert "clients: 3 (seen 2, unseen 1); tasks: 3" in out
    assert "train examples per seen client (min / median / max): 8 / 16 / 24" in out
    assert "test examples per client (min / median / max): 1 / 2 / 3" in out
    # 10 + 30 examples of the seen tasks, 2 + 2 eval/test of the unseen one
    assert re.search(r"categories: 1\n  Question Answering: 44", out)


def test_stats_on_dolly_with_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_dolly(tmp_path / "d.jsonl", dict.fromkeys(DOLLY_CATEGORIES, 20))
    out = _stats(capsys, str(path), "--num-clients", "4", "--unseen-fraction", "0.25")
    assert "clients: 4 (seen 3, unseen 1)" in out
    assert f"categories: {len(DOLLY_CATEGORIES)}" in out
    out = _stats(capsys, str(path), "--partitioner", "meta", "--split-ratios", "0.5,0.25,0.25")
    assert f"clients: {len(DOLLY_CATEGORIES)}" in out
    assert "mean per-client category entropy: 0.000 bits" in out


def test_stats_offline_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(offline.ENV_CACHE, str(tmp_path / "cache"))
    tarball = write_bigbench_sdist(
        tmp_path / "bb.tar.gz",
        {"subtask001_quoref_question_generation": 20, "subtask002_drop_answer": 40},
    )
    monkeypatch.setenv(offline.ENV_SDIST, str(tarball))
    out = _stats(capsys)
    assert "clients: 2 (seen 1, unseen 1)" in out
    out = _stats(capsys, "--source", "natural-instructions-v1-offline", "--clients-per-task", "2")
    assert "clients: 4 (seen 2, unseen 2)" in out


def test_stats_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"instruction": "a", "context": "", "response": "b", "category": "c"}\n{x\n')
    assert main(["data", "stats", str(bad), "--source", "dolly"]) == 2
    assert re.search(r"d\.jsonl:2: invalid JSON", capsys.readouterr().err)
    assert main(["data", "stats", str(tmp_path / "nothing.csv")]) == 2
    assert "pass --source" in capsys.readouterr().err


def test_guess_source(tmp_path: Path) -> None:
    assert guess_source(str(write_ni_v2(tmp_path / "ni", {"task001_a": 3}))) == (
        "natural-instructions"
    )
    assert guess_source(str(write_dolly(tmp_path / "d.jsonl", {"a": 1}))) == "dolly"
    (tmp_path / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert guess_source(str(tmp_path / "x.jsonl")) == "jsonl"
    tarball = write_bigbench_sdist(tmp_path / "bb.tar.gz", {"subtask001_a_b": 1})
    assert guess_source(str(tarball)) == "natural-instructions-v1-offline"
    with pytest.raises(UsageError):
        guess_source(str(tmp_path / "missing"))
