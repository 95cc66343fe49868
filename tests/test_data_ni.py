"""Natural Instructions v2 and v1 (bigbench format) as federated datasets, on fixture files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flexlora.data import DataConfig, FederatedDataset, load_federated_dataset, render_prompt
from flexlora.data.partition import split_sizes
from flexlora.errors import DataError
from tests.fixtures_data import ni_v2_task, write_ni_v1, write_ni_v2

V2_TASKS = {
    "task001_copy_words": 40,
    "task002_more_words": 20,
    "task010_small": 10,
    "task020_other": 30,
    "task100_heldout": 50,
}


def _ni(root: Path, **kw) -> FederatedDataset:
    return load_federated_dataset(DataConfig(source="natural-instructions", path=str(root), **kw))


def _ids(data: FederatedDataset, part: str) -> dict[str, list[str]]:
    return {c: [e.id for e in getattr(data.split(c), part)] for c in data.clients}


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    return write_ni_v2(
        tmp_path / "ni",
        V2_TASKS,
        test=["task100_heldout", "task020_other"],
        categories={"task020_other": "Sentiment Analysis"},
    )


def test_v2_official_split_one_client_per_task(v2: Path) -> None:
    data = _ni(v2)
    assert data.clients == tuple(sorted(V2_TASKS))
    assert data.unseen == ("task020_other", "task100_heldout")
    assert set(data.seen).isdisjoint(data.unseen)
    assert {len(data.train(c)) for c in data.seen} == {32, 16, 8}
    for cid in data.clients:
        n = V2_TASKS[cid]
        assert (len(data.eval(cid)), len(data.test(cid))) == (n // 10, n // 10)
    ex = data.train("task001_copy_words")[0]
    assert ex.instruction.startswith("Definition of task001_copy_words")
    assert ex.category == "Question Answering" and ex.task == "task001_copy_words"
    assert ex.output == ex.input.split()[1]  # the first acceptable output is the target
    assert data.test("task020_other")[0].category == "Sentiment Analysis"
    assert "### Input:\nsay w" in render_prompt(ex, data.template)


def test_v2_unseen_clients_expose_no_training_data(v2: Path) -> None:
    data = _ni(v2)
    for cid in data.unseen:
        assert data.split(cid).train == ()
        with pytest.raises(Exception, match="unseen"):
            data.train(cid)
    seen_ids = {e.id for c in data.seen for e in data.train(c)}
    assert not any(i.startswith(("task020", "task100")) for i in seen_ids)


def test_v2_same_seed_same_split_different_seed_different(v2: Path) -> None:
    a, b, c = _ni(v2, seed=1), _ni(v2, seed=1), _ni(v2, seed=2)
    assert _ids(a, "train") == _ids(b, "train") and _ids(a, "test") == _ids(b, "test")
    assert _ids(a, "test") != _ids(c, "test")
    # a task's split does not depend on which tasks are held out
    d = _ni(v2, seed=1, unseen="fraction", unseen_fraction=0.0)
    assert _ids(d, "test") == _ids(a, "test")


def test_v2_fraction_unseen_and_subsampling(v2: Path) -> None:
    data = _ni(v2, unseen="fraction", unseen_fraction=0.4, subsample_fraction=0.5)
    assert len(data.unseen) == 2 and len(data.seen) == 3
    for cid in data.seen:
        assert len(data.split(cid)) == V2_TASKS[cid] // 2
    for cid in data.unseen:  # no train part: eval + test of the halved task
        assert len(data.split(cid)) == sum(split_sizes(V2_TASKS[cid] // 2, (0.8, 0.1, 0.1))[1:])
    capped = _ni(v2, max_examples_per_task=10, max_train_per_client=3, max_test_per_client=1)
    for cid in capped.seen:
        assert len(capped.train(cid)) == 3 and len(capped.test(cid)) == 1


def test_v2_clients_per_task(v2: Path) -> None:
    data = _ni(v2, clients_per_task=4)
    assert len(data.clients) == 4 * len(V2_TASKS)
    assert sum(c.startswith("task100_heldout.") for c in data.unseen) == 4
    assert set(re.sub(r"\.\d+$", "", c) for c in data.unseen) == {
        "task020_other",
        "task100_heldout",
    }
    shards = [data.split(f"task001_copy_words.{j}") for j in range(4)]
    assert [len(s) for s in shards] == [10, 10, 10, 10]
    ids = [e.id for s in shards for e in (*s.train, *s.eval, *s.test)]
    assert len(ids) == len(set(ids)) == 40


def test_v2_positive_examples_in_instruction(v2: Path) -> None:
    data = _ni(v2, positive_examples=1)
    ex = data.test("task001_copy_words")[0]
    assert "Positive Example 1:\nInput: say alpha\nOutput: alpha" in ex.instruction
    assert "say beta" not in ex.instruction


def test_v2_examples_of_a_task_share_one_instruction_string(v2: Path) -> None:
    data = _ni(v2)
    exs = data.train("task001_copy_words")
    assert len({id(e.instruction) for e in exs}) == 1


# --- bad input: every error names the file (and line / record) --------------------------------


def test_malformed_task_json_names_file_and_position(v2: Path) -> None:
    (v2 / "tasks" / "task002_more_words.json").write_text('{"Definition": ["x"],\n "Instances": [}')
    with pytest.raises(DataError, match=r"task002_more_words\.json:2: invalid JSON \(column 16\)"):
        _ni(v2)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("Definition"), "missing field 'Definition'"),
        (lambda t: t.pop("Instances"), "missing field 'Instances'"),
        (lambda t: t["Instances"].clear(), "empty task"),
        (lambda t: t["Instances"][3].pop("output"), r"Instances\[3\]: missing field 'output'"),
        (lambda t: t["Instances"][2].update(output=[]), r"Instances\[2\]: the output must be"),
        (lambda t: t["Instances"][1].update(input=7), r"Instances\[1\]: 'input' must be"),
    ],
)
def test_v2_bad_task_content(v2: Path, edit, message: str) -> None:
    path = v2 / "tasks" / "task010_small.json"
    task = ni_v2_task("task010_small", 10)
    edit(task)
    path.write_text(json.dumps(task))
    with pytest.raises(DataError, match=rf"task010_small\.json: {message}"):
        _ni(v2)


def test_task_appearing_twice(v2: Path) -> None:
    split = v2 / "splits" / "default" / "test_tasks.txt"
    split.write_text("task100_heldout\ntask001_copy_words\n")
    with pytest.raises(
        DataError, match=r"test_tasks\.txt:2: task 'task001_copy_words' appears twice"
    ):
        _ni(v2)
    split.write_text("task100_heldout\n")
    (v2 / "tasks" / "task010_duplicate.json").write_text(json.dumps(ni_v2_task("x", 3)))
    with pytest.raises(DataError, match="task number 10 appears twice"):
        _ni(v2)


def test_split_file_naming_a_missing_task(v2: Path) -> None:
    split = v2 / "splits" / "default" / "train_tasks.txt"
    split.write_text("task001_copy_words\n\ntask999_nowhere\n")
    with pytest.raises(DataError, match=r"train_tasks\.txt:3: task 'task999_nowhere' is not in"):
        _ni(v2)
    split.unlink()
    with pytest.raises(DataError, match=r"train_tasks\.txt: cannot read split file"):
        _ni(v2)


def test_not_a_v2_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no tasks/ inside"):
        _ni(tmp_path)


# --- Natural Instructions v1 in bigbench's format ---------------------------------------------

V1_TASKS = {
    "subtask001_quoref_question_generation": 30,
    "subtask002_quoref_answer_generation": 20,
    "subtask003_mctaco_question_generation": 12,
    "subtask045_miscellaneous_sentence_paraphrasing": 10,
    "subtask046_miscellaenous_question_typing": 58,
}


def _v1(folder: Path, **kw) -> FederatedDataset:
    return load_federated_dataset(DataConfig(path=str(folder), **kw))


def test_v1_reader_counts_categories_and_targets(tmp_path: Path) -> None:
    folder = write_ni_v1(tmp_path / "ni1", V1_TASKS)
    data = _v1(folder, unseen_fraction=0.2)
    assert data.clients == tuple(sorted(V1_TASKS)) and len(data.unseen) == 1
    for cid in data.seen:
        assert len(data.split(cid)) == V1_TASKS[cid]
    cats = {e.category for c in data.clients for e in data.test(c)}
    assert cats == {"quoref", "mctaco", "misc"}
    # target: a list's first element (even tasks) or a plain string (odd tasks)
    for cid in data.clients:
        for e in data.test(cid):
            assert e.output == "t" + e.input.split()[1]
            assert e.instruction.startswith("Definition: copy the word")
            assert not e.instruction.endswith(" ")


def test_v1_clients_per_task_and_reproducibility(tmp_path: Path) -> None:
    folder = write_ni_v1(tmp_path / "ni1", V1_TASKS)
    a = _v1(folder, clients_per_task=3, seed=5)
    b = _v1(folder, clients_per_task=3, seed=5)
    assert len(a.clients) == 15 and _ids(a, "train") == _ids(b, "train")
    unseen_tasks = {c.rsplit(".", 1)[0] for c in a.unseen}
    seen_tasks = {c.rsplit(".", 1)[0] for c in a.seen}
    assert unseen_tasks and unseen_tasks.isdisjoint(seen_tasks)


def test_v1_bad_inputs(tmp_path: Path) -> None:
    folder = write_ni_v1(tmp_path / "ni1", V1_TASKS)
    path = folder / "subtask003_mctaco_question_generation" / "task.json"
    path.write_text(json.dumps({"task_prefix": "x", "examples": []}))
    with pytest.raises(DataError, match=r"subtask003_mctaco_question_generation/task\.json: empty"):
        _v1(folder)
    path.write_text(json.dumps({"task_prefix": "x", "examples": [{"input": "a"}]}))
    with pytest.raises(DataError, match=r"examples\[0\]: missing field 'target'"):
        _v1(folder)
    path.write_text(json.dumps({"examples": [{"input": "a", "target": "b"}]}))
    with pytest.raises(DataError, match="task_prefix"):
        _v1(folder)
    path.write_text("{\n\n  oops")
    with pytest.raises(DataError, match=r"task\.json:3: invalid JSON"):
        _v1(folder)
    (folder / "subtask003_copy").mkdir()
    (folder / "subtask003_copy" / "task.json").write_text("{}")
    with pytest.raises(DataError, match="task number 3 appears twice"):
        _v1(folder)
