"""Batched clients on a CUDA GPU: K = 1 vs K clients together on a SmolLM2-135M-shaped model.

The model is built from a LLaMA config with SmolLM2-135M's shapes (30 layers, hidden 576,
9 heads / 3 KV heads, intermediate 1536, vocabulary 49152, tied embeddings) and random
weights, so nothing is downloaded; the examples are random token ids of full length. It
trains the same K clients one after another (``train_local``, today's path) and together in
one batched pass (``train_many``, ``train.parallel_clients = K``), and prints tokens per second
of each and the ratio (goal: >= 3x for K = 8). Without CUDA it says so and exits cleanly.

    .venv/bin/python benchmarks/gpu_throughput.py                 # K = 8, fp32
    .venv/bin/python benchmarks/gpu_throughput.py --ks 1 4 8 --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from flexlora.config import TrainConfig
from flexlora.training.adapters import AdapterHost
from flexlora.training.batched import ClientJob, train_many
from flexlora.training.client import TokenizedExample, train_local

SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def random_examples(n: int, length: int, vocab: int, seed: int) -> list[TokenizedExample]:
    """Full-length random token sequences, the response (second half) as labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        half = length // 2
        out.append(TokenizedExample(ids, [-100] * half + ids[half:]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[8], help="clients trained together")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script only")
    p.add_argument("--layers", type=int, default=30, help="fewer layers for a smoke test")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: nothing measured (this benchmark needs a GPU)")
        return 0
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {**SMOLLM2_135M, "num_hidden_layers": args.layers}
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(device).requires_grad_(False)
    host = AdapterHost(model, TARGETS, {"rank": dict.fromkeys(_targets(model), args.rank)}, 16.0)
    cfg = TrainConfig(
        local_steps=args.steps,
        batch_size=args.batch,
        cutoff_len=args.cutoff,
        precision=args.precision,
    )
    start = host.read("rank")
    k_max = max(args.ks)
    data = [random_examples(args.steps * args.batch, args.cutoff, 49152, c) for c in range(k_max)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    print(
        f"{name}: SmolLM2-135M shapes ({args.layers} layers), random weights, rank "
        f"{args.rank} on {TARGETS}, {args.steps} steps of {args.batch} x {args.cutoff} tokens, "
        f"{args.precision}, {args.reps} reps"
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{'K':>3}{'one at a time tok/s':>22}{'together tok/s':>18}{'ratio':>8}")
    for k in args.ks:
        jobs = [ClientJob(f"c{c}", "rank", start, data[c], seed=c) for c in range(k)]
        seq, bat = [], []
        for rep in range(args.reps + 1):  # the first repetition warms up both
            sync()
            t0 = time.perf_counter()
            tokens = 0
            for j in jobs:
                r = train_local(host, "rank", dict(j.start), j.examples, cfg, j.seed, pad_id=0)
                tokens += r.tokens
            sync()
            t_seq = time.perf_counter() - t0
            t0 = time.perf_counter()
            train_many(host, jobs, cfg, pad_id=0)
            sync()
            t_bat = time.perf_counter() - t0
            if rep:
                seq.append(tokens / t_seq)
                bat.append(tokens / t_bat)
        s, b = statistics.median(seq), statistics.median(bat)
        print(f"{k:>3}{s:>22.0f}{b:>18.0f}{b / s:>7.2f}x")
    print("goal: >= 3x for K=8")
    return 0


def _targets(model: torch.nn.Module) -> list[str]:
    from flexlora.models import target_linear_modules

    return list(target_linear_modules(model, TARGETS))


if __name__ == "__main__":
    sys.exit(main())
