"""The offline default data: the 61 Natural Instructions (v1) tasks inside PyPI's bigbench sdist.

At first use the sdist (``bigbench==1.0.0``, ~358 MB) is fetched with ``pip download`` (or taken
from ``$FLEXLORA_BIGBENCH_SDIST``: the tar.gz or an unpacked folder), streamed once, and only the
``natural_instructions/subtask*/task.json`` files (~160 MB) are copied into the cache, into a
temporary folder renamed into place when complete. The tarball is deleted afterwards. The data
stays on the user's machine: never commit it (each file carries a canary string asking that it
not enter training corpora).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from flexlora.errors import DataError

__all__ = [
    "ENV_CACHE",
    "ENV_SDIST",
    "SDIST_REQUIREMENT",
    "cache_root",
    "download_sdist",
    "ensure_ni_v1",
    "extract_ni_v1",
]

log = logging.getLogger(__name__)

ENV_CACHE = "FLEXLORA_CACHE"
ENV_SDIST = "FLEXLORA_BIGBENCH_SDIST"
SDIST_REQUIREMENT = "bigbench==1.0.0"
NI_V1_DIRNAME = "natural_instructions_v1"
MANIFEST = "MANIFEST.json"
# a task.json of the natural_instructions benchmark, wherever the archive roots it
_MEMBER = re.compile(
    r"(?:^|/)bigbench/benchmark_tasks/natural_instructions/(subtask\d+_[A-Za-z0-9_]+)/task\.json$"
)
_FOLDER_MEMBER = re.compile(r"^subtask\d+_[A-Za-z0-9_]+$")


def cache_root() -> Path:
    """``$FLEXLORA_CACHE``, else ``$XDG_CACHE_HOME/flexlora``, else ``~/.cache/flexlora``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "flexlora"


def ensure_ni_v1(source: str | Path | None = None, cache: Path | None = None) -> Path:
    """The cached folder of v1 task files, filled at first use.

    ``source`` (else ``$FLEXLORA_BIGBENCH_SDIST``) is the bigbench tar.gz or an unpacked copy
    of it; with neither, the sdist is downloaded from PyPI with pip.
    """
    target = (cache or cache_root()) / NI_V1_DIRNAME
    if (target / MANIFEST).is_file():
        return target
    source = source or os.environ.get(ENV_SDIST) or None
    log.info("Natural Instructions v1 is not in the cache yet; filling %s (once)", target)
    start = time.perf_counter()
    if source is not None:
        count = _fill_from(Path(source).expanduser(), target)
    else:
        with tempfile.TemporaryDirectory(prefix="flexlora-bigbench-") as tmp:
            tarball = download_sdist(Path(tmp))
            count = extract_ni_v1(tarball, target)
        log.info("deleted the downloaded sdist")
    log.info("cached %d task files in %s (%.1f s)", count, target, time.perf_counter() - start)
    return target


def _fill_from(source: Path, target: Path) -> int:
    if source.is_dir():
        return copy_ni_v1_folder(source, target)
    if source.is_file():
        return extract_ni_v1(source, target)
    raise DataError(source, f"no such file or folder (from the option or ${ENV_SDIST})")


def download_sdist(folder: Path) -> Path:
    """``pip download --no-deps bigbench==1.0.0`` into ``folder``; the tar.gz path."""
    log.info(
        "downloading the %s sdist (~358 MB) from PyPI with pip; to skip this, set $%s to a "
        "downloaded bigbench-1.0.0.tar.gz",
        SDIST_REQUIREMENT,
        ENV_SDIST,
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SDIST_REQUIREMENT]
    cmd += ["--disable-pip-version-check", "-d", str(folder)]
    # pip's own progress bar goes to stderr: stdout stays for the command's output
    result = subprocess.run(cmd, check=False, stdout=_stderr_fd())
    if result.returncode != 0:
        raise DataError(
            SDIST_REQUIREMENT,
            f"pip download failed (exit {result.returncode}); offline, download "
            f"bigbench-1.0.0.tar.gz elsewhere and set ${ENV_SDIST} to it",
        )
    found = sorted(folder.glob("bigbench-*.tar.gz"))
    if not found:
        raise DataError(folder, "pip download finished but left no bigbench-*.tar.gz")
    return found[0]


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr (notebook, capture)
        return None


class _Progress(io.RawIOBase):
    """A read-only file wrapper that advances a byte progress bar."""

    def __init__(self, raw: io.BufferedReader, bar: tqdm) -> None:
        self._raw, self._bar = raw, bar

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        self._bar.update(n)
        return n


def extract_ni_v1(tarball: Path, target: Path) -> int:
    """Stream ``tarball`` once and copy its natural_instructions task files into ``target``."""
    tarball = Path(tarball)
    files: set[str] = set()

    def fill(tmp: Path) -> None:
        size = tarball.stat().st_size
        bar = tqdm(total=size, unit="B", unit_scale=True, desc="bigbench sdist", disable=None)
        try:
            with (
                open(tarball, "rb") as raw,
                tarfile.open(
                    fileobj=io.BufferedReader(_Progress(raw, bar), 1 << 20), mode="r|*"
                ) as tar,
            ):
                for member in tar:
                    m = _MEMBER.search(member.name)
                    if m is None or not member.isfile():
                        continue
                    task = m.group(1)
                    if task in files:
                        raise DataError(tarball, f"{task}/task.json appears twice")
                    src = tar.extractfile(member)
                    assert src is not None  # a regular file
                    (tmp / task).mkdir()
                    with open(tmp / task / "task.json", "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    files.add(task)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(tarball, f"cannot read the archive: {exc}") from exc
        finally:
            bar.close()
        if not files:
            raise DataError(tarball, "no natural_instructions/subtask*/task.json inside")

    _atomic_fill(target, fill, str(tarball))
    return len(files)


def copy_ni_v1_folder(folder: Path, target: Path) -> int:
    """Copy the task files of an unpacked sdist (or its natural_instructions folder)."""
    paths = list(folder.glob("subtask*/task.json")) or list(
        folder.glob("**/natural_instructions/subtask*/task.json")
    )
    found = {p.parent.name: p for p in paths if _FOLDER_MEMBER.match(p.parent.name)}
    if not found:
        raise DataError(folder, "no natural_instructions subtask*/task.json under this folder")

    def fill(tmp: Path) -> None:
        for task, path in sorted(found.items()):
            (tmp / task).mkdir()
            shutil.copyfile(path, tmp / task / "task.json")

    _atomic_fill(target, fill, str(folder))
    return len(found)


def _atomic_fill(target: Path, fill: Callable[[Path], None], origin: str) -> None:
    """Run ``fill(tmp)`` in a sibling temp folder, write the manifest, rename onto ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary readable data
        fill(tmp)
        tasks = sorted(p.name for p in tmp.iterdir())
        manifest = {"source": origin, "requirement": SDIST_REQUIREMENT, "tasks": tasks}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if target.exists():  # an incomplete leftover (no manifest) or a concurrent fill
            if (target / MANIFEST).is_file():
                return
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
