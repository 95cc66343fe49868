"""The round's reply store: in memory up to its budget, then spilled to safetensors files, read
back equal; and a round's diagnostics are the same whether its updates were spilled or not."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pytest
import torch

from flexlora.federation import replies as replies_mod
from flexlora.federation.replies import ReplyStore, remove_spill_folders
from flexlora.simulation.runner import FederatedRun
from flexlora.training.model import build_tiny_llama
from flexlora.types import ClientUpdate, LoRAFactors
from tests.reliability_helpers import one_torch_thread  # noqa: F401 (fixture)
from tests.sim_helpers import make_dataset, tiny_config
from tests.test_validation import CLIENTS, COORD, PREVIOUS, good_update


def update(cid: str, seed: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    factors = {
        "model.layers.0.self_attn.q_proj": LoRAFactors(
            torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g), 16.0
        ),
        "model.layers.0.mlp.down_proj": LoRAFactors(
            torch.randn(2, 5, generator=g, dtype=torch.float64),
            torch.randn(8, 2, generator=g, dtype=torch.float64),
            8.0,
            use_rslora=True,
        ),
    }
    return ClientUpdate(cid, 7 + seed, factors, {"train_loss": 0.5 + seed, "tokens": 3.0})


def same(a: ClientUpdate, b: ClientUpdate) -> bool:
    return (
        (a.client_id, a.num_examples, dict(a.metrics))
        == (b.client_id, b.num_examples, dict(b.metrics))
        and list(a.factors) == list(b.factors)
        and all(
            torch.equal(f.A, b.factors[n].A)
            and torch.equal(f.B, b.factors[n].B)
            and f.A.dtype == b.factors[n].A.dtype
            and (f.alpha, f.use_rslora) == (b.factors[n].alpha, b.factors[n].use_rslora)
            for n, f in a.factors.items()
        )
    )


def test_updates_beyond_the_budget_go_to_disk_and_come_back_equal(tmp_path: Path) -> None:
    ups = [update(f"c{i}", i) for i in range(4)]
    store = ReplyStore(budget=ups[0].num_bytes() + 1, directory=tmp_path)
    for u in ups:
        store.put(u)
    assert len(store) == 4 and store.spilled == 3 and store.held == ups[0].num_bytes()
    files = list(tmp_path.glob("flexlora-replies-*/*.safetensors"))
    assert len(files) == 3
    back = list(store)
    assert back[0] is ups[0]  # in memory: the update itself
    assert all(same(a, b) for a, b in zip(back, ups, strict=True))
    store.close()
    assert not list(tmp_path.glob("flexlora-replies-*")) and len(store) == 0


def test_a_round_with_spilled_updates_has_the_same_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rank-energy diagnostics read the updates back from disk: the same numbers."""
    updates = [good_update(COORD, c, i) for i, c in enumerate(CLIENTS)]
    state, row = COORD.aggregate(PREVIOUS, 2, CLIENTS, updates)
    monkeypatch.setattr(replies_mod, "REPLY_MEMORY_BYTES", 0)
    spilled: list[int] = []
    close = ReplyStore.close

    def spy(self: ReplyStore) -> None:
        spilled.append(self.spilled)
        close(self)

    monkeypatch.setattr(ReplyStore, "close", spy)
    state2, row2 = COORD.aggregate(PREVIOUS, 2, CLIENTS, updates)
    assert spilled and spilled[0] == len(CLIENTS)
    assert "update_survival_per_client" in row
    for key in ("update_survival", "update_survival_per_client", "energy_kept", "aggregated"):
        assert row2[key] == row[key], key
    for name, d in state.modules.items():
        assert torch.equal(d.U, state2[name].U) and torch.equal(d.S, state2[name].S)


# ------------------------------------------------------------------ the spill folder's life
def spill_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("flexlora-replies-*/*.safetensors"))


def spy_folders(monkeypatch: pytest.MonkeyPatch) -> list[Path | None]:
    """The folder of every store that spilled, after each update put in it."""
    folders: list[Path | None] = []
    put = ReplyStore.put

    def spy(self: ReplyStore, u: ClientUpdate) -> None:
        put(self, u)
        folders.append(self._folder)

    monkeypatch.setattr(ReplyStore, "put", spy)
    return folders


@pytest.fixture
def system_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temporary folder, here a test folder: every store spills, and a store
    given no folder spills there."""
    monkeypatch.setattr(replies_mod, "REPLY_MEMORY_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_store_dropped_without_close_removes_its_files(tmp_path: Path) -> None:
    store = ReplyStore(budget=0, directory=tmp_path)
    for i in range(2):
        store.put(update(f"c{i}", i))
    assert len(spill_files(tmp_path)) == 2
    del store
    gc.collect()
    assert not list(tmp_path.glob("flexlora-replies-*"))


def test_a_round_dropped_without_close_removes_its_files(system_tmp: Path) -> None:
    agg = COORD.open_round(PREVIOUS, 2, CLIENTS)
    for i, c in enumerate(CLIENTS[:2]):
        assert agg.add(good_update(COORD, c, i))
    assert len(spill_files(system_tmp)) == 2
    del agg
    gc.collect()
    assert not list(system_tmp.glob("flexlora-replies-*"))


def test_an_error_inside_a_round_removes_its_files_at_once(system_tmp: Path) -> None:
    with pytest.raises(KeyboardInterrupt), COORD.open_round(PREVIOUS, 2, CLIENTS) as agg:
        for i, c in enumerate(CLIENTS[:2]):
            agg.add(good_update(COORD, c, i))
        assert len(spill_files(system_tmp)) == 2
        raise KeyboardInterrupt  # a crash while a later client trains, an interrupt
    assert agg is not None  # still referenced: not the garbage collector's doing
    assert not list(system_tmp.glob("flexlora-replies-*"))


def test_an_error_while_a_round_closes_removes_its_files(system_tmp: Path) -> None:
    agg = COORD.open_round(PREVIOUS, 2, CLIENTS)
    for i, c in enumerate(CLIENTS):
        agg.add(good_update(COORD, c, i))

    def broken() -> None:
        raise RuntimeError("the strategy's result failed")

    agg.acc.result = broken
    with pytest.raises(RuntimeError, match="the strategy's result failed"):
        agg.close()
    assert not list(system_tmp.glob("flexlora-replies-*"))


def test_an_error_in_a_collected_round_removes_its_files(system_tmp: Path) -> None:
    """A driver's round (RoundCollector) abandoned in its ``with`` block, as the simulator's
    and the Flower strategy's are when a client or the grid fails."""
    from flexlora.federation.round import ClientResult, RoundCollector

    with (
        pytest.raises(ConnectionError),
        RoundCollector(COORD, PREVIOUS, 2, CLIENTS) as collector,
    ):
        for i, c in enumerate(CLIENTS[:2]):
            collector.offer(ClientResult(c, good_update(COORD, c, i)))
        assert len(spill_files(system_tmp)) == 2
        raise ConnectionError("the grid went away")
    assert collector.held == 0
    assert not list(system_tmp.glob("flexlora-replies-*"))


def test_rounds_spill_into_the_coordinators_reply_dir(
    system_tmp: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path_factory.mktemp("run")
    monkeypatch.setattr(COORD, "reply_dir", run)
    folders = spy_folders(monkeypatch)
    _, row = COORD.aggregate(
        PREVIOUS, 2, CLIENTS, [good_update(COORD, c, i) for i, c in enumerate(CLIENTS)]
    )
    assert "update_survival" in row
    assert len(folders) == len(CLIENTS) and all(f is not None and f.parent == run for f in folders)
    assert not list(run.iterdir()) and not list(system_tmp.iterdir())


def test_leftover_spill_folders_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / "flexlora-replies-abc123"
    stale.mkdir()
    (stale / "0.safetensors").write_bytes(b"x")
    keep = tmp_path / "checkpoint"
    keep.mkdir()
    assert remove_spill_folders(tmp_path) == [stale]
    assert not stale.exists() and keep.is_dir()


# ------------------------------------------------------------------ the simulator's rounds
NO_EVAL = {"at_start": False, "every": 0, "unseen": False, "seen": False}


def small_run(out: Path) -> FederatedRun:
    cfg = tiny_config(
        str(out),
        federation={"rounds": 1},
        train={"local_steps": 1},
        eval=NO_EVAL,
        output={"save_adapters": False},
    )
    return FederatedRun(cfg, dataset=make_dataset(), model_and_tokenizer=build_tiny_llama(seed=0))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_spills_into_its_run_folder_and_leaves_nothing_there(
    system_tmp: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path_factory.mktemp("run")
    killed = out / "flexlora-replies-killed"  # what a killed run left
    killed.mkdir()
    (killed / "0.safetensors").write_bytes(b"\0")
    folders = spy_folders(monkeypatch)
    rows = small_run(out).run()
    assert "update_survival" in rows[-1]
    assert len(folders) == 4 and all(f is not None and f.parent == out for f in folders)
    assert not list(out.glob("flexlora-replies-*"))
    assert not list(system_tmp.glob("flexlora-replies-*"))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_simulated_round_cut_short_leaves_no_spilled_update(
    system_tmp: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt while a later client trains: the updates already folded were spilled."""
    out = tmp_path_factory.mktemp("run")
    sim = small_run(out)
    folders = spy_folders(monkeypatch)
    train = sim.train_clients

    def interrupted(jobs, round_, bar=False):  # type: ignore[no-untyped-def]
        results = train(jobs, round_, bar)
        yield next(results)
        yield next(results)
        raise KeyboardInterrupt

    sim.train_clients = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        sim.run_round(sim.server.initial_state(), 1, bar=False)
    assert len(folders) == 2 and all(f is not None for f in folders)
    assert not list(out.glob("flexlora-replies-*"))
    assert not list(system_tmp.glob("flexlora-replies-*"))


def test_take_gives_back_one_update_and_frees_its_memory_or_file(tmp_path: Path) -> None:
    """Keyed access, for the replies that wait for an earlier client: LoRA and SLoRA's sparse
    updates alike, bit for bit, in any order."""
    from flexlora.methods.slora import SparseUpdate

    g = torch.Generator().manual_seed(3)
    sparse = SparseUpdate(
        "s", 4, {"a": torch.randn(7, generator=g), "b": torch.randn(3, generator=g)}, {"x": 1.5}
    )
    ups = [update("c0", 0), sparse, update("c2", 2)]
    store = ReplyStore(budget=ups[0].num_bytes(), directory=tmp_path)
    keys = [store.put(u) for u in ups]
    assert store.held == ups[0].num_bytes() and store.spilled == 2
    back = store.take(keys[1])
    assert isinstance(back, SparseUpdate) and back is not sparse
    assert (back.client_id, back.num_examples, dict(back.metrics)) == ("s", 4, {"x": 1.5})
    assert list(back.values) == ["a", "b"]
    assert all(torch.equal(back.values[k], sparse.values[k]) for k in sparse.values)
    assert store.spilled == 1 and len(list(tmp_path.glob("flexlora-replies-*/*"))) == 1
    assert store.take(keys[0]) is ups[0] and store.held == 0
    assert same(store.take(keys[2]), ups[2])
    assert len(store) == 0 and not list(tmp_path.glob("flexlora-replies-*/*"))
    store.close()
    assert not list(tmp_path.glob("flexlora-replies-*"))
