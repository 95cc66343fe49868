"""Run folders are never lost: ``flexlora run`` into another run's folder refuses (exit 2, the
first run byte-identical), ``--overwrite`` replaces it and says what it removes, a same-config
re-run resumes, a second writer is refused, a stale lock (dead PID) is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flexlora.cli import main
from flexlora.simulation.rundir import LOCK, RunFolderError, RunLock
from tests.reliability_helpers import one_torch_thread  # noqa: F401 (fixture)
from tests.sim_helpers import write_jsonl_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
QUICK = ["--rounds", "1", "--set", "train.local_steps=2"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def job(tmp_path: Path) -> Path:
    return write_jsonl_job(tmp_path / "job")


def test_another_config_is_refused_then_overwritten_and_the_same_config_resumes(
    tmp_path: Path, job: Path, capsys: pytest.CaptureFixture[str], caplog
) -> None:
    out = tmp_path / "run"
    assert main(["run", str(job), "--out", str(out), *QUICK]) == 0
    assert not (out / LOCK).exists(), "the lock is removed when the run ends"
    before = snapshot(out)
    assert {"config.toml", "metrics.jsonl", "checkpoint/state.json"} <= set(before)
    capsys.readouterr()

    # another config: refused, nothing touched
    assert main(["run", str(job), "--out", str(out), *QUICK, "--set", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds another run" in err
    assert "train.lr: 0.01 -> 0.5" in err and "--overwrite" in err
    assert snapshot(out) == before

    # the same config: resumed (the finished run is kept, not run again)
    caplog.set_level("INFO", logger="flexlora")
    assert main(["run", str(job), "--out", str(out), *QUICK]) == 0
    assert "resuming it (as flexlora resume does)" in capsys.readouterr().out
    assert f"resuming {out} after round 1" in caplog.text
    assert (out / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert (out / "config.toml").read_bytes() == before["config.toml"]

    # --overwrite: says what it removes, then the new run replaces the old one
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(job), "--out", str(out), *QUICK, "--set", "train.lr=0.5"]) == 2
    args = ["run", str(job), "--out", str(out), *QUICK, "--set", "train.lr=0.5", "--overwrite"]
    assert main(args) == 0
    said = capsys.readouterr().out
    removed = "config.toml, metrics.jsonl, checkpoint/"
    assert f"--overwrite: removing the run in {out}: {removed}" in said
    assert "lr = 0.5" in (out / "config.toml").read_text()
    assert (out / "metrics.jsonl").read_bytes() != before["metrics.jsonl"]
    assert (out / "notes.txt").read_text() == "mine", "files that are not the run's stay"


def test_a_finished_run_without_checkpoint_is_not_rerun_silently(
    tmp_path: Path, job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["run", str(job), "--out", str(out), *QUICK, "--set", "output.checkpoint=false"]
    assert main(args) == 0
    before = snapshot(out)
    assert not (out / "checkpoint").exists()
    assert main(args) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert snapshot(out) == before


HOLDER = textwrap.dedent(
    """
    import sys, time
    from flexlora.simulation.rundir import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(
    tmp_path: Path, job: Path, capsys: pytest.CaptureFixture[str], caplog
) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        owner = json.loads((out / LOCK).read_text())
        assert owner["pid"] == holder.pid and owner["host"]
        assert main(["run", str(job), "--out", str(out), *QUICK]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another flexlora process (PID {holder.pid} on " in err
        assert not (out / "config.toml").exists()
        with pytest.raises(RunFolderError, match="in use"):
            RunLock(out).acquire()  # the bench and `flexlora resume` take the same lock
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock stays behind, naming a dead PID on this host
    assert json.loads((out / LOCK).read_text())["pid"] == holder.pid
    caplog.set_level("WARNING", logger="flexlora")
    assert main(["run", str(job), "--out", str(out), *QUICK]) == 0
    assert f"taking over a stale lock (PID {holder.pid} on" in caplog.text
    assert (out / "metrics.jsonl").is_file() and not (out / LOCK).exists()


def test_the_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    with RunLock(tmp_path / "r") as outer:
        with RunLock(tmp_path / "r"):
            assert (tmp_path / "r" / LOCK).is_file()
        assert (tmp_path / "r" / LOCK).is_file(), "the inner release keeps the outer's lock"
        assert outer.owner()["pid"] == os.getpid()  # type: ignore[index]
    assert not (tmp_path / "r" / LOCK).exists()
