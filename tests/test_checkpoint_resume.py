"""Crash safety: atomic checkpoints that refuse corruption, and a run killed with SIGKILL in the
middle of a round that ``flexlora resume`` finishes with the same adapters as a run never
interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from flexlora.config_io import to_dict
from flexlora.simulation import checkpoint as ck
from flexlora.simulation.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from flexlora.simulation.runner import FederatedRun
from flexlora.training.model import build_tiny_llama
from flexlora.types import GlobalUpdate, ModuleDelta
from tests.reliability_helpers import one_torch_thread  # noqa: F401 (fixture)
from tests.sim_helpers import make_dataset, tiny_config, write_jsonl_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"a.q": (5, 4), "a.up": (6, 4)}


def a_state(seed: int) -> GlobalUpdate:
    g = torch.Generator().manual_seed(seed)
    return GlobalUpdate(
        {
            name: ModuleDelta(
                U=torch.randn(m, 3, generator=g),  # (m, 3)
                S=torch.rand(3, generator=g),  # (3,)
                Vh=torch.randn(3, n, generator=g),  # (3, n)
            )
            for name, (m, n) in SHAPES.items()
        },
        strategy="flexlora",
    )


def a_checkpoint(round_: int) -> Checkpoint:
    return Checkpoint(
        round=round_,
        global_update=a_state(round_),
        metrics=[{"round": r, "train_loss": 1.0 / r} for r in range(1, round_ + 1)],
        extra={"best": 0.5, "bad_evals": 1, "stopped": False},
        config={"federation": {"seed": 7, "rounds": 3}, "output": {"dir": "x"}},
    )


def assert_same_state(a: GlobalUpdate, b: GlobalUpdate) -> None:
    assert a.names() == b.names() and a.strategy == b.strategy
    for name in a.names():
        for t, u in ((a[name].U, b[name].U), (a[name].S, b[name].S), (a[name].Vh, b[name].Vh)):
            assert torch.equal(t, u)


# ---------------------------------------------------------------- the checkpoint files
def test_round_trip(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, a_checkpoint(1))
    save_checkpoint(tmp_path, a_checkpoint(2))
    got = load_checkpoint(tmp_path, SHAPES)
    want = a_checkpoint(2)
    assert (got.round, got.metrics, got.extra, got.config) == (
        2,
        want.metrics,
        want.extra,
        want.config,
    )
    assert_same_state(got.global_update, want.global_update)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global-000002.safetensors", "state.json"]


def test_non_finite_metrics_are_stored_as_null(tmp_path: Path) -> None:
    ckpt = a_checkpoint(1)
    ckpt.metrics[0]["train_loss"] = float("nan")
    save_checkpoint(tmp_path, ckpt)
    json.loads((tmp_path / "state.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert load_checkpoint(tmp_path).metrics[0]["train_loss"] is None


@pytest.mark.parametrize("dies_at", ["tensors", "state"])
def test_a_writer_killed_mid_save_leaves_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_at: str
) -> None:
    save_checkpoint(tmp_path, a_checkpoint(1))
    real_replace = os.replace

    def dying_replace(src: str, dst: str | Path) -> None:
        if Path(dst).name.startswith("global" if dies_at == "tensors" else "state"):
            raise KeyboardInterrupt("killed")  # the temporary file is written, not renamed
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, a_checkpoint(2))
    monkeypatch.setattr(ck.os, "replace", real_replace)
    got = load_checkpoint(tmp_path, SHAPES)
    assert got.round == 1
    assert_same_state(got.global_update, a_state(1))
    assert not list(tmp_path.glob(".*"))  # the temporary file was removed
    save_checkpoint(tmp_path, a_checkpoint(2))
    assert load_checkpoint(tmp_path).round == 2


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_state(folder: Path, **changes: Any) -> None:
    state = json.loads((folder / "state.json").read_text())
    state.update(changes)
    (folder / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: _flip_byte(d / "global-000001.safetensors", -3), "SHA-256 mismatch"),
        (lambda d: _flip_byte(d / "global-000001.safetensors", 20), "SHA-256 mismatch"),
        (lambda d: (d / "global-000001.safetensors").write_bytes(b""), "SHA-256 mismatch"),
        (lambda d: (d / "global-000001.safetensors").unlink(), "cannot be read"),
        (lambda d: _edit_state(d, round=5), "checksum does not match"),
        (lambda d: _edit_state(d, metrics=[]), "checksum does not match"),
        (lambda d: _edit_state(d, checksum=None), "checksum does not match"),
        (lambda d: _edit_state(d, format=1), "has format 1"),
        (lambda d: (d / "state.json").write_text('{"round": 1'), "cannot be read"),
        (lambda d: (d / "state.json").write_bytes(b"\xff\xfe"), "cannot be read"),
        (lambda d: (d / "state.json").write_text("[1, 2]"), "not a JSON object"),
        (lambda d: (d / "state.json").unlink(), "no checkpoint"),
    ],
)
def test_damaged_checkpoints_give_a_clear_error(tmp_path: Path, damage, message: str) -> None:
    save_checkpoint(tmp_path, a_checkpoint(1))
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path, SHAPES)
    assert str(tmp_path) in str(info.value)


def test_a_consistent_forgery_is_still_checked(tmp_path: Path) -> None:
    """Digests re-computed by hand: the tensors must still fit the model and be finite."""
    save_checkpoint(tmp_path, a_checkpoint(1))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_checkpoint(tmp_path, {"a.q": (5, 4), "a.up": (7, 4)})
    bad = a_state(1)
    bad["a.q"].S[0] = float("nan")
    save_checkpoint(tmp_path, Checkpoint(1, bad, config={}))
    with pytest.raises(CheckpointError, match=r"module a\.q is not finite"):
        load_checkpoint(tmp_path, SHAPES)
    save_checkpoint(tmp_path, a_checkpoint(1))
    state = json.loads((tmp_path / "state.json").read_text())
    state["global"] = "../outside.safetensors"
    state["checksum"] = ck._digest(ck._canonical(state))
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="names a file outside it"):
        load_checkpoint(tmp_path)


def test_resume_refuses_a_changed_config() -> None:
    saved = json.loads(json.dumps(to_dict(tiny_config("runs/a"))))
    check_resumable(saved, json.loads(json.dumps(to_dict(tiny_config("elsewhere/a")))))
    moved = tiny_config("b", output={"progress": True})
    check_resumable(saved, json.loads(json.dumps(to_dict(moved))))
    for section, change, shown in [
        ("federation", {"seed": 8}, "federation.seed: 7 -> 8"),
        ("train", {"lr": 0.5}, "train.lr: 0.01 -> 0.5"),
        ("federation", {"rank_types": {"2": [2, 2]}}, "federation.rank_types"),
        ("model", {"threads": 3}, "model.threads: 0 -> 3"),
    ]:
        changed = json.loads(json.dumps(to_dict(tiny_config("runs/a", **{section: change}))))
        with pytest.raises(CheckpointError, match="configuration changed") as info:
            check_resumable(saved, changed)
        assert shown in str(info.value)
    with pytest.raises(CheckpointError, match="does not record"):
        check_resumable(None, saved)


# ---------------------------------------------------------------- resume in process
class Interrupt(Exception):
    pass


def adapters(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: load_file(p) for p in sorted(folder.glob("adapters/*/*.safetensors"))}


def assert_same_adapters(a: Path, b: Path) -> None:
    fa, fb = adapters(a), adapters(b)
    assert fa and fa.keys() == fb.keys()
    for slot in fa:
        assert fa[slot].keys() == fb[slot].keys()
        for key in fa[slot]:
            assert torch.equal(fa[slot][key], fb[slot][key]), (slot, key)


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics without wall-clock fields."""
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def interrupted_then_resumed(
    make: Callable[[], FederatedRun], monkeypatch: pytest.MonkeyPatch, out: Path, at: int = 3
) -> list[dict[str, Any]]:
    """Run ``make()`` until it dies at the start of round ``at``, then resume a fresh one."""
    broken = make()
    real_round = broken.run_round

    def run_round(state, round_, bar):  # type: ignore[no-untyped-def]
        if round_ == at:
            raise Interrupt
        return real_round(state, round_, bar)

    monkeypatch.setattr(broken, "run_round", run_round)
    with pytest.raises(Interrupt):
        broken.run()
    assert load_checkpoint(out / "checkpoint").round == at - 1
    return make().run(resume=True)


@pytest.mark.parametrize("strategy", ["flexlora", "flora", "fedex", "fedsa"])
def test_resume_in_process_equals_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """FLoRA and FedEx-LoRA also carry state in the frozen weights (merged ΔW, residual),
    FedSA-LoRA in each client's own B on disk: the resumed clients' B's are bit for bit."""
    sections = {
        "federation": {"strategy": strategy, "rounds": 3},
        "eval": {"at_start": False, "every": 2, "patience": 1},
    }

    def sim(name: str) -> FederatedRun:
        cfg = tiny_config(str(tmp_path / name), **sections)
        return FederatedRun(cfg, dataset=make_dataset(), model_and_tokenizer=build_tiny_llama(0))

    whole = sim("whole").run()
    resumed = interrupted_then_resumed(lambda: sim("broken"), monkeypatch, tmp_path / "broken")
    assert comparable(resumed) == comparable(whole)
    assert_same_adapters(tmp_path / "whole", tmp_path / "broken")
    if strategy == "fedsa":
        files = sorted(
            p.relative_to(tmp_path / "whole") for p in tmp_path.glob("whole/client_state/*/*")
        )
        assert files and files == sorted(
            p.relative_to(tmp_path / "broken") for p in tmp_path.glob("broken/client_state/*/*")
        )
        for rel in files:
            a, b = load_file(tmp_path / "whole" / rel), load_file(tmp_path / "broken" / rel)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


# ---------------------------------------------------------------- SIGKILL, then flexlora resume
def flexlora(*args: str | Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "flexlora.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def read_state(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "checkpoint" / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_sigkill_mid_round_then_resume_gives_the_same_adapters(tmp_path: Path) -> None:
    config = write_jsonl_job(tmp_path / "job")
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    victim = flexlora("run", config, "--out", killed_dir)
    deadline = time.monotonic() + 90
    state = read_state(killed_dir)
    while (state is None or state["round"] < 1) and victim.poll() is None:
        assert time.monotonic() < deadline, "round 1 never finished"
        time.sleep(0.01)
        state = read_state(killed_dir)
    assert victim.poll() is None, victim.communicate()[0]
    # round 2 has begun with round 1's checkpoint: kill a quarter of a round into it
    time.sleep(0.25 * state["metrics"][-1]["seconds_train"])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done = read_state(killed_dir)["round"]  # type: ignore[index]
    assert 1 <= done < 4 and not (killed_dir / "adapters").exists()  # killed inside round done+1

    whole = flexlora("run", config, "--out", whole_dir)  # never interrupted
    out = finish(flexlora("resume", killed_dir))
    assert f"resuming {killed_dir} after round {done}" in out
    finish(whole)
    assert_same_adapters(whole_dir, killed_dir)
    rows = [json.loads(x) for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (whole_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert comparable(rows) == comparable(want)
    assert "rouge_l_unseen" in rows[-1]


def test_resume_cli_refuses_a_tampered_or_changed_run(tmp_path: Path, capsys) -> None:
    from flexlora.cli import main

    config = write_jsonl_job(tmp_path / "job")
    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run_dir), "--rounds", "1"]) == 0
    text = (run_dir / "config.toml").read_text()
    (run_dir / "config.toml").write_text(text.replace("seed = 7", "seed = 8"))
    assert main(["resume", str(run_dir)]) == 2
    assert "federation.seed: 7 -> 8" in capsys.readouterr().err
    (run_dir / "config.toml").write_text(text)
    _flip_byte(next((run_dir / "checkpoint").glob("global-*.safetensors")), -2)
    assert main(["resume", str(run_dir)]) == 2
    assert "SHA-256 mismatch" in capsys.readouterr().err
