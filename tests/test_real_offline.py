"""The real fetched data and Gemma 3 270M (slow; each skips only when `plr fetch` has not been run)."""

import pytest
import torch
from hydra import compose, initialize_config_module

from partial_lora import config
from partial_lora.fetch import cache
from partial_lora.working_set.data import load_data

pytestmark = pytest.mark.slow


def needs(source):
    if cache.check_entry(cache.resolve(source)) is None:
        pytest.skip(f"`plr fetch {source}` has not been run (cache {cache.cache_root()})")


def _data(*overrides):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return load_data(config.validate(compose("config", overrides=list(overrides))))


@pytest.mark.parametrize("task, sizes", [
    ("rt-polarity", (800, 200, 2550)),
    ("vader-movies", (800, 200, 2113)),
    ("vader-movies-score", (800, 200, 2121)),
    ("vader-tweets", (800, 200, 839)),
    ("debates-speaker", (738, 106, 211)),
])
def test_real_split_sizes_are_the_ones_the_yaml_states(task, sizes):
    needs(cache.resolve(task).name)
    data = _data(f"task={task}")
    assert (len(data.train), len(data.val), len(data.test)) == sizes
    if task == "rt-polarity":
        movies = [set(d["movie_name"]) for d in (data.train, data.val, data.test)]
        assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
        full = _data(f"task={task}", "task.protocol=full")
        assert (len(full.train), len(full.val), len(full.test)) == (8903, 1299, 2550)


@pytest.fixture(scope="module")
def gemma():
    needs("gemma3-270m")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache.require("gemma3-270m", what="test")
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_gemma_tokenizer_splits_prompt_and_answer_as_the_brute_force_scorer(gemma):
    from partial_lora.data.collate import ChoiceCollate

    _, tok = gemma
    data = _data("model=gemma3-270m", "task=rt-polarity")
    rows = [data.test[i] for i in range(6)]
    collate = ChoiceCollate(tok, 128, shared_prompt=False)
    batch = collate(rows)
    for i, row in enumerate(rows):
        for j, choice in enumerate(row["choices"]):
            # The brute-force scorer: the tokenizer's own encoding of prompt + " answer", BOS included.
            full = tok(f"{row['prompt']} {choice}")["input_ids"]
            prompt = tok(row["prompt"])["input_ids"]
            assert full[0] == tok.bos_token_id == 2 and full[:len(prompt)] == prompt
            k = i * 2 + j
            ids = batch["input_ids"][k][batch["attention_mask"][k].bool()].tolist()
            assert ids == full  # BOS + prompt + answer, nothing more (these prompts fit in 128)
            assert batch["input_ids"][k][batch["target_mask"][k]].tolist() == full[len(prompt):]
            assert len(full) - len(prompt) == 1  # " negative" / " positive" are one token each


def test_gemma_one_row_scores_equal_the_row_per_choice_scores(gemma):
    from partial_lora.data.collate import ChoiceCollate
    from partial_lora.models.causal_lm import CausalLM

    net, tok = gemma
    model = CausalLM(net, 2)
    data = _data("model=gemma3-270m", "task=rt-polarity")
    rows = [data.test[i] for i in range(4)]
    with torch.no_grad():
        fast = model(ChoiceCollate(tok, 128)(rows))
        slow = model(ChoiceCollate(tok, 128, shared_prompt=False)(rows))
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_gemma_knows_its_language(gemma):
    net, tok = gemma

    def loss(text):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return net(input_ids=ids, labels=ids).loss.item()

    sentence = "The quick brown fox jumps over the lazy dog near the river bank."
    shuffled = "river fox near the lazy quick bank dog jumps over brown the The."
    assert loss(sentence) < loss(shuffled) - 2
