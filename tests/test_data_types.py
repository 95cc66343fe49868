"""Example / FederatedDataset invariants, prompt templates and DataConfig validation."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from flexlora.data import ClientSplit, DataConfig, Example, FederatedDataset, render_prompt
from flexlora.data.templates import get_template
from flexlora.errors import DataError, UsageError

EX = Example("Add the numbers.", "2 3", "5", "math", task="t1", id="t1-0")


def test_example_is_frozen_and_picklable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        EX.output = "6"  # type: ignore[misc]
    split = ClientSplit((EX,), (), (EX,))
    data = pickle.loads(
        pickle.dumps(FederatedDataset({"a": split, "b": ClientSplit((), (), (EX,))}, ["b"]))
    )
    assert data.split("a") == split and data.unseen == ("b",)  # e.g. for simulation workers


def test_alpaca_prompt_with_and_without_input() -> None:
    assert render_prompt(EX) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n"
    )
    no_input = dataclasses.replace(EX, input="")
    assert render_prompt(no_input, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n"
    )
    assert EX.output not in render_prompt(EX).split("### Response:")[1]


def test_prompt_keeps_braces_and_placeholders_in_texts() -> None:
    tricky = Example("Fill {x} and {input}", "{instruction} {}", "y", "c")
    prompt = render_prompt(tricky, "plain")
    assert prompt == "Fill {x} and {input}\n\n{instruction} {}\n\n"


def test_template_from_alpaca_lora_json(tmp_path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {"prompt_input": "I:{instruction}|{input}|", "prompt_no_input": "I:{instruction}|"}
        )
    )
    assert render_prompt(EX, str(path)) == "I:Add the numbers.|2 3|"
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt_input": "x"}')
    with pytest.raises(DataError, match=r"bad\.json: missing string field 'prompt_no_input'"):
        get_template(str(bad))
    with pytest.raises(UsageError, match="unknown template"):
        get_template("vicuna")


def _split(n_train: int, n_eval: int = 1, n_test: int = 1) -> ClientSplit:
    ex = (EX,)
    return ClientSplit(ex * n_train, ex * n_eval, ex * n_test)


def test_federated_dataset_seen_unseen_are_disjoint_and_unseen_cannot_train() -> None:
    data = FederatedDataset({"a": _split(3), "b": _split(0), "c": _split(2)}, unseen=["b"])
    assert data.clients == ("a", "b", "c")
    assert data.seen == ("a", "c") and data.unseen == ("b",)
    assert set(data.seen).isdisjoint(data.unseen)
    assert len(data.train("a")) == 3 and data.num_train_examples("c") == 2
    assert len(data.test("b")) == 1 and len(data.eval("b")) == 1
    with pytest.raises(UsageError, match="unseen"):
        data.train("b")
    with pytest.raises(UsageError, match="unknown client"):
        data.test("zzz")


def test_federated_dataset_refuses_unseen_clients_with_training_data() -> None:
    with pytest.raises(UsageError, match="no training data"):
        FederatedDataset({"a": _split(3), "b": _split(1)}, unseen=["b"])
    with pytest.raises(UsageError, match="not in the dataset"):
        FederatedDataset({"a": _split(3)}, unseen=["x"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "csv"}, "source must be one of"),
        ({"partitioner": "random"}, "partitioner must be one of"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha"),
        ({"num_clients": 0}, "num_clients"),
        ({"subsample_fraction": 0.0}, "subsample_fraction"),
        ({"unseen_fraction": 1.0}, "unseen_fraction"),
        ({"split_ratios": (0.5, 0.1, 0.1)}, "sum to 1"),
        ({"split_ratios": (0.8, 0.2)}, "three shares"),
        ({"max_train_per_client": -1}, "max_train_per_client"),
        ({"source": "dolly"}, "needs a path"),
        ({"source": "dolly", "path": "d.jsonl", "partitioner": "task"}, "no tasks"),
        ({"source": "jsonl", "path": "d.jsonl", "partitioner": "task"}, "no tasks"),
        ({"unseen": "official"}, "natural-instructions"),
        ({"source": "dolly", "path": "d.jsonl", "clients_per_task": 3}, "task partitioner"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        DataConfig(**kwargs)


def test_config_defaults_and_help() -> None:
    cfg = DataConfig()
    assert cfg.resolved_partitioner() == "task" and cfg.resolved_unseen() == "fraction"
    assert DataConfig(source="dolly", path="x").resolved_partitioner() == "dirichlet"
    assert DataConfig(source="natural-instructions", path="x").resolved_unseen() == "official"
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataConfig))
