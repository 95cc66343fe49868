"""One federated round of a >= 1B-parameter LLaMA-shaped model on a CUDA GPU, bf16 and 4-bit.

Nothing is downloaded: the model is built from a config with random bf16 weights (hidden 2048,
18 layers, intermediate 5632, vocab 32000: 1.07 B parameters) and the data is synthetic. Four
clients of mixed rank types (8, 30, 30/200, 200) each train a few steps through flexlora's own
``Coordinator`` and ``ClientWorker``, then the server step aggregates them. The round runs
twice: on a bf16 base and on a 4-bit NF4 base (bitsandbytes; skipped with a message if it does
not import). It prints tokens/s and peak GPU memory per client
(``torch.cuda.max_memory_allocated``, reset per client) and the server step's seconds. Then it
runs ``gpu_throughput.py``'s comparison: K = 1 and 8 SmolLM2-shaped clients trained one at a
time and together in one batched pass (issue 12).

    python benchmarks/gpu_check.py            # CUDA; target < 5 minutes on one H200
    python benchmarks/gpu_check.py --tiny     # the same code path on the CPU, a tiny model
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flexlora.config import RunConfig, load_config
from flexlora.data.types import Example
from flexlora.models import build_byte_tokenizer, load_model, target_linear_modules
from flexlora.server import Coordinator
from flexlora.training.worker import ClientWorker

RANK_TYPES = {"8": [8, 8], "30": [30, 30], "30-200": [30, 200], "200": [200, 200]}
BIG = {
    "hidden_size": 2048,
    "num_hidden_layers": 18,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 260,
}


def build_model(shape: dict[str, int], folder: str) -> None:
    """A LLaMA of the given shape with random bf16 weights, saved with a byte tokenizer."""
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        **shape,
        max_position_embeddings=2048,
        dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters, {shape}")


def examples(n: int, length: int) -> list[Example]:
    words = " ".join(f"w{i % 89}" for i in range(length))
    return [Example(f"Repeat {k}", words, words, "c", "t", str(k)) for k in range(n)]


def run_config(args: argparse.Namespace, quantization: str) -> RunConfig:
    return load_config(
        values={
            "model": {
                "dtype": "bfloat16",
                "quantization": quantization,
                "bnb_4bit_compute_dtype": "bfloat16",
                "device": args.device,
            },
            "lora": {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
            "train": {
                "local_steps": args.steps,
                "batch_size": args.batch,
                "cutoff_len": args.cutoff,
                "gradient_checkpointing": True,
                "lr": 1e-4,
            },
            "federation": {
                "rounds": 1,
                "clients_per_round": 4,
                "distribution": "explicit",
                "client_types": list(RANK_TYPES),
                "rank_types": RANK_TYPES,
            },
        }
    )


def one_round(folder: str, cfg: RunConfig) -> list[dict[str, Any]]:
    """One round of four clients, one per rank type; a row per client and one for the server."""
    cuda = torch.device(cfg.model.device).type == "cuda"
    mc = replace(cfg.model, name=folder)
    model, tokenizer = load_model(mc)  # every [model] setting, as a run loads it
    shapes = target_linear_modules(model, cfg.lora.target_modules)
    clients = {f"client-{t}": t for t in RANK_TYPES}
    server = Coordinator(cfg, shapes, clients)
    worker = ClientWorker(model, tokenizer, cfg.lora, server.slot_ranks, cfg.train)
    state = server.initial_state()
    rows, updates = [], []
    data = examples(cfg.train.batch_size * cfg.train.local_steps, cfg.train.cutoff_len)
    for cid in server.sample(1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = server.start_factors(state, cid, 1)
        update, result = worker.train(
            cid, clients[cid], start, data, seed=server.client_seed(1, cid)
        )
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        rows.append(
            {
                "what": f"{cid} ({mc.quantization})",
                "tokens/s": result.tokens / result.seconds,
                "peak GiB": peak,
                "seconds": result.seconds,
            }
        )
        updates.append(update)
    t0 = time.perf_counter()
    server.aggregate(state, 1, list(clients), updates)
    rows.append(
        {
            "what": f"server step ({mc.quantization})",
            "tokens/s": float("nan"),
            "peak GiB": float("nan"),
            "seconds": time.perf_counter() - t0,
        }
    )
    del worker, model
    if cuda:
        torch.cuda.empty_cache()
    return rows


# ---- issue 12 (throughput): K clients in one batched pass vs one at a time --------------------
def batched_comparison(tiny: bool) -> int:
    """Run benchmarks/gpu_throughput.py in this process: K = 1 and 8 SmolLM2-shaped clients.

    On the GPU: the 30-layer SmolLM2-135M shapes, bf16 autocast, 8 steps of 4 x 128 tokens
    (goal >= 3x for K = 8). With ``--tiny``: 2 layers on the CPU, only to keep the path alive.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_throughput

    if tiny:
        argv = ["--device", "cpu", "--layers", "2", "--ks", "1", "2", "--steps", "1"]
        argv += ["--batch", "2", "--cutoff", "16", "--reps", "1"]
    else:
        argv = ["--ks", "1", "8", "--precision", "bf16", "--reps", "2"]
    print("\n== batched clients (train.parallel_clients): K together vs one at a time")
    return gpu_throughput.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (tests)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        shape, args.device, args.batch, args.cutoff = TINY, "cpu", 2, 32
        args.steps = args.steps or 1
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to do (try --tiny on a CPU)")
        return 0
    else:
        shape, args.device, args.batch, args.cutoff = BIG, "cuda", 4, 512
        args.steps = args.steps or 4
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flexlora-gpu-check-") as folder:
        build_model(shape, folder)
        rows += one_round(folder, run_config(args, "none"))
        if importlib.util.find_spec("bitsandbytes") is None:
            print("4-bit round skipped: bitsandbytes does not import")
        else:
            rows += one_round(folder, run_config(args, "4bit"))
    print("| what | tokens/s | peak GPU GiB | seconds |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['tokens/s']:,.0f} | {r['peak GiB']:.2f} | {r['seconds']:.2f} |")
    batched_comparison(args.tiny)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
