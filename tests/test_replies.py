"""The round's reply store: in memory up to its budget, then spilled to safetensors files, read
back equal; and a round's diagnostics are the same whether its updates were spilled or not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexlora.federation import replies as replies_mod
from flexlora.federation.replies import ReplyStore
from flexlora.types import ClientUpdate, LoRAFactors
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
