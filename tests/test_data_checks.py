"""Degenerate data is refused at load (or dropped when the task says so), before any stage runs."""

import logging
import re

import datasets
import pytest
from fixtures import one_line

from partial_lora.data import TaskSpec, load_task
from partial_lora.errors import PlrError


def csv_dir(tmp_path, train, test):
    for name, rows in (("train", train), ("test", test)):
        datasets.Dataset.from_list(rows).to_csv(tmp_path / f"{name}.csv", index=False)
    return TaskSpec(name="toy", loader="hf-text", path=str(tmp_path), test_split="test", split_seed=0)


def rows(labels, text=lambda i: f"sample text {i}"):
    return [{"text": text(i), "label": y} for i, y in enumerate(labels)]


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
    with pytest.raises(PlrError,
                       match=rf"task.text_column='text' of split '(train|val)' row \d+ {re.escape(why)}") as e:
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


def image_folder(root, bad=None):
    """train/ and test/ of two classes of small PNGs; `bad(path)` may then spoil one file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 4)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return TaskSpec(name="pics", loader="hf-image", kind="image", path=str(root), data_format="imagefolder",
                    test_split="test", split_seed=0)


@pytest.mark.parametrize("spoil, why", [
    (lambda p: p.write_bytes(p.read_bytes()[:-30]), "image file is truncated"),
    (lambda p: p.write_bytes(b"this is no image"), "cannot identify image file"),
])
def test_an_image_that_does_not_decode_is_named_at_load_or_dropped(tmp_path, spoil, why, caplog):
    from partial_lora.data import checks

    spec = image_folder(tmp_path)
    bad = tmp_path / "test" / "dog" / "2.png"
    spoil(bad)
    with pytest.raises(PlrError) as e:
        load_task(spec)
    msg = one_line(e)
    assert msg.startswith(f"image '{bad}' does not decode (") and why in msg, msg
    assert "1 such rows in split 'test'" in msg and "task.bad_images=drop" in msg
    with caplog.at_level(logging.WARNING):
        data = load_task(TaskSpec(**{**spec.__dict__, "bad_images": "drop"}))
    assert len(data.test) == 7 and len(data.train) + len(data.val) == 20
    assert "dropped 1 rows of split 'test' whose image does not decode" in caplog.text
    assert all(im.size == (8, 8) for im in data.test["image"])  # the kept ones all decode
    assert any(not bad_rows for bad_rows in checks._DECODED.values())  # the clean splits are remembered
