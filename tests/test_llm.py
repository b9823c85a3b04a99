"""Causal LMs: choice scoring by log-likelihood, answer-only LM loss, the pipeline on tiny-llama."""

import json

import pytest
import torch
from fixtures import write_commonsense
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from partial_lora import config
from partial_lora.commands.overrides import CONF_DIR
from partial_lora.data.collate import ChoiceCollate
from partial_lora.errors import PlrError
from partial_lora.models.backbones import ModelSpec, build_model
from partial_lora.models.causal_lm import CausalLM
from partial_lora.pipeline.runner import run_pipeline
from partial_lora.training.metrics import compute_metrics
from partial_lora.training.predict import predict

ROWS = [
    {"prompt": "Question: Which gas do plants take in?\nChoices: (A) oxygen (B) carbon dioxide (C) helium\nAnswer:",
     "choices": ["oxygen", "carbon dioxide", "helium"], "label": 1},
    {"prompt": "Is the sky blue?\nAnswer:", "choices": ["yes", "no"], "label": 0},
]


def _brute_force(model: CausalLM, tok, row, scoring):
    """Each choice's answer log-likelihood from the full vocabulary logits, one sequence at a time."""
    out = []
    for choice in row["choices"]:
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = model.net(input_ids=ids).logits.log_softmax(-1)[0]
        lp = sum(logp[len(prompt) + k - 1, t].item() for k, t in enumerate(answer))
        out.append(lp / len(answer) if scoring == "mean" else lp)
    return out


@pytest.mark.parametrize("scoring", ["sum", "mean"])
def test_choice_scores_are_the_answers_log_likelihood(llm, scoring):
    model, tok = llm
    model.scoring = scoring
    batch = ChoiceCollate(tok, 96, train=False)(ROWS)
    with torch.no_grad():
        scores = model(batch)
    assert scores.shape == (2, 5)  # padded to the widest task's 5 choices
    for i, row in enumerate(ROWS):
        expected = _brute_force(model, tok, row, scoring)
        assert scores[i, :len(expected)].tolist() == pytest.approx(expected, abs=1e-4)
        assert torch.isinf(scores[i, len(expected):]).all()
    model.scoring = "sum"


def test_the_scorer_picks_the_choice_the_lm_clearly_prefers(llm):
    model, tok = llm
    good = tok(" helium", add_special_tokens=False)["input_ids"]
    head = torch.nn.Linear(32, model.net.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[good] = 8.0  # the LM strongly expects these tokens next, whatever the prompt
    saved = model.net.get_output_embeddings()
    model.net.set_output_embeddings(head)
    try:
        rows = [{**ROWS[0], "label": 2},
                {"prompt": "Pick one.\nAnswer:", "choices": ["yes", "helium", "no"], "label": 1}]
        logits, labels, _ = predict(model, [ChoiceCollate(tok, 96, train=False)(rows)], torch.device("cpu"))
        assert logits.argmax(-1).tolist() == [2, 1]
        assert compute_metrics(logits, labels, ["accuracy"])["accuracy"] == 1.0
    finally:
        model.net.set_output_embeddings(saved)


def test_training_loss_covers_only_the_gold_answer_tokens(llm):
    model, tok = llm
    batch = ChoiceCollate(tok, 96, train=True)(ROWS)
    labels = batch["labels"]
    gold = [tok(" " + r["choices"][r["label"]], add_special_tokens=False)["input_ids"] for r in ROWS]
    for i, ids in enumerate(gold):
        kept = labels[i][labels[i] != -100].tolist()
        assert kept == ids  # the answer's tokens and nothing else (no prompt, no padding)
    loss = model(batch)
    with torch.no_grad():
        logits = model.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.loss(loss, batch) is loss
    # Changing prompt tokens' targets cannot matter: they are not targets.
    assert (labels[:, :3] == -100).all()


def test_eval_loss_is_the_gold_answers_nll_per_token(llm):
    model, tok = llm
    batch = ChoiceCollate(tok, 96, train=False)(ROWS)
    with torch.no_grad():
        scores = model(batch)
    n = [len(tok(" " + r["choices"][r["label"]], add_special_tokens=False)["input_ids"]) for r in ROWS]
    expected = -(scores[0, 1] + scores[1, 0]) / sum(n)
    assert model.loss(scores, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def _cfg(*overrides):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", "model=tiny-llama", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["task=bbc-news"],
     r"task bbc-news on a causal LM needs task.prompt \(a template with \{text\}\) and task.verbalizer"),
    (["task=cifar10"], r"cannot run task .cifar10. \(image\): a causal LM answers multiple-choice tasks .* and text "
                       "classification tasks that give task.prompt and task.verbalizer"),
    (["model=tiny-bert", "task=boolq"], "multiple-choice tasks need a causal LM"),
    (["task=boolq", "+task.scoring=max"], "task.scoring must be sum or mean"),
    (["task=boolq", "adapter.allocation.metric=loss", "adapter.allocation.relative_to=probe"], "relative_to=gain"),
    (["task=boolq", "adapter.allocation.metric=f1"], "metric must be task or loss"),
    (["task=boolq", "adapter.allocation.replay_mb=-1"], "replay_mb must be >= 0"),
    (["task=boolq", "+model.dtype=bf16"], "model.dtype='bf16' is not a torch dtype"),
])
def test_bad_llm_inputs_fail_in_one_line(overrides, message):
    with pytest.raises(PlrError, match=message):
        cfg = _cfg(*overrides)
        config.validate(cfg)
        config.allocation_config(cfg)


def test_five_stages_on_tiny_llama(tmp_path):
    data = write_commonsense(tmp_path / "arc", "arc-e")
    cfg = _cfg("task=arc-e", f"task.path={data}", "trainer.lr=0.01")
    config.validate(cfg)
    results = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    assert results["status"] == "complete" and results["model"] == "tiny-llama"
    assert 0 <= results["metrics"]["test_accuracy"] <= 1 and results["params"]["head"] == 0
    assert 0 < results["params"]["adapter"] < results["params"]["dense_lora_same_rank"]
    alloc = json.loads((tmp_path / "run/allocate/allocation.json").read_text())
    assert alloc["metric"] == "task" and alloc["relative_to"] == "probe"
    assert {la["name"].rsplit(".", 1)[-1] for la in alloc["layers"]} == {"q_proj", "v_proj"}


def test_multi_task_commonsense_with_loss_allocation(tmp_path):
    arc, boolq = write_commonsense(tmp_path / "arc", "arc-e"), write_commonsense(tmp_path / "boolq", "boolq")
    cfg = _cfg("task=multi", "task.names=[arc-e,boolq]", f"+task.members.arc-e.path={arc}",
               f"+task.members.boolq.path={boolq}", "adapter.allocation.metric=loss", "adapter.probe.shots=3",
               "adapter.probe.val_shots=3", "trainer.lr=0.01")
    config.validate(cfg)
    results = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    m = results["metrics"]
    assert results["members"] == ["arc-e", "boolq"]
    assert m["test_mean"] == pytest.approx((m["test_arc-e_accuracy"] + m["test_boolq_accuracy"]) / 2)
    alloc = json.loads((tmp_path / "run/allocate/allocation.json").read_text())
    # A loss target: keep tau of the probe's loss improvement over no adapter (the gain form).
    assert alloc["metric"] == "loss" and alloc["relative_to"] == "gain"
    assert alloc["target"] == pytest.approx(alloc["a_0"] + 0.9 * (alloc["a_ref"] - alloc["a_0"]))
    for la in alloc["layers"]:
        kept = la["tried"].get(str(la["ratio"]))
        if kept is not None:  # the ratio a layer got passed the loss test when it was tried
            assert kept <= alloc["target"] + 1e-9
    assert all(v > 0 for v in [alloc["a_ref"], alloc["a_0"]])  # losses, not accuracies


def test_gradient_checkpointing_gives_the_same_gradients():
    spec = ModelSpec(**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny-llama.yaml")))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        built = build_model(spec.__class__(**{**spec.__dict__, "gradient_checkpointing": checkpointing}), 5)
        model = built.model.train()
        for n, p in model.net.named_parameters():
            p.requires_grad_("q_proj" in n)  # a stand-in for the adapter: some inner weights train
        model(ChoiceCollate(built.tokenizer, 96, train=True)(ROWS)).backward()
        grads.append({n: p.grad.clone() for n, p in model.net.named_parameters() if p.grad is not None})
        assert model.net.is_gradient_checkpointing == checkpointing
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def _write_generation(path, n=120):
    rows = [{"prompt": f"Question {i}: what colour is item {i}?", "response": "the colour is blue"} for i in range(n)]
    rows += [{"prompt": "no answer here", "response": ""}, {"prompt": "nor here", "response": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_generation_task_loads_prompt_response_rows(tmp_path):
    from partial_lora.data import load_task

    data = _write_generation(tmp_path / "gen.jsonl")
    cfg = _cfg("task=hf-generation", f"task.path={data}", "task.max_train_samples=null", "task.max_eval_samples=null")
    config.validate(cfg)
    task = load_task(config.task_spec(cfg))
    assert task.kind == "choice" and task.label_names == ["response"]
    assert len(task.train) + len(task.val) + len(task.test) == 120  # the two rows without a response dropped
    row = task.train[0]
    assert row["choices"] == ["the colour is blue"] and row["label"] == 0 and row["prompt"].startswith("Question")
    with pytest.raises(PlrError, match="task.response_column='answer' is not a column"):
        load_task(config.task_spec(_cfg("task=hf-generation", f"task.path={data}", "task.response_column=answer")))


def test_generative_fine_tuning_allocates_on_the_few_shot_loss(tmp_path):
    data = _write_generation(tmp_path / "gen.jsonl")
    cfg = _cfg("task=hf-generation", f"task.path={data}", "adapter.allocation.metric=loss", "trainer.lr=0.05",
               "adapter.probe.epochs=5")
    config.validate(cfg)
    results = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    assert results["main_metric"] == "log_likelihood" and results["metrics"]["test_log_likelihood"] < 0
    alloc = json.loads((tmp_path / "run/allocate/allocation.json").read_text())
    assert alloc["metric"] == "loss" and alloc["a_ref"] < alloc["a_0"]  # the probe learned: lower few-shot loss
    assert alloc["joint_accuracy"] <= alloc["target"] < alloc["a_0"]  # the allocation keeps tau of that gain
    assert results["params"]["adapter"] < results["params"]["dense_lora_same_rank"]
