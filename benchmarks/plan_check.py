"""`flexlora plan`'s client estimate against the measured peak of one client's training.

Loads the configured base model, builds the client worker (one adapter slot per rank type, as
the simulator does), trains one client of the chosen rank type for a few steps on synthetic
examples that fill ``train.cutoff_len`` exactly, and measures the peak: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the peak resident set size sampled every
millisecond during training, less the resident size before the model was loaded (what the
interpreter and libraries take). It prints both next to the estimate and their ratio.

    .venv/bin/python benchmarks/plan_check.py                      # SmolLM2-135M, rank 200
    .venv/bin/python benchmarks/plan_check.py --set model.name="'tiny-llama'" --steps 2
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from flexlora.config import load_config
from flexlora.data.types import Example
from flexlora.models import load_model, model_source, target_linear_modules
from flexlora.plan import client_memory, model_shape
from flexlora.schedule import module_ranks
from flexlora.training.worker import ClientWorker
from flexlora.types import LoRAFactors

MiB = 2**20


class PeakRSS:
    """The largest resident set size seen by a sampling thread while the block runs."""

    def __init__(self, every_s: float = 0.001) -> None:
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def long_examples(n: int, cutoff: int) -> list[Example]:
    """Examples longer than ``cutoff`` tokens for any tokenizer: every batch is cutoff long."""
    words = " ".join(f"w{i % 97} item{i % 13}" for i in range(cutoff * 2))
    return [
        Example(
            instruction=f"Repeat {k}", input=words, output=words, category="c", task="t", id=str(k)
        )
        for k in range(n)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=None, help="TOML config (default: defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    parser.add_argument("--rank-type", default=None, help="default: the largest type")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (>= 2: Adam state)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"train.local_steps={args.steps}", *args.set])
    shape = model_shape(cfg.model.name, list(cfg.lora.target_modules))
    estimates = {c.rank_type: c for c in client_memory(shape, cfg)}
    types = cfg.federation.rank_types
    rank_type = args.rank_type or max(types, key=lambda t: (sum(types[t]), t))
    cuda = cfg.model.device.startswith("cuda") or (
        cfg.model.device == "auto" and torch.cuda.is_available()
    )

    if cfg.model.name.strip().lower() != "tiny-llama":
        model_source(cfg.model.name)  # a GGUF is converted into the cache first, unmeasured
    base_rss = psutil.Process().memory_info().rss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        model, tokenizer = load_model(cfg.model)
        shapes = target_linear_modules(model, cfg.lora.target_modules)
        slots = {t: module_ranks(list(shapes), r, cfg.lora.ffn_modules) for t, r in types.items()}
        worker = ClientWorker(model, tokenizer, cfg.lora, slots, cfg.train)
        gen = torch.Generator().manual_seed(0)
        start = {
            name: LoRAFactors(
                A=torch.randn(slots[rank_type][name], n, generator=gen) * 0.01,  # (r, n)
                B=torch.zeros(m, slots[rank_type][name]),  # (m, r)
                alpha=cfg.lora.alpha,
                use_rslora=cfg.lora.use_rslora,
            )
            for name, (m, n) in shapes.items()
        }
        needed = cfg.train.batch_size * cfg.train.grad_accum * args.steps
        examples = long_examples(needed, cfg.train.cutoff_len)
        _update, result = worker.train("c0", rank_type, start, examples, seed=0)
    seconds = time.perf_counter() - t0
    est = estimates[rank_type]
    predicted = est.total(all_slots=True)
    if cuda:
        measured, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        measured, how = peak.peak - base_rss, "peak RSS - RSS before loading"
    print(
        f"model {cfg.model.name} ({cfg.model.quantization}, dtype {cfg.model.dtype}), rank "
        f"type {rank_type}, batch {cfg.train.batch_size} x {cfg.train.cutoff_len} tokens, "
        f"{result.steps} steps ({result.tokens} tokens) in {seconds:.1f} s, gradient "
        f"checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}"
    )
    print(
        f"estimate (flexlora plan, all {len(types)} slots): {predicted / MiB:,.1f} MiB "
        f"(base {est.base / MiB:,.1f}, adapters {(est.adapter + est.other_slots) / MiB:,.1f}, "
        f"gradients+optimizer {(est.gradients + est.optimizer) / MiB:,.1f}, activations "
        f"{(est.activations_checkpointed if est.checkpointing else est.activations) / MiB:,.1f})"
    )
    print(f"measured ({how}): {measured / MiB:,.1f} MiB")
    print(f"estimate / measured: {predicted / measured:.3f}")


if __name__ == "__main__":
    main()
