"""The FlexLoRA server step on one LLaMA-7B-shaped layer: factored SVD against the dense one.

Ten clients with ranks drawn (seeded) from {8, 30, 200} send float32 LoRA factors for the
seven linear layers of one LLaMA-7B block. For each module the server needs the thin SVD of
``ΔW = Σ_i p_i·s_i·B_i·A_i`` (p_i ∝ examples, s_i = alpha/r_i). Two paths of
``FlexLoRA(svd=...)`` are run side by side, module by module:

- ``factored``: QR of the stacked factors and an R×R SVD (R = Σ r_i); ΔW is never formed;
- ``dense``: form ΔW (m×n) one client at a time, then ``torch.linalg.svd``.

What each column measures (one fresh subprocess per module and path, so memory one run freed
cannot hide another's growth; torch keeps its default thread count):

- ``time``: wall-clock seconds of ``aggregate()`` on that module's updates (checks, weights,
  decomposition), after a small warm-up; the fastest of ``--repeat`` runs (default 3), since
  other jobs on the machine only ever add time;
- ``peak``: growth of the process's resident set during that call, MiB (Linux ``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``, minus ``VmRSS`` before; elsewhere the
  ``ru_maxrss`` growth). The clients' factors, made before, are not counted;
- ``err``: ``‖U·S·Vh − ΔW‖_F / ‖ΔW‖_F`` for everything the path keeps, ΔW formed in float64
  from the same float32 inputs;
- ``err@r``: ``‖T_r − T*_r‖_F / ‖T*_r‖_F`` at r = the largest client rank, T*_r the rank-r
  truncation of a float64 LAPACK SVD of ΔW (computed by the parent process);
- ``gap@r``: ``(σ_r − σ_{r+1}) / σ_1`` of ΔW, how well defined the rank-r truncation is;
- ``load``: the machine's 1-minute load average just before the run (on a 2-core machine
  shared with other jobs, anything above ~2 means the timings are inflated).

A second part, the **whole adapter set** (``--whole``; ``--only-whole`` skips the per-module
table): all 32 layers × 7 modules of LLaMA-7B, the same 10 clients, through the streaming
server step (``FlexLoRA(keep_rank=max client rank).start`` / ``add`` / ``result``, layer by
layer, the clients' factors made before each layer and not timed) against the old path in the
same process (``low_rank_sum_svd``: concatenated stacks, Householder QR with explicit Q, the
full R×R SVD, then the cut), with one 4096³ float32 matmul timed in the same process as the
yardstick (the goal: ≤ 40 of them, ≈ 15 s on 2 quiet cores): timed three times at the start and
once after every layer, the median of all of them (one product's time varies by tens of percent
on a shared machine). ``max err@r`` is the largest
``‖T_r − T*_r‖_F / ‖T*_r‖_F`` over the q_proj and down_proj of layer 0 and of the layer with
the largest R (a float64 LAPACK SVD of each ΔW is the reference; all would take minutes).

A third part, **server memory** (``--server-memory``): peak RSS of ``flexlora aggregate`` (a
fresh subprocess, ``ru_maxrss`` of the child) on a 2-layer LLaMA-7B slice (14 modules), clients
of rank 128 written as PEFT folders in a temporary folder, for 8, 16 and 32 clients, output
at rank 128. ``--old-src DIR`` also runs another checkout's ``src`` (e.g. from
``git archive 618803c src | tar -x -C /tmp/old``) on the same folders: before and after.

A fourth part, the **capped state of a dense sum** (``--dense-cap``): 24 clients of rank 200 on
one 4096² and one 4096×11008 module (R = 4,800: the server holds their running dense sums),
``FlexLoRA(keep_rank=200)``'s top-k route from each sum's Gram against the full dense SVD
(``keep_rank=None``), the two modules side by side as the server step runs them; seconds and
peak RSS growth of ``result()``, and the rank-200 truncations' difference.

Usage: ``.venv/bin/python benchmarks/aggregation.py [--quick] [--seed N] [--repeat N] [--whole]
[--only-whole] [--server-memory [--old-src DIR]] [--dense-cap]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# As the flexlora package does on import: sleeping OpenMP waiters, set before torch loads its
# runtime (spinning ones make both paths tens of times slower when another job shares a core).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for large tensors, as flexlora

import torch
from safetensors.torch import load_file, save_file

from flexlora.aggregation import FlexLoRA
from flexlora.lora.svd import low_rank_sum_svd
from flexlora.types import ClientUpdate, LoRAFactors

PATHS = ("factored", "dense")
GOAL_SPEEDUP = 20.0
GOAL_ERROR = 1e-4


@dataclass(frozen=True)
class Setup:
    """The layer's modules (name -> (m, n)) and the clients' rank choices."""

    name: str
    modules: dict[str, tuple[int, int]]
    clients: int
    rank_choices: tuple[int, ...]
    alpha: float = 16.0


LLAMA_7B = Setup(
    name="LLaMA-7B layer",
    modules={
        "q_proj": (4096, 4096),
        "k_proj": (4096, 4096),
        "v_proj": (4096, 4096),
        "o_proj": (4096, 4096),
        "gate_proj": (11008, 4096),
        "up_proj": (11008, 4096),
        "down_proj": (4096, 11008),
    },
    clients=10,
    rank_choices=(8, 30, 200),
)
#: --dense-cap: one square and one wide LLaMA-7B module
DENSE_CAP_SHAPES = {"q_proj": (4096, 4096), "down_proj": (4096, 11008)}
QUICK = Setup(
    name="quick smoke layer",
    modules={"q_proj": (128, 128), "down_proj": (128, 344)},
    clients=4,
    rank_choices=(2, 4, 16),
)


def client_plan(setup: Setup, seed: int) -> tuple[list[int], list[int]]:
    """Each client's rank (the same for every module) and example count, from ``seed``."""
    rng = random.Random(seed)
    ranks = [rng.choice(setup.rank_choices) for _ in range(setup.clients)]
    examples = [rng.randint(100, 1000) for _ in range(setup.clients)]
    return ranks, examples


def make_updates(setup: Setup, module: str, seed: int) -> list[ClientUpdate]:
    """Float32 client updates for one module, reproducible from (seed, client, module)."""
    m, n = setup.modules[module]
    ranks, examples = client_plan(setup, seed)
    index = list(setup.modules).index(module)
    updates = []
    for i, (r, count) in enumerate(zip(ranks, examples, strict=True)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 1_000 * i + index)
        A = torch.randn(r, n, generator=g) / math.sqrt(n)  # (r, n)
        B = torch.randn(m, r, generator=g) * 1e-2  # (m, r)
        updates.append(ClientUpdate(f"client-{i}", count, {module: LoRAFactors(A, B, setup.alpha)}))
    return updates


def reference_delta(updates: list[ClientUpdate], module: str) -> torch.Tensor:
    """ΔW in float64, one client at a time, with p_i and s_i written out."""
    total = sum(u.num_examples for u in updates)
    f0 = updates[0].factors[module]
    delta = torch.zeros(f0.shape, dtype=torch.float64)  # (m, n)
    for u in updates:
        f = u.factors[module]
        delta.addmm_(f.B.double(), f.A.double(), alpha=(u.num_examples / total) * f.scaling)
    return delta


def rel_fro(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


# --- memory ----------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> int:
    """Reset the peak-RSS mark where Linux allows it; return the baseline in bytes."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_since(baseline: int) -> int:
    hwm = _status_kib("VmHWM")
    peak = (
        hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return max(0, peak - baseline)


# --- one module, one path: run in a fresh process --------------------------------------------


def worker(spec: dict) -> None:
    """Time and measure one path on one module; save its rank-r truncation for the parent."""
    setup = QUICK if spec["quick"] else LLAMA_7B
    module, path = spec["module"], spec["path"]
    updates = make_updates(setup, module, spec["seed"])
    aggregator = FlexLoRA(svd=path)
    warm = torch.randn(64, 48)
    torch.linalg.svd(warm, full_matrices=False)
    torch.linalg.qr(warm)
    baseline = reset_peak()
    seconds, state = math.inf, None
    for _ in range(max(1, spec["repeat"])):
        state = None  # free the last result before the next run
        start = time.perf_counter()
        state = aggregator.aggregate(updates)
        seconds = min(seconds, time.perf_counter() - start)
    peak = peak_since(baseline)
    assert state is not None
    d = state[module]
    err_full = rel_fro(d.dense(torch.float64), reference_delta(updates, module))
    r = spec["r"]
    save_file({"US": (d.U[:, :r] * d.S[:r]).contiguous(), "Vh": d.Vh[:r].contiguous()}, spec["out"])
    row = {"seconds": seconds, "peak": peak, "err_full": err_full, "k": d.rank}
    print(json.dumps(row))


def run_worker(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {spec['module']}/{spec['path']} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the parent: side by side, module by module ----------------------------------------------


def fmt_mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke version (seconds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of ranks, counts and factors")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="time each path N times and keep the fastest (default 3; 1 with --quick)",
    )
    parser.add_argument("--whole", action="store_true", help="also the whole 7B adapter set")
    parser.add_argument("--only-whole", action="store_true", help="only the whole adapter set")
    parser.add_argument("--server-memory", action="store_true", help="peak RSS of aggregate")
    parser.add_argument(
        "--dense-cap", action="store_true", help="only the capped state of a dense sum"
    )
    parser.add_argument("--old-src", help="another checkout's src/ to compare (--server-memory)")
    parser.add_argument(
        "--clients", default="8,16,32", help="client counts of --server-memory (comma-separated)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.server_memory:
        counts = tuple(int(c) for c in args.clients.split(","))
        return server_memory(args.quick, counts, args.old_src)
    if args.dense_cap:
        return dense_cap(args.quick, args.seed)
    if args.only_whole:
        return whole_set(args.quick, args.seed)
    status = per_module(args)
    if args.whole or args.quick:
        whole_set(args.quick, args.seed)
    if args.quick:
        status = max(status, dense_cap(args.quick, args.seed))
    return status


def old_path(updates: list[ClientUpdate], module: str, keep: int) -> tuple:
    """The server step before streaming: stacks concatenated, QR with explicit Q, full SVD."""
    total = sum(u.num_examples for u in updates)
    fs = [u.factors[module] for u in updates]
    U, S, Vh = low_rank_sum_svd(
        [f.B for f in fs],
        [f.A for f in fs],
        [u.num_examples / total * f.scaling for u, f in zip(updates, fs, strict=True)],
    )
    return U[:, :keep], S[:keep], Vh[:keep]


def whole_set(quick: bool, seed: int) -> int:
    """Every module of every layer: new streaming path vs the old one, in this process."""
    setup = QUICK if quick else LLAMA_7B
    layers = 2 if quick else 32
    ranks, _ = client_plan(setup, seed)
    plans = [client_plan(setup, seed + 7919 * layer)[0] for layer in range(layers)]
    keep = max(max(p) for p in plans)  # the largest rank any client receives, in any layer
    n0 = 512 if quick else 4096
    a, b = torch.randn(n0, n0), torch.randn(n0, n0)
    a @ b
    samples: list[float] = []

    def yardstick() -> None:
        start = time.perf_counter()
        a @ b
        samples.append(time.perf_counter() - start)

    for _ in range(3):
        yardstick()
    # one-off costs (SciPy's LAPACK and threadpoolctl's library scan) out of the timing
    warm = {m: make_updates(QUICK, m, seed) for m in QUICK.modules}
    FlexLoRA(keep_rank=4).aggregate(
        [
            ClientUpdate(u.client_id, u.num_examples, {m: warm[m][i].factors[m] for m in warm})
            for i, u in enumerate(warm["q_proj"])
        ]
    )
    totals = [sum(p) for p in plans]
    print(
        f"# whole adapter set: {layers} layers x {len(setup.modules)} modules, "
        f"{setup.clients} clients, ranks drawn per layer from {setup.rank_choices} (layer 0: "
        f"{ranks}; R = {min(totals)}-{max(totals)}), keep_rank {keep}; "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
        f"one {n0}^3 float32 matmul timed 3 times now and once after each layer"
    )
    times = {"new": 0.0, "old": 0.0}
    peaks = {"new": 0, "old": 0}
    worst = 0.0
    checked = {0, max(range(layers), key=lambda i: totals[i])}  # also the largest R = Σ r_i
    for layer in range(layers):
        per_layer = {m: make_updates(setup, m, seed + 7919 * layer) for m in setup.modules}
        for path in ("new", "old"):
            baseline = reset_peak()
            t0 = time.perf_counter()
            if path == "new":
                agg = FlexLoRA(keep_rank=keep)
                acc = agg.start(setup.modules)
                for i in range(setup.clients):
                    acc.add(
                        ClientUpdate(
                            f"client-{i}",
                            per_layer[next(iter(setup.modules))][i].num_examples,
                            {m: per_layer[m][i].factors[m] for m in setup.modules},
                        )
                    )
                state = acc.result()
                out = {m: (state[m].U, state[m].S, state[m].Vh) for m in setup.modules}
            else:
                out = {m: old_path(per_layer[m], m, keep) for m in setup.modules}
            times[path] += time.perf_counter() - t0
            peaks[path] = max(peaks[path], peak_since(baseline))
            if layer in checked and path == "new":
                for m in ("q_proj", "down_proj"):  # one square and one wide shape
                    delta = reference_delta(per_layer[m], m)  # (m, n) float64
                    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                    best = (U[:, :keep] * S[:keep]) @ Vh[:keep]
                    Un, Sn, Vhn = out[m]
                    ours = (Un.double() * Sn.double()) @ Vhn.double()
                    worst = max(worst, rel_fro(ours, best))
                    del delta, U, Vh, best, ours
            del out
        del per_layer
        yardstick()  # the machine's speed through the run, not only at its start
    # one product's time varies by tens of percent on a shared machine (1.0-1.8 s seen in one
    # run): the yardstick is the median of every sample taken through the run
    matmul = statistics.median(samples)
    print(
        f"# {n0}^3 float32 matmul over {len(samples)} samples: min {min(samples):.3f} s, "
        f"median {matmul:.3f} s, max {max(samples):.3f} s"
    )
    budget = 40 * matmul
    print(f"{'whole-set':<10} {'path':>6} {'time s':>8} {'x matmul':>9} {'peak MiB':>9}")
    for path in ("new", "old"):
        print(
            f"{'whole-set':<10} {path:>6} {times[path]:>8.2f} {times[path] / matmul:>9.1f} "
            f"{fmt_mib(peaks[path]):>9}"
        )
    print(
        f"whole set: new path {times['old'] / times['new']:.1f}x faster than the old one; "
        f"max err@{keep} (q/down of layers {sorted(checked)}, R = "
        f"{', '.join(str(totals[i]) for i in sorted(checked))}, vs float64 dense SVD) {worst:.2e}; "
        f"load average at the end {os.getloadavg()[0]:.2f}"
    )
    met = times["new"] <= budget and worst <= GOAL_ERROR
    verdict = "not judged in --quick mode" if quick else ("met" if met else "NOT met")
    print(f"goal (<= 40 matmuls = {budget:.1f} s, err <= {GOAL_ERROR:g}): {verdict}")
    return 0


def dense_cap(quick: bool, seed: int) -> int:
    """A capped state of a dense sum, two modules side by side as the server step runs them:
    the top-k route from the sum's Gram (``new``: ``FlexLoRA(keep_rank=200)``) against the
    full dense SVD (``old``: what it ran before, and what ``keep_rank = all`` runs)."""
    shapes = {"q_proj": (96, 96), "down_proj": (96, 200)} if quick else DENSE_CAP_SHAPES
    clients, rank, keep = (6, 16, 8) if quick else (24, 200, 200)
    updates = []
    g = torch.Generator().manual_seed(seed)
    for i in range(clients):
        factors = {}
        for name, (m, n) in shapes.items():
            A = torch.randn(rank, n, generator=g) / math.sqrt(n)  # (rank, n)
            B = torch.randn(m, rank, generator=g) * 1e-2  # (m, rank)
            factors[name] = LoRAFactors(A, B, 16.0)
        updates.append(ClientUpdate(f"client-{i}", 100 + 37 * i, factors))
    print(
        f"# capped dense sum: {clients} clients of rank {rank} (R = {clients * rank}, past the "
        f"dense switch), modules {shapes}, keep_rank {keep}; {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    states, times, peaks = {}, {}, {}
    for path, cap in (("new", keep), ("old", None)):
        acc = FlexLoRA(keep_rank=cap).start(shapes)
        for u in updates:
            acc.add(u)
        assert not any(m.stacked for m in acc.modules.values())  # type: ignore[attr-defined]
        baseline = reset_peak()
        start = time.perf_counter()
        states[path] = acc.result()
        times[path] = time.perf_counter() - start
        peaks[path] = peak_since(baseline)
        del acc
    worst = 0.0
    for name in shapes:
        new, old = states["new"][name], states["old"][name]
        ours = (new.U.double() * new.S.double()) @ new.Vh.double()
        want = (old.U[:, :keep].double() * old.S[:keep].double()) @ old.Vh[:keep].double()
        worst = max(worst, rel_fro(ours, want))
    print(f"{'dense-cap':<10} {'path':>6} {'time s':>8} {'peak MiB':>9}")
    for path in ("new", "old"):
        print(f"{'dense-cap':<10} {path:>6} {times[path]:>8.2f} {fmt_mib(peaks[path]):>9}")
    print(
        f"dense cap: new path {times['old'] / times['new']:.1f}x faster; max err@{keep} against "
        f"the full SVD's first {keep} triplets {worst:.2e}; load average at the end "
        f"{os.getloadavg()[0]:.2f}"
    )
    return 0 if worst <= GOAL_ERROR else 1


def write_clients(setup: Setup, tmp: Path, count: int, rank: int, layers: int) -> list[str]:
    """``count`` PEFT adapter folders of ``rank`` on ``layers`` layers of ``setup``'s modules."""
    from flexlora.lora.peft_io import write_adapter

    folders = []
    for i in range(count):
        g = torch.Generator().manual_seed(1_000 + i)
        factors = {}
        for layer in range(layers):
            for module, (m, n) in setup.modules.items():
                name = f"model.layers.{layer}.{module}"
                A = torch.randn(rank, n, generator=g) / math.sqrt(n)  # (r, n)
                B = torch.randn(m, rank, generator=g) * 1e-2  # (m, r)
                factors[name] = LoRAFactors(A, B, setup.alpha)
        folders.append(str(write_adapter(tmp / f"client-{i}", factors)))
        del factors
    return folders


def aggregate_peak(folders: list[str], rank: int, out: Path, src: str | None) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one ``flexlora aggregate`` subprocess."""
    code = (
        "import resource, sys, time; t = time.perf_counter(); "
        "from flexlora.cli import main; rc = main(sys.argv[1:]); "
        "print('SECONDS', time.perf_counter() - t); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024); sys.exit(rc)"
    )
    argv = ["aggregate", *[a for f in folders for a in ("--client", f)]]
    argv += ["--rank", str(rank), "--out", str(out)]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"flexlora aggregate failed:\n{done.stderr[-2000:]}")
    values = dict(line.split() for line in done.stdout.splitlines() if line[:4] in ("SECO", "PEAK"))
    return float(values["SECONDS"]), int(values["PEAK"])


def server_memory(quick: bool, counts: tuple[int, ...], old_src: str | None) -> int:
    """Peak RSS of ``flexlora aggregate`` for 8, 16 and 32 clients (new, and old if given)."""
    setup = QUICK if quick else LLAMA_7B
    counts, rank = ((2, 4) if quick else counts), (4 if quick else 128)
    print(
        f"# flexlora aggregate, {setup.name} x 2 layers ({2 * len(setup.modules)} modules), "
        f"rank-{rank} clients, output rank {rank}; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'memory':<8} {'clients':>7} {'path':>5} {'seconds':>8} {'peak MiB':>9} {'input MiB':>9}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_clients(setup, Path(tmp), max(counts), rank, layers=2)
        size = Path(folders[0], "adapter_model.safetensors").stat().st_size
        for count in counts:
            paths = [("new", None)] + ([("old", old_src)] if old_src else [])
            for label, src in paths:
                out = Path(tmp) / f"out-{label}-{count}"
                seconds, peak = aggregate_peak(folders[:count], rank, out, src)
                print(
                    f"{'memory':<8} {count:>7} {label:>5} {seconds:>8.1f} {fmt_mib(peak):>9} "
                    f"{fmt_mib(size * count):>9}"
                )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


def per_module(args: argparse.Namespace) -> int:
    """The per-module table (one fresh process per module and path)."""
    setup = QUICK if args.quick else LLAMA_7B
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    ranks, examples = client_plan(setup, args.seed)
    r = max(ranks)
    print(f"# FlexLoRA server step, {setup.name}: {setup.clients} clients, float32")
    print(f"# client ranks {ranks} (R = {sum(ranks)}), examples {examples}, alpha {setup.alpha:g}")
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
        f"time = fastest of {repeat}; "
        f"errors at r = {r} (largest client rank)"
    )
    header = (
        f"{'module':<10} {'m x n':>11} {'path':>9} {'time s':>8} {'peak MiB':>9} "
        f"{'err':>9} {'err@r':>9} {'gap@r':>8} {'load':>5}"
    )
    print(header)
    print("-" * len(header))
    totals = {p: {"seconds": 0.0, "peak": 0, "err_full": 0.0, "err_r": 0.0} for p in PATHS}
    with tempfile.TemporaryDirectory() as tmp:
        for module, (m, n) in setup.modules.items():
            rows = {}
            for path in PATHS:
                spec = {
                    "quick": args.quick,
                    "module": module,
                    "path": path,
                    "seed": args.seed,
                    "repeat": repeat,
                    "r": r,
                    "out": str(Path(tmp) / f"{module}-{path}.safetensors"),
                }
                load = os.getloadavg()[0]
                rows[path] = run_worker(spec) | {"load": load}
            delta = reference_delta(make_updates(setup, module, args.seed), module)  # (m, n)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            best = (U[:, :r] * S[:r]) @ Vh[:r]  # (m, n), float64 rank-r truncation
            gap = float((S[r - 1] - S[r]) / S[0]) if r < S.shape[0] else 1.0
            del U, Vh, delta
            for path in PATHS:
                parts = load_file(str(Path(tmp) / f"{module}-{path}.safetensors"))
                ours = parts["US"].double() @ parts["Vh"].double()  # (m, n)
                row = rows[path]
                row["err_r"] = rel_fro(ours, best)
                print(
                    f"{module:<10} {f'{m}x{n}':>11} {path:>9} {row['seconds']:>8.3f} "
                    f"{fmt_mib(row['peak']):>9} {row['err_full']:>9.2e} {row['err_r']:>9.2e} "
                    f"{gap:>8.1e} {row['load']:>5.2f}"
                )
                t = totals[path]
                t["seconds"] += row["seconds"]
                t["peak"] = max(t["peak"], row["peak"])
                t["err_full"] = max(t["err_full"], row["err_full"])
                t["err_r"] = max(t["err_r"], row["err_r"])
            ratio = rows["dense"]["seconds"] / rows["factored"]["seconds"]
            print(f"{'':<10} {'':>11} {'speedup':>9} {ratio:>7.1f}x")
    print("-" * len(header))
    for path in PATHS:
        t = totals[path]
        print(
            f"{'total':<10} {'(max)':>11} {path:>9} {t['seconds']:>8.3f} {fmt_mib(t['peak']):>9} "
            f"{t['err_full']:>9.2e} {t['err_r']:>9.2e}"
        )
    speedup = totals["dense"]["seconds"] / totals["factored"]["seconds"]
    worst = max(totals["factored"]["err_full"], totals["factored"]["err_r"])
    print(f"speedup (dense time / factored time, whole layer): {speedup:.1f}x")
    print(
        f"load average at the end: {os.getloadavg()[0]:.2f} (other work on the machine skews times)"
    )
    verdict = "met" if speedup >= GOAL_SPEEDUP and worst <= GOAL_ERROR else "NOT met"
    if args.quick:
        verdict = "not judged in --quick mode (the sizes are too small to time)"
    print(
        f"goal (factored >= {GOAL_SPEEDUP:g}x faster, error <= {GOAL_ERROR:g}): {verdict}; "
        f"factored worst error {worst:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
