"""The offline default: filling the cache from a (synthetic) bigbench sdist, never the network."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from flexlora.data import DataConfig, load_federated_dataset, offline
from flexlora.errors import DataError
from tests.fixtures_data import write_bigbench_sdist, write_ni_v1

TASKS = {
    "subtask001_quoref_question_generation": 30,
    "subtask002_quoref_answer_generation": 12,
    "subtask028_drop_answer_generation": 20,
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(offline.ENV_CACHE, str(cache))
    monkeypatch.delenv(offline.ENV_SDIST, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError(f"tests must not run pip: {args}")

    monkeypatch.setattr(offline.subprocess, "run", no_network)
    return cache


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert offline.cache_root() == tmp_path / "cache"
    monkeypatch.delenv(offline.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert offline.cache_root() == tmp_path / "xdg" / "flexlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert offline.cache_root() == tmp_path / "home" / ".cache" / "flexlora"


def test_extract_from_sdist_copies_only_ni_task_files(tmp_path: Path) -> None:
    tarball = write_bigbench_sdist(tmp_path / "bigbench-1.0.0.tar.gz", TASKS)
    folder = offline.ensure_ni_v1(tarball)
    assert folder == tmp_path / "cache" / offline.NI_V1_DIRNAME
    assert sorted(p.name for p in folder.iterdir()) == [offline.MANIFEST, *sorted(TASKS)]
    for name, n in TASKS.items():
        assert len(json.loads((folder / name / "task.json").read_text())["examples"]) == n
    manifest = json.loads((folder / offline.MANIFEST).read_text())
    assert manifest["tasks"] == sorted(TASKS)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert tarball.exists()  # a user-supplied tarball is kept
    # second use: the cache answers, the source is not read again
    tarball.unlink()
    assert offline.ensure_ni_v1(tarball) == folder


def test_default_config_uses_env_sdist_then_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = write_bigbench_sdist(tmp_path / "bb.tar.gz", TASKS)
    monkeypatch.setenv(offline.ENV_SDIST, str(tarball))
    data = load_federated_dataset(DataConfig(unseen_fraction=0.34))
    assert data.clients == tuple(sorted(TASKS)) and len(data.unseen) == 1
    assert {e.category for c in data.clients for e in data.test(c)} == {"quoref", "drop"}
    monkeypatch.delenv(offline.ENV_SDIST)
    again = load_federated_dataset(DataConfig(unseen_fraction=0.34))
    assert again.unseen == data.unseen


def test_download_path_runs_pip_then_deletes_the_tarball(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixture = write_bigbench_sdist(tmp_path / "fixture.tar.gz", TASKS)
    calls = []

    def fake_pip(cmd, check=False, stdout=None):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "bigbench-1.0.0.tar.gz").write_bytes(fixture.read_bytes())
        calls.append(dest)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(offline.subprocess, "run", fake_pip)
    folder = offline.ensure_ni_v1()
    cmd, dest = calls
    assert cmd[1:] == [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "bigbench==1.0.0",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    assert not dest.exists()  # the download folder (and the tarball) are gone
    assert len(list(folder.glob("subtask*/task.json"))) == len(TASKS)


def test_failed_download_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        offline.subprocess,
        "run",
        lambda cmd, check=False, stdout=None: subprocess.CompletedProcess(cmd, 1),
    )
    with pytest.raises(DataError, match=r"pip download failed.*FLEXLORA_BIGBENCH_SDIST"):
        offline.ensure_ni_v1()


def test_unpacked_folder_source(tmp_path: Path) -> None:
    root = tmp_path / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks" / "natural_instructions"
    write_ni_v1(root, TASKS)
    folder = offline.ensure_ni_v1(tmp_path / "bigbench-1.0.0")
    assert sorted(p.name for p in folder.glob("subtask*")) == sorted(TASKS)


def test_bad_sources_leave_no_cache(tmp_path: Path) -> None:
    target = tmp_path / "cache" / offline.NI_V1_DIRNAME
    with pytest.raises(DataError, match="no such file or folder"):
        offline.ensure_ni_v1(tmp_path / "missing.tar.gz")
    empty = write_bigbench_sdist(tmp_path / "empty.tar.gz", {})
    with pytest.raises(DataError, match=r"empty\.tar\.gz: no natural_instructions"):
        offline.ensure_ni_v1(empty)
    truncated = tmp_path / "cut.tar.gz"
    full = write_bigbench_sdist(tmp_path / "full.tar.gz", TASKS).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"cut\.tar\.gz: cannot read the archive"):
        offline.ensure_ni_v1(truncated)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # temp folders removed too
