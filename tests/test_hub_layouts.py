"""The Hub's real repo layouts, generated locally: a repo that still holds a loading script (read
from its `refs/convert/parquet` conversion), a partial conversion (refused), unlabelled rows (-1,
null, NaN; STS-B's hidden test scores), a label column at the wrong level of a hierarchy
(FGVC-Aircraft's families), and repos with splits a run never uses (never read).

The two functions of `data.source` that ask the Hub (`hub_builder`, `hub_files`) are pointed at a
local folder per revision, `<root>/<revision>/<repo id>/`; everything else is the code users run:
`datasets` resolves those folders exactly as it resolves a Hub repo, and refuses a loading script
with the same RuntimeError.
"""

import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
from fixtures import COMMONSENSE_FEATURES, cfg_of, commonsense_row, one_line, write_glue, write_vision

from partial_lora import config as plr_config
from partial_lora.data import TaskSpec, load_task, source
from partial_lora.errors import PlrError
from partial_lora.fetch import hub

datasets.disable_progress_bars()

NOT_PARQUET = b"not a parquet file: reading this split is a bug"


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


class FakeHub:
    """Hub repos as local folders `root/<revision>/<repo>`; records the data files each builder was given."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, str | None, dict | None]] = []

    def repo(self, repo: str, revision: str = "main") -> Path:
        path = self.root / revision.replace("/", "--") / repo
        path.mkdir(parents=True, exist_ok=True)
        return path

    def builder(self, repo, name, revision, data_files=None, features=None, config_id=None):
        self.calls.append((repo, revision, data_files))
        path = self.root / (revision or "main").replace("/", "--") / repo
        if not path.is_dir():
            raise FileNotFoundError(f"Revision '{revision}' doesn't exist for dataset '{repo}' on the Hub.")
        extra = {"config_id": config_id} if config_id else {}
        return datasets.load_dataset_builder(str(path), name, data_files=data_files, features=features, **extra)

    def files(self, repo, revision):
        path = self.root / revision.replace("/", "--") / repo
        return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    h = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(source, "hub_builder", h.builder)
    monkeypatch.setattr(source, "hub_files", h.files)
    return h


TEXT = datasets.Features(text=datasets.Value("string"), label=datasets.ClassLabel(names=["neg", "pos"]))


def write_text(path: Path, n: int, features: datasets.Features = TEXT, labels: list | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {"text": [f"{path.parent.name} sentence {i}" for i in range(n)],
            "label": labels if labels is not None else [i % 2 for i in range(n)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)


def unreadable(path: Path) -> None:
    """A split file that cannot be read: a load that touches it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(NOT_PARQUET)


# --- a repo that still holds a loading script -------------------------------------------------


def test_script_only_repo_is_read_from_the_parquet_conversion(fake_hub, caplog):
    # Rowan/hellaswag as it may still be on main: the script and a card, no data files.
    main = fake_hub.repo("Rowan/hellaswag")
    (main / "hellaswag.py").write_text("import datasets  # a loading script\n")
    (main / "README.md").write_text("---\nlicense: mit\n---\n")
    converted = fake_hub.repo("Rowan/hellaswag", source.CONVERTED)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("validation", 12)):
        rows = [commonsense_row("hellaswag", i, rng) for i in range(n)]
        out = converted / "default" / split / "0000.parquet"
        out.parent.mkdir(parents=True)
        datasets.Dataset.from_list(rows, features=COMMONSENSE_FEATURES["hellaswag"]).to_parquet(out)
    unreadable(converted / "default" / "test" / "0000.parquet")  # hidden labels, never used

    with caplog.at_level(logging.WARNING, logger="partial_lora.data.source"):
        data = load_task(plr_config.task_spec(cfg_of("task=hellaswag", "task.val_max=4")))
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 12)
    assert data.test[0]["prompt"].endswith("Answer:") and len(data.test[0]["choices"]) == 4
    lines = [r.getMessage() for r in caplog.records if r.name == "partial_lora.data.source"]
    assert len(lines) == 1
    assert "hellaswag.py" in lines[0] and "refs/convert/parquet" in lines[0] and "config default" in lines[0]
    # First main (which refused the script), then only the used splits of the conversion.
    assert [(rev, sorted(files or {})) for _, rev, files in fake_hub.calls] == [
        (None, []), (source.CONVERTED, ["train", "validation"])]


def test_script_repo_subset_is_mapped_to_the_converted_config(fake_hub, caplog):
    # A script's config `plain_text` is converted as `default`, the conversion's only config.
    (fake_hub.repo("someone/reviews") / "reviews.py").write_text("# script\n")
    converted = fake_hub.repo("someone/reviews", source.CONVERTED)
    write_text(converted / "default" / "train" / "0000.parquet", 30)
    write_text(converted / "default" / "test" / "0000.parquet", 10)
    spec = TaskSpec(name="reviews", loader="hf-text", path="someone/reviews", subset="plain_text", test_split="test")
    with caplog.at_level(logging.WARNING, logger="partial_lora.data.source"):
        data = load_task(spec)
    assert len(data.test) == 10 and data.label_names == ["neg", "pos"]
    assert "task.subset='plain_text' is converted as 'default'" in caplog.text


def test_converted_config_is_chosen_by_subset_and_an_unknown_one_is_refused(fake_hub):
    (fake_hub.repo("allenai/winogrande") / "winogrande.py").write_text("# script\n")
    converted = fake_hub.repo("allenai/winogrande", source.CONVERTED)
    for config, n in (("winogrande_xl", 30), ("winogrande_debiased", 20)):
        write_text(converted / config / "train" / "0000.parquet", n)
        write_text(converted / config / "validation" / "0000.parquet", 8)
    spec = TaskSpec(name="w", loader="hf-text", path="allenai/winogrande", subset="winogrande_xl",
                    test_split="validation", val_fraction=0.2)
    data = load_task(spec)
    assert len(data.train) + len(data.val) == 30
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(**{**spec.__dict__, "subset": "winogrande_m"}))
    msg = one_line(e)
    assert "task.subset='winogrande_m'" in msg and "winogrande_xl" in msg and "winogrande_debiased" in msg


def test_partial_conversion_is_refused(fake_hub):
    (fake_hub.repo("big/corpus") / "corpus.py").write_text("# script\n")
    converted = fake_hub.repo("big/corpus", source.CONVERTED)
    write_text(converted / "default" / "partial-train" / "0000.parquet", 30)
    write_text(converted / "default" / "test" / "0000.parquet", 10)
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(name="c", loader="hf-text", path="big/corpus", test_split="test"))
    msg = one_line(e)
    assert "partial-train" in msg and "truncate" in msg and "task.path=<local dir>" in msg


def test_partial_conversion_downloaded_locally_is_refused(tmp_path):
    write_text(tmp_path / "default" / "partial-train" / "0000.parquet", 30)
    write_text(tmp_path / "default" / "test" / "0000.parquet", 10)
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(name="c", loader="hf-text", path=str(tmp_path), test_split="test"))
    assert "partial-train" in one_line(e)


def test_local_copy_of_a_script_only_repo_says_how_to_get_the_data(tmp_path):
    root = tmp_path / "hellaswag"
    root.mkdir()
    (root / "hellaswag.py").write_text("# script\n")
    (root / "README.md").write_text("# card\n")
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(name="h", loader="hf-text", path=str(root)))
    msg = one_line(e)
    assert "hellaswag.py" in msg and "--revision refs/convert/parquet" in msg


# --- unlabelled rows ---------------------------------------------------------------------------


def test_stsb_test_scores_of_minus_one_are_dropped_and_an_empty_split_is_refused(tmp_path, caplog):
    root = write_glue(tmp_path, "stsb")  # its test split is all -1.0, as on the Hub
    with pytest.raises(PlrError) as e:
        load_task(plr_config.task_spec(cfg_of("task=stsb", f"task.path={root}", "task.test_split=test")))
    assert "task.test_split='test' has no labelled examples" in one_line(e)
    # Partly labelled: the -1.0 rows go, with one warning giving the count.
    features = datasets.Features(sentence1=datasets.Value("string"), sentence2=datasets.Value("string"),
                                 label=datasets.Value("float32"), idx=datasets.Value("int32"))
    scores = [-1.0, 2.5, -1.0, 4.0, float("nan"), None, 0.0, 5.0]
    rows = {"sentence1": ["a"] * 8, "sentence2": ["b"] * 8, "label": scores, "idx": list(range(8))}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(root / "stsb" / "test-00000-of-00001.parquet")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="partial_lora.data.columns"):
        data = load_task(plr_config.task_spec(cfg_of("task=stsb", f"task.path={root}", "task.test_split=test")))
    assert sorted(data.test["label"]) == [0.0, 2.5, 4.0, 5.0]
    warnings = [r.getMessage() for r in caplog.records if r.name == "partial_lora.data.columns"]
    assert len(warnings) == 1 and "dropped 4 unlabelled rows" in warnings[0] and "4 of 8 in test" in warnings[0]


def test_regression_keeps_a_score_of_minus_one_unless_the_task_says_so(tmp_path):
    path = tmp_path / "scores.csv"
    datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(20)],
                                "score": [-1.0, 1.0, -0.5, 0.5] * 5}).to_csv(path, index=False)
    spec = TaskSpec(name="s", loader="hf-text", path=str(path), label_column="score", regression=True)
    data = load_task(spec)
    assert len(data.train) + len(data.val) + len(data.test) == 20
    data = load_task(TaskSpec(**{**spec.__dict__, "unlabelled_value": -1}))
    assert len(data.train) + len(data.val) + len(data.test) == 15


def test_classification_drops_minus_one_and_null_from_every_split_with_one_warning(tmp_path, caplog):
    write_text(tmp_path / "data" / "train-00000-of-00001.parquet", 20, labels=[i % 2 for i in range(19)] + [-1])
    write_text(tmp_path / "data" / "test-00000-of-00001.parquet", 10, labels=[-1, None, 0, 1, 0, 1, 0, 1, -1, 1])
    with caplog.at_level(logging.WARNING, logger="partial_lora.data.columns"):
        data = load_task(TaskSpec(name="t", loader="hf-text", path=str(tmp_path), test_split="test"))
    assert len(data.train) + len(data.val) == 19 and len(data.test) == 7
    warnings = [r.getMessage() for r in caplog.records if r.name == "partial_lora.data.columns"]
    assert len(warnings) == 1 and "dropped 4 unlabelled rows" in warnings[0]
    assert "1 of 20 in train" in warnings[0] and "3 of 10 in test" in warnings[0]


def test_another_negative_class_id_needs_task_unlabelled_value(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(f'{{"text": "t{i}", "label": {[0, 1, -2][i % 3]}}}\n' for i in range(30)))
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(name="t", loader="hf-text", path=str(path)))
    assert "task.unlabelled_value=-2" in one_line(e)
    data = load_task(TaskSpec(name="t", loader="hf-text", path=str(path), unlabelled_value=-2))
    assert data.label_names == ["0", "1"] and len(data.train) + len(data.val) + len(data.test) == 20


# --- the label column's class count ------------------------------------------------------------


def test_aircraft_reads_the_100_variants_and_a_family_column_is_refused(tmp_path):
    root = write_vision(tmp_path, "aircraft")
    data = load_task(plr_config.task_spec(cfg_of("task=aircraft", f"task.path={root}", "task.vtab_train=40",
                                                 "task.vtab_val=10")))
    assert data.num_labels == 100
    with pytest.raises(PlrError) as e:
        load_task(plr_config.task_spec(cfg_of("task=aircraft", f"task.path={root}", "task.label_column=label",
                                              "task.vtab_train=40", "task.vtab_val=10")))
    msg = one_line(e)
    assert "task.num_labels=100 but the data has 70 labels" in msg and "task.label_column='label'" in msg


def test_every_classification_benchmark_names_its_class_count():
    from fixtures import GLUE, VISION

    for task, spec in VISION.items():
        assert cfg_of(f"task={task}").task.num_labels == spec[3], task
    for task, (_, names, _) in GLUE.items():
        if names is not None:
            assert cfg_of(f"task={task}").task.num_labels == len(names), task
    assert cfg_of("task=stsb").task.unlabelled_value == -1
    with pytest.raises(PlrError, match="task.num_labels must be a positive number"):
        plr_config.task_spec(cfg_of("task=cars", "task.num_labels=0"))


# --- splits a run never uses are never read ---------------------------------------------------

CORRUPTIONS = ("contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "spatter")


def write_cars_repo(root: Path) -> Path:
    """tanganke/stanford_cars's layout: train and test, plus seven corrupted copies of test (unreadable here)."""
    write_vision(root, "cars")
    for split in CORRUPTIONS:
        unreadable(root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_unused_splits_of_a_local_hub_layout_are_not_read(tmp_path):
    root = write_cars_repo(tmp_path / "cars")
    data = load_task(plr_config.task_spec(cfg_of("task=cars", f"task.path={root}", "task.vtab_train=40",
                                                 "task.vtab_val=10")))
    assert (len(data.train), len(data.test), data.num_labels) == (40, 20, 196)
    svhn = write_vision(tmp_path / "svhn", "svhn")
    unreadable(svhn / "cropped_digits" / "extra-00000-of-00001.parquet")
    data = load_task(plr_config.task_spec(cfg_of("task=svhn", f"task.path={svhn}", "task.vtab_train=40",
                                                 "task.vtab_val=10")))
    assert len(data.test) == 20
    # protocol=vtab1k draws val from train, so aircraft's own `val` split is not read either.
    aircraft = write_vision(tmp_path / "aircraft", "aircraft")
    unreadable(aircraft / "data" / "val-00000-of-00001.parquet")
    load_task(plr_config.task_spec(cfg_of("task=aircraft", f"task.path={aircraft}", "task.vtab_train=40",
                                          "task.vtab_val=10")))


def test_unused_splits_of_a_hub_repo_are_not_downloaded(fake_hub):
    write_cars_repo(fake_hub.repo("tanganke/stanford_cars"))
    data = load_task(plr_config.task_spec(cfg_of("task=cars", "task.vtab_train=40", "task.vtab_val=10")))
    assert (len(data.train), len(data.test)) == (40, 20)
    (_, _, first), (_, _, second) = fake_hub.calls
    assert first is None and sorted(second) == ["test", "train"]  # resolved all nine, built from two


def test_unused_split_of_an_inferred_local_folder_is_not_read(tmp_path):
    for split, n in (("train", 30), ("test", 10)):
        datasets.Dataset.from_dict({"text": [f"{split} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}
                                   ).to_csv(tmp_path / f"{split}.csv", index=False)
    (tmp_path / "validation.csv").write_text('text,label\n"unterminated,0\n')  # unreadable
    data = load_task(TaskSpec(name="t", loader="hf-text", path=str(tmp_path), data_format="csv", test_split="test"))
    assert len(data.test) == 10
    with pytest.raises(PlrError) as e:
        load_task(TaskSpec(name="t", loader="hf-text", path=str(tmp_path), data_format="csv", test_split="dev"))
    assert "task.test_split='dev'" in one_line(e) and "validation" in one_line(e)


def test_offline_rerun_reads_the_splits_an_online_run_prepared(fake_hub, monkeypatch):
    write_cars_repo(fake_hub.repo("stanford_cars"))
    spec = plr_config.task_spec(cfg_of("task=cars", "task.path=stanford_cars", "task.vtab_train=40",
                                       "task.vtab_val=10"))
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    online = load_task(spec)

    def no_hub(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stanford_cars' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(source, "hub_builder", no_hub)
    offline = load_task(spec)
    assert offline.test["label"] == online.test["label"] and len(offline.train) == 40
    with pytest.raises(PlrError) as e:  # a split that was never prepared is not in the cache
        load_task(plr_config.task_spec(cfg_of("task=cars", "task.path=stanford_cars", "task.test_split=contrast")))
    assert "not in the local cache" in one_line(e)
