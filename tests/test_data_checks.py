"""Degenerate data is refused at load (or dropped when the task says so), before any stage runs."""

import logging
import re

import datasets
import pytest

from partial_lora.data import TaskSpec, load_task
from partial_lora.errors import PlrError


def csv_dir(tmp_path, train, test):
    for name, rows in (("train", train), ("test", test)):
        datasets.Dataset.from_list(rows).to_csv(tmp_path / f"{name}.csv", index=False)
    return TaskSpec(name="toy", loader="hf-text", path=str(tmp_path), test_split="test", split_seed=0)


def rows(labels, text=lambda i: f"sample text {i}"):
    return [{"text": text(i), "label": y} for i, y in enumerate(labels)]


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_one_class_in_train_is_refused(tmp_path):
    spec = csv_dir(tmp_path, rows(["a"] * 30), rows(["a"] * 6))
    with pytest.raises(PlrError, match=r"training split of task 'toy' has 1 class \(a\); a classifier needs at "
                                       r"least 2") as e:
        load_task(spec)
    assert "task.label_column='label'" in one_line(e)


def test_a_label_only_in_test_is_refused_or_dropped(tmp_path, caplog):
    spec = csv_dir(tmp_path, rows(["a", "b"] * 15), rows(["a", "b", "c", "c"]))
    with pytest.raises(PlrError, match=r"split 'test' of task 'toy' has 2 rows with labels the training split never "
                                       r"has \(c\); .* task.unseen_labels=drop") as e:
        load_task(spec)
    one_line(e)
    with caplog.at_level(logging.WARNING):
        data = load_task(TaskSpec(**{**spec.__dict__, "unseen_labels": "drop"}))
    assert len(data.test) == 2 and set(data.test["label"]) == {0, 1}
    assert "dropped 2 rows of split 'test' with labels absent from train (c" in caplog.text


@pytest.mark.parametrize("cell, why", [("", "is empty"), ("   ", "is empty"), (None, "is empty (null)")])
def test_an_empty_text_cell_names_its_row(tmp_path, cell, why, caplog):
    train = rows(["a", "b"] * 15)
    train[7]["text"] = cell
    spec = csv_dir(tmp_path, train, rows(["a", "b"]))
    with pytest.raises(PlrError, match=rf"task.text_column='text' of split '(train|val)' row \d+ {re.escape(why)}") as e:
        load_task(spec)
    assert "task.bad_text=drop" in one_line(e)
    with caplog.at_level(logging.WARNING):
        data = load_task(TaskSpec(**{**spec.__dict__, "bad_text": "drop"}))
    assert len(data.train) + len(data.val) == 29 and "dropped 1 rows" in caplog.text


def test_a_numeric_text_column_is_refused(tmp_path):
    spec = csv_dir(tmp_path, rows(["a", "b"] * 15, text=lambda i: i), rows(["a", "b"], text=lambda i: i))
    with pytest.raises(PlrError, match=r"row \d+ is not text \(int"):
        load_task(spec)


def test_a_bad_policy_value_is_refused(tmp_path):
    spec = csv_dir(tmp_path, rows(["a", "b"] * 15), rows(["a", "b"]))
    with pytest.raises(PlrError, match="task.unseen_labels must be error or drop, got 'keep'"):
        load_task(TaskSpec(**{**spec.__dict__, "unseen_labels": "keep"}))
