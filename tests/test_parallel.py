"""The server step's module-parallel map: the same results as one thread, threads restored."""

from __future__ import annotations

import pytest
import torch

from flexlora.aggregation import get_aggregator
from flexlora.aggregation.parallel import map_modules, module_workers
from flexlora.types import ClientUpdate, LoRAFactors

SHAPES = {
    f"layers.{i}.{name}": shape
    for i in range(3)
    for name, shape in (("q_proj", (48, 40)), ("down_proj", (40, 96)))
}


def updates(seed: int, ranks: tuple[int, ...] = (2, 5, 9)) -> list[ClientUpdate]:
    """One float32 update per rank, for every module of SHAPES."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, r in enumerate(ranks):
        factors = {
            name: LoRAFactors(
                torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), alpha=16.0
            )
            for name, (m, n) in SHAPES.items()
        }
        out.append(ClientUpdate(f"c{c}", 10 + c, factors))
    return out


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora", "fedit"])
def test_modules_in_parallel_equal_one_thread_bit_for_bit(strategy: str) -> None:
    """Each module runs on one thread in a worker: exactly what a one-thread run gives."""
    ups = updates(3, (4, 4, 4)) if strategy == "fedit" else updates(3)  # FedIT: one rank
    options = {"keep_rank": 6} if strategy == "flexlora" else {}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = get_aggregator(strategy, **options).aggregate(ups)
        torch.set_num_threads(2)
        assert module_workers("cpu", len(SHAPES)) == 2
        together = get_aggregator(strategy, **options).aggregate(ups)
        assert torch.get_num_threads() == 2  # restored after the parallel map
    finally:
        torch.set_num_threads(threads)
    for name in SHAPES:
        a, b = alone[name], together[name]
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh), name


def test_map_modules_keeps_order_and_raises_the_first_error() -> None:
    """Results in the items' order; an error propagates, and torch's threads come back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        items = {f"m{i}": i for i in range(5)}
        assert list(map_modules(lambda name, i: (name, i * i), items)) == list(items)

        def boom(name: str, i: int) -> int:
            if i == 3:
                raise ValueError(f"module {name}: bad")
            return i

        with pytest.raises(ValueError, match="module m3: bad"):
            map_modules(boom, items)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert module_workers("meta", 10) == 1  # another device: one module at a time


def test_map_modules_starts_the_costliest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a cost, modules are submitted from the most costly down (longest processing time
    first, so the workers end together); results still come in the items' order."""
    import concurrent.futures

    import flexlora.aggregation.parallel as parallel

    started: list[str] = []

    class InOrder(concurrent.futures.ThreadPoolExecutor):
        """Runs each task at submission, so the call order is the submission order."""

        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(fn(*args, **kwargs))
            return future

    monkeypatch.setattr(parallel, "ThreadPoolExecutor", InOrder)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        items = {"q": 3.0, "k": 1.0, "down": 9.0, "v": 2.0}

        def record(name: str, cost: float) -> float:
            started.append(name)
            return cost

        out = map_modules(record, items, cost=lambda c: c)
    finally:
        torch.set_num_threads(threads)
    assert started == ["down", "q", "v", "k"]
    assert list(out) == list(items) and out == items


def test_flexlora_modules_report_their_work() -> None:
    """FlexLoRA's estimate grows with the module's size and R = Σ r_i: the wider module first."""
    agg = get_aggregator("flexlora", keep_rank=4)
    acc = agg.start({"small": (48, 40), "wide": (40, 96)})
    for u in updates(5):
        acc.add(
            ClientUpdate(
                u.client_id,
                u.num_examples,
                {"small": u.factors["layers.0.q_proj"], "wide": u.factors["layers.0.down_proj"]},
            )
        )
    small, wide = acc.modules["small"], acc.modules["wide"]
    assert wide.work() > small.work() > 0


def test_result_schedules_modules_by_the_strategy_s_own_estimate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Accumulator.result hands map_modules each accumulator's own work() (FlexLoRA's, not the
    base class's m·n), so the costliest modules start first."""
    import flexlora.aggregation.base as base

    seen: dict[str, float] = {}
    real = base.map_modules

    def spy(fn, items, device="cpu", cost=None):  # type: ignore[no-untyped-def]
        if cost is not None:
            seen.update({name: cost(item) for name, item in items.items()})
        return real(fn, items, device, cost)

    monkeypatch.setattr(base, "map_modules", spy)
    acc = get_aggregator("flexlora", keep_rank=4).start(SHAPES)
    for u in updates(6):
        acc.add(u)
    expected = {name: module.work() for name, module in acc.modules.items()}
    acc.result()
    assert seen == expected
    m, n = SHAPES[next(iter(SHAPES))]
    assert seen[next(iter(SHAPES))] != float(m * n)  # FlexLoRA's estimate, not the default
