"""The multi-task setting: one adapter, one head per task, mixed batches, per-task metrics."""

import json

import pytest
import torch
from fixtures import write_glue, write_vision
from hydra import compose, initialize_config_module

from partial_lora import config
from partial_lora.errors import PlrError
from partial_lora.models import multitask
from partial_lora.models.classifier import Classifier
from partial_lora.pipeline.results import format_results
from partial_lora.pipeline.runner import run_pipeline
from partial_lora.report import build


def _cfg(*overrides):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", "task=multi", *overrides])


class _Linear(torch.nn.Module):
    """A stand-in backbone whose `logits` are a fixed linear map of `x` (8 outputs: 5 + 1 + 2)."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.nn.Linear(3, 8)

    def forward(self, x):
        return type("Out", (), {"logits": self.classifier(x)})()


def test_member_heads_are_slices_and_the_loss_is_each_rows_own():
    torch.manual_seed(0)
    members = [multitask.Member("a", 0, 5), multitask.Member("b", 5, 1, regression=True), multitask.Member("c", 6, 2)]
    model = multitask.MultiTask(Classifier(_Linear(), "hf-text", ["classifier"]), members)
    x = torch.randn(6, 3)
    batch = {"x": x, "task_id": torch.tensor([0, 1, 0, 2, 1, 0]),
             "labels": torch.tensor([4.0, 0.5, 1.0, 0.0, -1.0, 0.0])}
    out = model(batch)
    assert out.shape == (6, 8)
    full = model.inner.net.classifier(x)
    # Rows' losses: cross-entropy on their own 5-way slice, MSE on the score, CE on the 2-way slice.
    ce = torch.nn.functional.cross_entropy
    expected = (ce(full[[0, 2, 5], :5], torch.tensor([4, 1, 0]), reduction="sum")
                + ((full[[1, 4], 5] - torch.tensor([0.5, -1.0])) ** 2).sum()
                + ce(full[[3], 6:8], torch.tensor([0]), reduction="sum")) / 6
    assert model.loss(out, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    view = model.view(1)
    assert torch.equal(view({"x": x}), full[:, 5:6])
    assert model.view(0)({"x": x}).shape == (6, 5)


def test_mean_of_members_flattens_and_averages_main_metrics():
    members = [multitask.Member("cola", 0, 2, metrics=["mcc"], main="mcc"), multitask.Member("sst2", 2, 2)]
    out = multitask.mean_of_members([{"mcc": 0.4, "loss": 1.0}, {"accuracy": 0.9, "loss": 0.5}], members)
    assert out == {"cola_mcc": 0.4, "cola_loss": 1.0, "sst2_accuracy": 0.9, "sst2_loss": 0.5,
                   "mean": pytest.approx(0.65), "loss": 0.75}


@pytest.mark.parametrize("overrides, message", [
    (["task.names=[bbc-news,bbc-news]"], "twice"),
    (["task.names=[bbc-news,nope]"], "unknown task 'nope'"),
    (["task.names=[bbc-news,digits]"], "mixes image and text"),
    (["+task.colour=red", "task.names=[bbc-news]"], "unknown key task.colour"),
    (["task.names=[bbc-news]", "+task.members.sst2.path=/x"], "task.members.sst2 is not in task.names"),
])
def test_bad_multi_task_configs_fail_in_one_line(overrides, message):
    with pytest.raises(PlrError, match=message):
        config.validate(_cfg(*overrides))


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    glue = write_glue(root / "data", "sst2")
    cfg = _cfg("task.names=[bbc-news,sst2]", f"+task.members.sst2.path={glue}", "trainer.lr=0.02")
    config.validate(cfg)
    return cfg, root / "run", run_pipeline(cfg, root / "run", echo=lambda s: None)


def test_multi_task_run_trains_one_adapter_with_a_head_per_task(multi_run):
    cfg, run_dir, results = multi_run
    assert results["status"] == "complete" and results["main_metric"] == "mean"
    assert results["members"] == ["bbc-news", "sst2"]
    m = results["metrics"]
    for split in ("val", "test"):
        assert {f"{split}_bbc-news_accuracy", f"{split}_bbc-news_macro_f1", f"{split}_sst2_accuracy"} <= set(m)
        assert m[f"{split}_mean"] == pytest.approx((m[f"{split}_bbc-news_accuracy"] + m[f"{split}_sst2_accuracy"]) / 2)
    # One allocation from the union of the members' few-shot sets (4 + 4 per class, 5 + 2 classes).
    fewshot = json.loads((run_dir / "probe/fewshot.json").read_text())
    assert len(fewshot["train"]) == 4 * 7 and len(fewshot["val"]) == 4 * 7
    alloc = json.loads((run_dir / "allocate/allocation.json").read_text())
    assert len(alloc["layers"]) == 4 and alloc["a_ref"] is not None
    # One head per task: 5 + 2 outputs on the tiny BERT's 32-d features.
    assert results["params"]["head"] == 32 * 7 + 7
    text = format_results(results)
    assert "sst2 accuracy" in text and "mean" in text


def test_report_lists_each_member_and_the_mean(multi_run, tmp_path):
    _, run_dir, results = multi_run
    report = build([str(run_dir)])
    tasks = {(g.task, g.label) for g in report.groups}
    assert tasks == {("multi", "partial"), ("bbc-news", "partial [multi]"), ("sst2", "partial [multi]")}
    sst2 = report.group("sst2", "partial [multi]")
    assert sst2.stat("test_accuracy").mean == pytest.approx(results["metrics"]["test_sst2_accuracy"])
    assert report.group("multi", "partial").stat("test_mean").mean == pytest.approx(results["metrics"]["test_mean"])


def test_vision_multi_task_on_timm_fused_qkv(tmp_path):
    dtd = write_vision(tmp_path / "dtd", "dtd")
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke-vision", "task=multi", "task.names=[digits,dtd]",
                                           f"+task.members.dtd.path={dtd}", "+task.members.dtd.vtab_train=40",
                                           "+task.members.dtd.vtab_val=10", "adapter.sparsity=0.5"])
    config.validate(cfg)
    results = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    m = results["metrics"]
    assert m["test_mean"] == pytest.approx((m["test_digits_accuracy"] + m["test_dtd_accuracy"]) / 2)
    assert results["params"]["head"] == 32 * (10 + 47) + (10 + 47)  # one linear head per task on 32-d features
