"""A real Flower deployment on 127.0.0.1: SuperLink + two SuperNodes, TLS and node auth.

Every process is started here (each in its own session), with HOME / FLWR_HOME in a
temporary folder, and stopped by PID with all its descendants when the test ends, passed
or failed. The run's outputs must equal the in-process simulator's on the same job.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from flexlora.config import RunConfig
from flexlora.flower.settings import to_run_config
from flexlora.simulation.runner import FederatedRun
from tests.flower_helpers import (
    assert_rows_match,
    assert_same_outputs,
    read_rows,
    strip_timings,
    toy_config,
    write_tasks,
)

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower-app"
BIN = Path(sys.executable).parent  # flwr's commands live next to this interpreter
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (BIN / "flower-superlink").exists(),
    reason="needs Linux and flwr's commands next to the interpreter",
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _parents() -> dict[int, int]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(stat.parent.name)] = int(fields[1])
    return out


def descendants(pids: set[int]) -> set[int]:
    """``pids`` and every live process below them (Flower detaches some children)."""
    parents = _parents()
    found = set(pids)
    grew = True
    while grew:
        new = {p for p, pp in parents.items() if pp in found and p not in found}
        found |= new
        grew = bool(new)
    return found


def listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket that ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, size, 4))
            ip = socket.inet_ntop(socket.AF_INET if size == 4 else socket.AF_INET6, raw)
            found.add((ip, int(hex_port, 16)))
    return found


class Processes:
    """The processes this test started; :meth:`stop` ends them and their descendants."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.logs,
            start_new_session=True,
        )
        log.close()
        self.started.append(proc)
        return proc

    def run(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """A short-lived command (flwr CLI), its own session, killed on timeout."""
        proc = self.start(f"cmd-{len(self.started)}", *args)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        out = Path(self.logs / f"cmd-{len(self.started) - 1}.log").read_text(errors="replace")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)

    def pids(self) -> set[int]:
        return descendants({p.pid for p in self.started if p.poll() is None})

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, each started session and every descendant found at first."""
        everyone = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.started:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)  # its session's group (start_new_session)
            for pid in everyone:  # children Flower started in sessions of their own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            for proc in self.started:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            everyone = {p for p in everyone if _alive(p)}
            if all(p.poll() is not None for p in self.started) and not everyone:
                return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped by its parent


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds}s")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    procs = Processes(tmp_path, env)
    try:
        yield procs
    finally:
        procs.stop()


@pytest.mark.slow
def test_superlink_and_two_supernodes_on_loopback_train_like_the_simulator(
    tmp_path: Path, processes: Processes
) -> None:
    # -- the job: 3 tasks -> 2 seen clients (one per SuperNode) and 1 held out
    tasks = write_tasks(tmp_path / "tasks.jsonl", n_tasks=3)
    job = {"federation": {"clients_per_round": 2, "client_types": ["2", "2-8"]}}
    values = to_run_config(toy_config(tmp_path / "flower", tasks, 0.3, **job))
    defaults = to_run_config(RunConfig())
    overrides = {k: v for k, v in values.items() if defaults[k] != v}  # keys the app declares
    overrides |= {"flower.num-nodes": 2, "flower.wait-nodes": 60.0, "flower.round-timeout": 120.0}
    run_config = tmp_path / "run.toml"
    run_config.write_text(tomli_w.dumps(overrides), encoding="utf-8")

    # -- TLS certificates and SuperNode keys (the script docs/flower.md uses)
    runpy.run_path(str(APP / "make_credentials.py"))["make_credentials"](tmp_path / "cred", 2)
    certs, keys = tmp_path / "cred" / "certificates", tmp_path / "cred" / "keys"
    link, *node_ports = free_ports(3)
    home = Path(processes.env["FLWR_HOME"])
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": "loopback",
                    "loopback": {
                        "address": f"127.0.0.1:{link}",
                        "root-certificates": str(certs / "ca.crt"),
                    },
                }
            }
        ),
        encoding="utf-8",
    )

    superlink = processes.start(
        "superlink",
        "flower-superlink",
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth",
        "--host", "127.0.0.1",
        "--port", str(link),
        "--disable-runtime-dependency-installation",
    )  # fmt: skip
    wait_for_port(link, superlink, 60)
    for i in (1, 2):
        done = processes.run(
            "flwr", "supernode", "register", str(keys / f"supernode-{i}.pub"), "loopback",
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout
    for i, (port, rank_type) in enumerate(zip(node_ports, ("2", "2-8"), strict=True)):
        processes.start(
            f"supernode-{i}",
            "flower-supernode",
            "--root-certificates", str(certs / "ca.crt"),
            "--superlink", f"127.0.0.1:{link}",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--auth-supernode-private-key", str(keys / f"supernode-{i + 1}"),
            "--node-config", f"partition-id={i} rank-type='{rank_type}'",
        )  # fmt: skip

    # -- two rounds of mixed-rank FlexLoRA through `flwr run`
    done = processes.run(
        "flwr", "run", str(APP), "loopback", "--run-config", str(run_config), "--stream",
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
    status = processes.run("flwr", "ls", "loopback", "--format", "json", timeout=60)
    runs = json.loads(status.stdout[status.stdout.index("{") :])["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], status.stdout

    # -- nothing of ours listens beyond the loopback interface
    sockets = listening(processes.pids())
    assert {("127.0.0.1", link), *(("127.0.0.1", p) for p in node_ports)} <= sockets
    assert {ip for ip, _ in sockets} <= LOOPBACK, sockets

    # -- what the ServerApp wrote equals the in-process simulator on the same job
    FederatedRun(toy_config(tmp_path / "sim", tasks, 0.3, **job)).run()
    rows = strip_timings(read_rows(tmp_path / "flower"))
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert sorted(rows[1]["client_types"].values()) == ["2", "2-8"]  # as the nodes declared
    assert_rows_match(rows, strip_timings(read_rows(tmp_path / "sim")))
    assert_same_outputs(tmp_path / "flower", tmp_path / "sim")
