"""Dolly-15K (Dirichlet and meta partitioners), generic JSONL and the optional hub path."""

from __future__ import annotations

import builtins
import json
import statistics
from pathlib import Path

import pytest

from flexlora.data import DataConfig, FederatedDataset, load_federated_dataset
from flexlora.data.partition import category_entropy
from flexlora.errors import DataError, UsageError
from tests.fixtures_data import DOLLY_CATEGORIES, write_dolly

PER_CATEGORY = dict(zip(DOLLY_CATEGORIES, (120, 80, 60, 50, 30), strict=True))
TOTAL = sum(PER_CATEGORY.values())


@pytest.fixture
def dolly(tmp_path: Path) -> Path:
    return write_dolly(tmp_path / "databricks-dolly-15k.jsonl", PER_CATEGORY)


def _dolly(path: Path, **kw) -> FederatedDataset:
    return load_federated_dataset(DataConfig(source="dolly", path=str(path), **kw))


def _all(data: FederatedDataset, cid: str) -> list:
    s = data.split(cid)
    return [*s.train, *s.eval, *s.test]


def test_dolly_fields_map_to_examples(dolly: Path) -> None:
    data = _dolly(dolly, partitioner="meta", unseen_fraction=0.0)
    ex = next(e for e in _all(data, "open_qa") if e.input)
    assert ex.instruction.startswith("open_qa question") and ex.input.startswith("context")
    assert ex.output.startswith("open_qa answer") and ex.category == "open_qa"
    assert any(not e.input for e in _all(data, "open_qa"))


def test_dolly_meta_one_category_per_client(dolly: Path) -> None:
    data = _dolly(dolly, partitioner="meta", unseen_fraction=0.2)
    assert set(data.clients) == set(DOLLY_CATEGORIES)
    assert len(data.unseen) == 1
    for cid in data.clients:
        assert {e.category for e in _all(data, cid)} == {cid}
    for cid in data.seen:
        assert len(_all(data, cid)) == PER_CATEGORY[cid]
        assert len(data.train(cid)) == round(0.8 * PER_CATEGORY[cid])


def test_dolly_dirichlet_clients_and_skew(dolly: Path) -> None:
    def mean_entropy(alpha: float) -> float:
        data = _dolly(dolly, num_clients=10, dirichlet_alpha=alpha, unseen_fraction=0.0)
        assert len(data.clients) == 10 and data.unseen == ()
        assert sum(len(_all(data, c)) for c in data.clients) == TOTAL
        return statistics.fmean(category_entropy(_all(data, c)) for c in data.clients)

    assert mean_entropy(0.05) < mean_entropy(1.0) < mean_entropy(50.0)


def test_dolly_dirichlet_is_seeded(dolly: Path) -> None:
    def ids(seed: int) -> dict[str, list[str]]:
        data = _dolly(dolly, num_clients=6, seed=seed)
        return {c: [e.id for e in data.test(c)] for c in data.clients}

    assert ids(3) == ids(3) and ids(3) != ids(4)


def test_dolly_unseen_clients_are_held_out(dolly: Path) -> None:
    data = _dolly(dolly, num_clients=10, unseen_fraction=0.3)
    assert len(data.unseen) == 3 and set(data.unseen).isdisjoint(data.seen)
    train_ids = {e.id for c in data.seen for e in data.train(c)}
    held_ids = {e.id for c in data.unseen for e in _all(data, c)}
    assert train_ids.isdisjoint(held_ids)


def test_jsonl_with_custom_fields_and_tasks(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [
        {"q": f"question {i}", "ctx": "", "a": [f"ans {i}", "alt"], "kind": "k", "t": f"t{i % 2}"}
        for i in range(20)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = DataConfig(
        source="jsonl",
        path=str(path),
        instruction_field="q",
        input_field="ctx",
        output_field="a",
        category_field="kind",
        task_field="t",
        unseen_fraction=0.0,
    )
    data = load_federated_dataset(cfg)
    assert data.clients == ("t0", "t1")
    ex = data.train("t0")[0]
    assert ex.output.startswith("ans ") and ex.task == "t0" and ex.category == "k"
    assert ex.id.startswith("mine-")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"instruction": "a", "context": "", "response": "b", "category": "c"}', "{oops"],
            ":2: invalid JSON",
        ),
        (['{"instruction": "a", "context": "", "category": "c"}'], ":1: missing field 'response'"),
        (["[1, 2]"], ":1: a record must be a JSON object"),
        (
            ['{"instruction": 3, "context": "", "response": "b", "category": "c"}'],
            ":1: field 'instruction' must be a string",
        ),
        (["", "  "], ": no records"),
    ],
)
def test_dolly_bad_lines_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "dolly.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"dolly\.jsonl{message}"):
        _dolly(path, partitioner="meta")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot read"):
        _dolly(tmp_path / "nope.jsonl")


def test_hub_without_datasets_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UsageError, match="needs the 'datasets' package"):
        load_federated_dataset(DataConfig(source="hub", path="databricks/databricks-dolly-15k"))
