"""Client training throughput against a bare PEFT + torch loop, and aggregation's share of a round.

Part 1 trains the same model on the same batches twice per repetition, alternating: once with
flexlora's ``ClientWorker`` (adapter slots, lazy tokenization, our loop) and once with a bare
loop (``get_peft_model`` + AdamW + ``model(**batch).loss.backward()``). It prints tokens per
second of each and the ratio (goal: ours >= 0.9x bare).

Part 2 runs real rounds of the simulator's server step on the same model (clients of the
paper's mixed rank types) and prints the share of round time spent in aggregation (goal <= 2 %).

    .venv/bin/python benchmarks/training.py               # SmolLM2-135M (the offline default)
    .venv/bin/python benchmarks/training.py --model tiny-llama --steps 4 --reps 2   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from flexlora.config import load_config
from flexlora.data.types import Example
from flexlora.server import Coordinator
from flexlora.training.client import collate, example_order
from flexlora.training.model import load_base_model, target_linear_modules
from flexlora.training.worker import ClientWorker, LazyTokenized

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
    args = p.parse_args()
    part1(args)
    if not args.skip_round:
        part2(args)


if __name__ == "__main__":
    main()
