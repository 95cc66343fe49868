"""Batched clients (train.parallel_clients): K clients trained together equal one at a time."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from flexlora.config import LoRASettings, TrainConfig, load_config
from flexlora.errors import UsageError
from flexlora.training.batched import ClientJob, train_many
from flexlora.training.model import build_tiny_llama, target_linear_modules
from flexlora.training.multi import MultiLoRALinear
from flexlora.training.stacked import StackedOptimizer, clip_per_client
from flexlora.training.worker import ClientWorker, LazyTokenized
from flexlora.types import LoRAFactors
from tests.test_checkpoint_resume import adapters, write_jsonl_job
from tests.test_faults import varied_dataset

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
#: mixed ranks per client type, and per module within a type (attention vs feed-forward)
TYPES = {"r2": (2, 2), "r4-8": (4, 8), "r8": (8, 8)}


def make_worker(train: TrainConfig, dropout: float = 0.0, dtype=torch.float32) -> ClientWorker:
    model, tok = build_tiny_llama(seed=0)
    model.to(dtype)
    shapes = target_linear_modules(model, TARGETS)
    slot_ranks = {
        slot: {m: (ra if "proj" in m and ("q_" in m or "v_" in m) else rf) for m in shapes}
        for slot, (ra, rf) in TYPES.items()
    }
    lora = LoRASettings(target_modules=TARGETS, dropout=dropout)
    return ClientWorker(model, tok, lora, slot_ranks, train)


def start_factors(worker: ClientWorker, slot: str, seed: int) -> dict[str, LoRAFactors]:
    """Non-zero A and B (so every factor gets a gradient from the first step)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (m, n) in worker.host.shapes().items():
        r = worker.host.slot_ranks[slot][name]
        A = torch.randn(r, n, generator=g) * 0.2  # (r, n)
        B = torch.randn(m, r, generator=g) * 0.2  # (m, r)
        out[name] = LoRAFactors(A=A, B=B, alpha=worker.host.alpha)
    return out


def jobs_for(worker: ClientWorker, count: int = 4) -> list[ClientJob]:
    """Clients of mixed types with 3, 5, 8, 11 examples (different local step counts)."""
    data = varied_dataset(12)
    slots = list(TYPES)
    jobs = []
    for i in range(count):
        cid = data.seen[3 * i]
        slot = slots[i % len(slots)]
        jobs.append(ClientJob(cid, slot, start_factors(worker, slot, i), data.train(cid), 50 + i))
    return jobs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_same(got: dict[str, LoRAFactors], want: dict[str, LoRAFactors], tol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].A.shape == want[name].A.shape
        assert rel(got[name].A, want[name].A) <= tol, name
        assert rel(got[name].B, want[name].B) <= tol, name


TRAIN = dict(
    local_steps=0,
    local_epochs=2.0,
    batch_size=2,
    grad_accum=2,
    lr=5e-3,
    lr_schedule="cosine",
    warmup_steps=1,
    weight_decay=0.05,
    max_grad_norm=0.05,  # far below the gradient norms: clipping is active at every step
    cutoff_len=48,
)


@pytest.mark.parametrize(
    "extra", [{}, {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05}], ids=["adamw", "sgd"]
)
def test_batched_clients_equal_one_at_a_time(extra: dict) -> None:
    worker = make_worker(TrainConfig(**{**TRAIN, **extra}))
    jobs = jobs_for(worker)
    alone = [worker.train(j.client, j.slot, j.start, j.examples, j.seed) for j in jobs]
    together = worker.train_many(jobs)
    assert len({r.steps for _, r in alone}) >= 3  # clients make different numbers of steps
    for (u1, r1), (u2, r2) in zip(alone, together, strict=True):
        assert u1.client_id == u2.client_id and u1.num_examples == u2.num_examples
        assert r1.steps == r2.steps and r1.tokens == r2.tokens
        assert r2.losses == pytest.approx(r1.losses, rel=1e-5)
        assert_same(u2.factors, u1.factors, 1e-5)
    for job, (u, _) in zip(jobs, alone, strict=True):
        assert max(rel(u.factors[m].B, job.start[m].B) for m in u.factors) > 1e-3  # it trained


def test_frozen_A_batched_trains_only_B() -> None:
    worker = make_worker(TrainConfig(**TRAIN))
    jobs = jobs_for(worker, 3)
    alone = [
        worker.train(j.client, j.slot, j.start, j.examples, j.seed, train_A=False) for j in jobs
    ]
    together = worker.train_many(jobs, train_A=False)
    for job, (u1, _), (u2, _) in zip(jobs, alone, together, strict=True):
        for name in job.start:
            assert torch.equal(u2.factors[name].A, job.start[name].A.float())
        assert_same(u2.factors, u1.factors, 1e-5)


def test_with_dropout_a_client_does_not_depend_on_its_batch_mates() -> None:
    worker = make_worker(TrainConfig(**TRAIN), dropout=0.3)
    raw = jobs_for(worker)
    jobs = [
        ClientJob(j.client, j.slot, j.start, LazyTokenized(j.examples, worker.encode), j.seed)
        for j in raw
    ]
    host, cfg, pad = worker.host, worker.train_cfg, worker.pad_id
    alone = train_many(host, [jobs[1]], cfg, pad)[0]
    with_others = train_many(host, jobs, cfg, pad)[1]
    other_mates = train_many(host, [jobs[3], jobs[1], jobs[0]], cfg, pad)[1]
    assert_same(with_others.factors, alone.factors, 1e-5)
    assert_same(other_mates.factors, alone.factors, 1e-5)
    # the masks are the sequential path's too (both draw from the client's seed in layer order)
    j = raw[1]
    u, _ = worker.train(j.client, j.slot, j.start, j.examples, j.seed)
    assert_same(with_others.factors, u.factors, 1e-5)
    # and dropout really acts: without it the client ends elsewhere
    plain = make_worker(TrainConfig(**TRAIN), dropout=0.0)
    u0, _ = plain.train(j.client, j.slot, j.start, j.examples, j.seed)
    assert max(rel(u0.factors[m].B, u.factors[m].B) for m in u.factors) > 1e-3


def test_gradient_checkpointing_redraws_the_same_dropout_masks() -> None:
    worker = make_worker(TrainConfig(**TRAIN, gradient_checkpointing=True), dropout=0.3)
    jobs = jobs_for(worker, 3)
    alone = [worker.train(j.client, j.slot, j.start, j.examples, j.seed) for j in jobs]
    together = worker.train_many(jobs)
    for (u1, _), (u2, _) in zip(alone, together, strict=True):
        assert_same(u2.factors, u1.factors, 1e-5)


def test_bf16_base_trains_float32_factors_close_to_sequential() -> None:
    worker = make_worker(TrainConfig(**{**TRAIN, "max_grad_norm": 0.0}), dtype=torch.bfloat16)
    jobs = jobs_for(worker, 2)
    alone = [worker.train(j.client, j.slot, j.start, j.examples, j.seed) for j in jobs]
    together = worker.train_many(jobs)
    for (u1, _), (u2, r2) in zip(alone, together, strict=True):
        assert all(f.A.dtype == torch.float32 for f in u2.factors.values())
        assert r2.train_loss == pytest.approx(u1.metrics["train_loss"], rel=2e-2)
        assert_same(u2.factors, u1.factors, 2e-2)


def test_stacked_adamw_and_sgd_are_elementwise_torch_optimizers() -> None:
    g = torch.Generator().manual_seed(0)
    for kind, extra in (("adamw", {}), ("sgd", {"momentum": 0.9})):
        cfg = TrainConfig(optimizer=kind, lr=1e-2, weight_decay=0.1, **extra)
        stacked = torch.nn.Parameter(torch.randn(3, 4, 5, generator=g))  # (K, r, n)
        singles = [torch.nn.Parameter(stacked[k].detach().clone()) for k in range(3)]
        opts = [
            torch.optim.AdamW([p], lr=cfg.lr, weight_decay=cfg.weight_decay)
            if kind == "adamw"
            else torch.optim.SGD([p], lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
            for p in singles
        ]
        ours = StackedOptimizer([stacked], cfg)
        for step in range(5):
            lrs = [1e-2, 1e-2 * (step + 1) / 5, 3e-3]  # per-client schedules
            grad = torch.randn(3, 4, 5, generator=g)
            stacked.grad = grad.clone()
            ours.step(lrs if step else [1e-2] * 3)  # the shared-lr branch too
            for k, (p, opt) in enumerate(zip(singles, opts, strict=True)):
                for group in opt.param_groups:
                    group["lr"] = lrs[k] if step else 1e-2
                p.grad = grad[k].clone()
                opt.step()
        for k in range(3):
            torch.testing.assert_close(stacked[k].detach(), singles[k].detach(), rtol=1e-6, atol=0)


def test_per_client_clipping_equals_clip_grad_norm_of_each_client() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.zeros(3, 2, 6))  # (K, r, n)
    b = torch.nn.Parameter(torch.zeros(3, 5, 2))  # (K, m, r)
    a.grad, b.grad = torch.randn(3, 2, 6, generator=g), torch.randn(3, 5, 2, generator=g) * 3
    a.grad[2] *= 0.01  # client 2 is under the threshold: left as it is
    b.grad[2] *= 0.01
    want = []
    for k in range(3):
        pa, pb = torch.zeros(2, 6, requires_grad=True), torch.zeros(5, 2, requires_grad=True)
        pa.grad, pb.grad = a.grad[k].clone(), b.grad[k].clone()
        torch.nn.utils.clip_grad_norm_([pa, pb], 2.0)
        want.append((pa.grad, pb.grad))
    before = b.grad[2].clone()
    clip_per_client([a, b], 2.0)
    for k in range(3):
        torch.testing.assert_close(a.grad[k], want[k][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(b.grad[k], want[k][1], rtol=1e-6, atol=0)
    assert torch.equal(b.grad[2], before)
    assert float(b.grad[0].norm()) < 2.0


def test_zero_padding_gets_zero_gradient_and_stays_zero() -> None:
    worker = make_worker(TrainConfig(**TRAIN))
    jobs = [
        ClientJob(j.client, j.slot, j.start, LazyTokenized(j.examples, worker.encode), j.seed)
        for j in jobs_for(worker, 3)
    ]
    from flexlora.training import batched

    seen = {}
    keep = batched.MultiLoRA.keep

    def spy(self, kept):  # type: ignore[no-untyped-def]
        # before the first client leaves: rank-2 client 0 inside rank-8 stacks
        for name in self.A if not seen else ():
            r = self.ranks[0][name]
            seen[name] = (self.A[name][0, r:].abs().max(), self.B[name][0, :, r:].abs().max())
        keep(self, kept)

    batched.MultiLoRA.keep = spy  # type: ignore[method-assign]
    try:
        train_many(worker.host, jobs, worker.train_cfg, worker.pad_id)
    finally:
        batched.MultiLoRA.keep = keep  # type: ignore[method-assign]
    assert seen and all(float(a) == 0.0 and float(b) == 0.0 for a, b in seen.values())


def test_unsupported_base_layers_are_a_clear_error() -> None:
    with pytest.raises(UsageError, match=r"model\.embed.*Embedding.*parallel_clients = 1"):
        MultiLoRALinear("model.embed", torch.nn.Embedding(4, 4), None)  # type: ignore[arg-type]


def test_parallel_clients_config() -> None:
    assert load_config(overrides=["train.parallel_clients=auto"]).train.parallel_clients == "auto"
    assert load_config(overrides=["train.parallel_clients=3"]).train.parallel_clients == 3
    for bad in ("0", "many", "true"):
        with pytest.raises(UsageError, match="parallel_clients"):
            load_config(overrides=[f"train.parallel_clients={bad}"])


def test_run_with_parallel_clients_gives_the_same_adapters(tmp_path: Path) -> None:
    from flexlora.cli import main

    config = write_jsonl_job(tmp_path / "job")
    common = ["--rounds", "2", "--set", "train.local_steps=3", "--set", "eval.at_start=false"]
    for pc in ("1", "4", "auto"):
        out = tmp_path / f"pc{pc}"
        args = ["run", str(config), "--out", str(out), *common]
        assert main([*args, "--set", f"train.parallel_clients={pc}"]) == 0
    one, four, auto = (adapters(tmp_path / f"pc{pc}") for pc in ("1", "4", "auto"))
    assert one and one.keys() == four.keys() == auto.keys()
    for slot in one:
        assert one[slot].keys() == four[slot].keys() == auto[slot].keys()
        for key in (k for k in one[slot] if "lora_A" in k):
            b_key = key.replace("lora_A", "lora_B")
            want = one[slot][b_key] @ one[slot][key]  # (m, n): free of the SVD's signs
            for got in (four, auto):
                assert rel(got[slot][b_key] @ got[slot][key], want) <= 1e-5, (slot, key)
    rows = [json.loads(x) for x in (tmp_path / "pc4" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["aggregated"]) == 3 for r in rows if r["round"] > 0)


def test_gpu_preset_is_the_full_grid_with_batched_clients() -> None:
    from flexlora.bench.presets import get_preset
    from flexlora.bench.settings import base_config

    gpu, full = get_preset("gpu"), get_preset("full")
    assert (gpu.strategies, gpu.distributions, gpu.seeds) == (
        full.strategies,
        full.distributions,
        full.seeds,
    )
    cfg, ref = base_config(None, gpu), base_config(None, full)
    assert cfg.train.parallel_clients == cfg.federation.clients_per_round == 6
    assert cfg.model.device == "cuda"
    for key in ("rounds", "clients_per_round"):
        assert getattr(cfg.federation, key) == getattr(ref.federation, key)
    assert (cfg.train.local_steps, cfg.train.lr) == (ref.train.local_steps, ref.train.lr)


def _jobs_on(host, ranks: dict[str, int], count: int) -> list[ClientJob]:
    """``count`` clients with non-zero start factors and 3 + 2i random-token examples."""
    from flexlora.training.client import IGNORE_INDEX, TokenizedExample

    gen = torch.Generator().manual_seed(3)
    jobs = []
    for i in range(count):
        start = {
            name: LoRAFactors(
                A=torch.randn(ranks[name], n, generator=gen) * 0.2,  # (r, n)
                B=torch.randn(m, ranks[name], generator=gen) * 0.2,  # (m, r)
                alpha=host.alpha,
            )
            for name, (m, n) in host.shapes().items()
        }
        examples = []
        for _ in range(3 + 2 * i):
            ids = torch.randint(5, 250, (12 + i,), generator=gen).tolist()
            examples.append(TokenizedExample(ids, [IGNORE_INDEX] * 4 + ids[4:]))
        jobs.append(ClientJob(f"c{i}", "t", start, examples, 10 + i))
    return jobs


def test_gpt2_conv1d_base_batched_equals_sequential_and_base_dropout_is_refused() -> None:
    from flexlora.training.adapters import AdapterHost
    from flexlora.training.client import train_local
    from tests.test_scale_loading import _gpt2

    targets = ["c_attn", "c_proj", "c_fc"]
    with_dropout = _gpt2()  # GPT-2's own dropouts (0.1) would mix the clients' randomness
    ranks = dict.fromkeys(target_linear_modules(with_dropout, targets), 4)
    host = AdapterHost(with_dropout, targets, {"t": ranks}, alpha=8)
    cfg = TrainConfig(local_steps=1, batch_size=2)
    with pytest.raises(UsageError, match=r"without dropout of its own \(transformer\.drop\)"):
        train_many(host, _jobs_on(host, ranks, 2), cfg, pad_id=0)
    model = _gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ranks = dict.fromkeys(target_linear_modules(model, targets), 4)
    host = AdapterHost(model, targets, {"t": ranks}, alpha=8)
    cfg = TrainConfig(local_steps=0, local_epochs=2.0, batch_size=2, lr=1e-2, max_grad_norm=0.1)
    jobs = _jobs_on(host, ranks, 3)
    alone = [train_local(host, "t", dict(j.start), j.examples, cfg, j.seed, 0) for j in jobs]
    together = train_many(host, jobs, cfg, pad_id=0)
    for r1, r2 in zip(alone, together, strict=True):
        assert r1.steps == r2.steps
        assert_same(r2.factors, r1.factors, 1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (quant extra)"
)
def test_4bit_base_runs_its_own_forward_once_and_matches_sequential() -> None:
    import bitsandbytes as bnb

    from flexlora.models import load_model

    cfg = load_config(
        values={
            "model": {
                "name": "tiny-llama",
                "quantization": "4bit",
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_compute_dtype": "float32",
            }
        }
    )
    model, tok = load_model(cfg.model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    shapes = target_linear_modules(model, TARGETS)
    slot_ranks = {
        slot: {m: (ra if ("q_" in m or "v_" in m) else rf) for m in shapes}
        for slot, (ra, rf) in TYPES.items()
    }
    lora = LoRASettings(target_modules=TARGETS, dropout=0.0)
    worker = ClientWorker(model, tok, lora, slot_ranks, TrainConfig(local_steps=2, batch_size=2))
    jobs = jobs_for(worker, 3)
    alone = [worker.train(j.client, j.slot, j.start, j.examples, j.seed) for j in jobs]
    for (u1, _), (u2, _) in zip(alone, worker.train_many(jobs), strict=True):
        assert_same(u2.factors, u1.factors, 1e-5)
