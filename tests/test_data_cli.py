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


def test_stats_say_what_was_read_kept_and_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """3 tasks of 10/20/30 examples, task003_c unseen: 60 read, its 16 train examples dropped."""
    root = write_ni_v2(
        tmp_path / "ni",
        {"task001_a": 10, "task002_b": 30, "task003_c": 20},
        test=["task003_c"],
    )
    out = _stats(capsys, str(root))
    assert "read: 60 examples from 3 task(s) of " in out
    assert "kept: 44 (train 32, eval 6, test 6)" in out
    assert "dropped: 16\n  training part of unseen clients (held out for zero-shot " in out
    assert "unaccounted" not in out and "subsampling" not in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if "task00" in line}
    assert rows["task001_a"] == ["seen", "10", "10", "0", "0", "0"]
    assert rows["task003_c"] == ["unseen", "20", "4", "0", "16", "0"]

    # subsampling and caps are counted under their own reasons; kept + dropped = read
    args = ["--subsample-fraction", "0.5", "--max-test-per-client", "1"]
    out = _stats(capsys, str(root), *args, "--max-train-per-client", "5")
    assert "read: 60 examples from 3 task(s)" in out
    assert "  subsampling (data.subsample_fraction, data.max_examples_per_task): 30" in out
    reasons = {k: int(v) for k, v in re.findall(r"\n  ([^:\n]+): (\d+)", out)}
    kept = int(re.search(r"kept: (\d+)", out).group(1))  # type: ignore[union-attr]
    dropped = int(re.search(r"dropped: (\d+)", out).group(1))  # type: ignore[union-attr]
    # halves of 10/30/20 = 5/15/10, split 8:1:1 -> train 3/11/8, eval 1/2/1, test 1/2/1;
    # task002's train is capped at 5 (6 dropped) and its eval/test at 1 each (2 dropped);
    # unseen task003 loses its 8 train examples
    assert kept == (3 + 1 + 1) + (5 + 1 + 1) + (1 + 1)
    assert reasons["training part of unseen clients (held out for zero-shot evaluation)"] == 8
    assert reasons["training examples over data.max_train_per_client"] == 6
    assert reasons["eval/test examples over data.max_test_per_client"] == 2
    assert dropped == 30 + 8 + 6 + 2 and kept + dropped == 60
