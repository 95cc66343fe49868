"""Client training throughput against a bare PEFT + torch loop, and aggregation's share of a round.

Part 1 trains the same model on the same batches twice per repetition, alternating: once with
flexlora's ``ClientWorker`` (adapter slots, lazy tokenization, our loop) and once with a bare
loop (``get_peft_model`` + AdamW + ``model(**batch).loss.backward()``). It prints tokens per
second of each and the ratio (goal: ours >= 0.9x bare).

Part 2 runs real rounds of the simulator's server step on the same model (clients of the
paper's mixed rank types) and prints the share of round time spent in aggregation (goal <= 2 %).

    .venv/bin/python benchmarks/training.py               # SmolLM2-135M (the offline default)
    .venv/bin/python benchmarks/training.py --model tiny-llama --steps 4 --reps 2   # smoke

Part 3 (``--batched``) trains K = 1, 2, 4, 8 clients together in one batched pass
(``train.parallel_clients``) and one after another, on the same examples, and prints tokens
per second of each, the ratio and the largest relative difference of the trained factors.

    .venv/bin/python benchmarks/training.py --batched --model tiny-llama
    .venv/bin/python benchmarks/training.py --batched          # SmolLM2-135M
    .venv/bin/python benchmarks/training.py --quick            # the test's smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from flexlora.config import load_config
from flexlora.data.types import Example
from flexlora.server import Coordinator
from flexlora.training.client import collate, example_order
from flexlora.training.model import load_base_model, target_linear_modules
from flexlora.training.worker import ClientJob, ClientWorker, LazyTokenized
from flexlora.types import LoRAFactors

TEXT = (
    "the model reads a short instruction and answers it with a few words of plain english "
    "about colours animals numbers places and simple facts that anyone can check"
)
WORDS = tuple(TEXT.split())


def synthetic_examples(n: int, seed: int = 0) -> list[Example]:
    """Deterministic instruction examples of realistic, varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(20, 60, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        text = " ".join(WORDS[j] for j in idx)
        out.append(
            Example(
                "Summarise the text in a few words.",
                text,
                " ".join(text.split()[:8]),
                "summary",
                task="bench",
                id=str(i),
            )
        )
    return out


def bare_loop(model, params, batches, lr: float) -> tuple[int, float]:
    """The baseline: the plainest PEFT + torch training loop on prepared batches."""
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    tokens = 0
    t0 = time.perf_counter()
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens += int(batch["attention_mask"].sum())
    return tokens, time.perf_counter() - t0


def part1(args: argparse.Namespace) -> None:
    cfg = load_config(
        values={
            "model": {"name": args.model},
            "lora": {"target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
            "train": {
                "local_steps": args.steps,
                "batch_size": args.batch,
                "cutoff_len": args.cutoff,
                "max_grad_norm": 1.0,
            },
        }
    )
    examples = synthetic_examples(args.steps * args.batch)
    ours_model, tok = load_base_model(args.model)
    shapes = target_linear_modules(ours_model, cfg.lora.target_modules)
    slot = {m: args.rank for m in shapes}
    worker = ClientWorker(ours_model, tok, cfg.lora, {"r": slot}, cfg.train)
    # identical batches for the bare loop: the worker's own tokenization and example order
    seq = LazyTokenized(examples, worker.encode)
    order = example_order(len(examples), args.steps * args.batch, seed=1)
    batches = [
        collate([seq[i] for i in order[k : k + args.batch]], worker.pad_id)
        for k in range(0, len(order), args.batch)
    ]
    bare_model, _ = load_base_model(args.model)
    bare = get_peft_model(
        bare_model,
        LoraConfig(
            r=args.rank, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        ),
    )
    bare_params = [p for n, p in bare.named_parameters() if "lora_" in n]
    for p in bare_params:
        p.requires_grad_(True)
    start = worker.host.read("r")
    ours_tps, bare_tps = [], []
    for rep in range(args.reps + 1):  # the first repetition warms up both
        _, res = worker.train("bench", "r", start, examples, seed=1)
        tokens, secs = bare_loop(bare, bare_params, batches, cfg.train.lr)
        if rep == 0:
            continue
        ours_tps.append(res.tokens / res.seconds)
        bare_tps.append(tokens / secs)
    o, b = statistics.median(ours_tps), statistics.median(bare_tps)
    print(
        f"model={args.model} threads={torch.get_num_threads()} rank={args.rank} "
        f"steps={args.steps} batch={args.batch}x<= {args.cutoff} tokens, {args.reps} reps"
    )
    print(f"{'loop':<26}{'tokens/s (median)':>20}{'all reps':>40}")
    print(f"{'flexlora ClientWorker':<26}{o:>20.1f}{[round(x) for x in ours_tps]!s:>40}")
    print(f"{'bare PEFT + torch':<26}{b:>20.1f}{[round(x) for x in bare_tps]!s:>40}")
    print(f"ratio ours/bare: {o / b:.3f}  (goal >= 0.9)")


def part2(args: argparse.Namespace) -> None:
    cfg = load_config(
        values={
            "model": {"name": args.model},
            "train": {
                "local_steps": args.steps,
                "batch_size": args.batch,
                "cutoff_len": args.cutoff,
            },
            "federation": {"clients_per_round": args.clients, "distribution": "uniform"},
        }
    )
    model, tok = load_base_model(args.model)
    shapes = target_linear_modules(model, cfg.lora.target_modules)
    clients = [f"c{i}" for i in range(args.clients)]
    types = dict(zip(clients, ["8", "30", "30-200", "200"] * args.clients, strict=False))
    server = Coordinator(cfg, shapes, types)
    worker = ClientWorker(model, tok, cfg.lora, server.slot_ranks, cfg.train)
    examples = synthetic_examples(64)
    state = server.initial_state()
    print(
        f"\nround time split, {args.clients} clients of types {sorted(set(types.values()))}, "
        f"targets {cfg.lora.target_modules}"
    )
    print(f"{'round':<8}{'train s':>10}{'aggregate s':>14}{'aggregation share':>20}")
    for round_ in (1, 2):
        t_train = 0.0
        updates = []
        for cid in clients:
            start = server.start_factors(state, cid, round_)
            upd, res = worker.train(cid, types[cid], start, examples, seed=round_)
            t_train += res.seconds
            updates.append(upd)
        state, row = server.aggregate(state, round_, clients, updates)
        agg = row["seconds_aggregate"]
        print(f"{round_:<8}{t_train:>10.2f}{agg:>14.3f}{100 * agg / (agg + t_train):>19.2f}%")


def nonzero_start(fresh: dict[str, LoRAFactors]) -> dict[str, LoRAFactors]:
    """The slot's A with a seeded non-zero B (a client past its first round).

    From B = 0, AdamW's first steps move each entry by about lr·sign(g): entries whose gradient
    is ~0 flip sign with the last bit of a float32 sum, so the relative difference of two
    correct runs is ~1e-4 there. A non-zero start measures what the tests bound (≤ 1e-5).
    """
    g = torch.Generator().manual_seed(0)
    return {
        m: LoRAFactors(
            A=f.A,
            B=torch.randn(f.B.shape, generator=g) / f.B.shape[0] ** 0.5,  # (m, r)
            alpha=f.alpha,
            use_rslora=f.use_rslora,
        )
        for m, f in fresh.items()
    }


def batched(args: argparse.Namespace) -> None:
    """Part 3: K clients trained together (train.parallel_clients) against one at a time."""
    cfg = load_config(
        values={
            "model": {"name": args.model},
            "lora": {"dropout": 0.0},
            "train": {
                "local_steps": args.steps,
                "batch_size": args.batch,
                "cutoff_len": args.cutoff,
            },
        }
    )
    model, tok = load_base_model(args.model)
    shapes = target_linear_modules(model, cfg.lora.target_modules)
    slot = {m: args.rank for m in shapes}
    worker = ClientWorker(model, tok, cfg.lora, {"rank": slot}, cfg.train)
    start = nonzero_start(worker.host.read("rank"))
    data = [synthetic_examples(args.steps * args.batch, seed=c) for c in range(max(args.ks))]
    load = os.getloadavg()
    print(
        f"\nbatched clients: model={args.model} threads={torch.get_num_threads()} "
        f"rank={args.rank} targets={cfg.lora.target_modules} steps={args.steps} "
        f"batch={args.batch}x<={args.cutoff} tokens, {args.reps} reps; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores"
    )
    print(
        f"{'K':>3}{'one at a time tok/s':>22}{'together tok/s':>18}{'ratio':>8}{'max rel diff':>14}"
    )
    for k in args.ks:
        jobs = [ClientJob(f"c{c}", "rank", start, data[c], seed=c) for c in range(k)]
        seq_tps, bat_tps = [], []
        diff = 0.0
        for rep in range(args.reps + 1):  # the first repetition warms up both
            t0 = time.perf_counter()
            alone = [worker.train(j.client, j.slot, j.start, j.examples, j.seed) for j in jobs]
            t_seq = time.perf_counter() - t0
            t0 = time.perf_counter()
            together = worker.train_many(jobs)
            t_bat = time.perf_counter() - t0
            tokens = sum(r.tokens for _, r in alone)
            assert tokens == sum(r.tokens for _, r in together)
            if rep == 0:
                diff = max(
                    float((u2.factors[m].B - u1.factors[m].B).norm() / u1.factors[m].B.norm())
                    for (u1, _), (u2, _) in zip(alone, together, strict=True)
                    for m in u1.factors
                )
                continue
            seq_tps.append(tokens / t_seq)
            bat_tps.append(tokens / t_bat)
        s, b = statistics.median(seq_tps), statistics.median(bat_tps)
        print(f"{k:>3}{s:>22.0f}{b:>18.0f}{b / s:>7.2f}x{diff:>14.1e}")
    print("goal: >= 1.5x for K=4 on the tiny model (2 CPU cores)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--skip-round", action="store_true", help="only part 1")
    p.add_argument(
        "--batched",
        action="store_true",
        help="only part 3: K clients together (train.parallel_clients) vs one at a time",
    )
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="part 3's K values")
    p.add_argument("--quick", action="store_true", help="part 3 on tiny-llama, 2 steps, 1 rep")
    args = p.parse_args()
    if args.quick:
        args.model, args.steps, args.reps, args.ks, args.batched = "tiny-llama", 2, 1, [1, 4], True
    if args.batched:
        batched(args)
        return
    part1(args)
    if not args.skip_round:
        part2(args)


if __name__ == "__main__":
    main()
