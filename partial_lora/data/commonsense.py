"""`choice`: multiple-choice tasks (the "commonsense-8" of LLM-Adapters / DoRA) for causal LMs.

BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge and OpenBookQA each have their
own Hub schema; `FORMATS` turns a raw row of each into one standard row, so everything downstream
(splitting, batching, scoring) is shared:

- `prompt`: [ours] one layout for every task, ending in "Answer:" (no trailing space)::

      <context or passage, when the task has one>
      Question: <question>
      Choices: (A) <first> (B) <second> ...
      Answer:

- `choices`: the answer texts, scored as continuations " <choice>" of the prompt.
- `label`: index of the gold choice. Unlabelled rows (hidden test labels: -1 or "") are dropped.

`ChoiceCollate` builds the batches: the gold continuation as LM targets for training, and every
choice as its own row for evaluation, where the model's (length-normalised or summed)
log-likelihood of each continuation picks the answer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import pyarrow.compute as pc
import torch

from partial_lora.data.base import TaskData, TaskSpec
from partial_lora.data.columns import drop_unlabelled
from partial_lora.data.source import load_source
from partial_lora.data.split import task_data
from partial_lora.errors import PlrError

Formatted = tuple[str, list[str], int | None]
Batch = dict[str, torch.Tensor]

FEATURES = datasets.Features({"prompt": datasets.Value("string"),
                              "choices": datasets.List(datasets.Value("string")),
                              "label": datasets.Value("int64")})
_UNLABELLED = -1  # the map's stand-in for "no gold label", filtered out right after


def build_prompt(question: str, choices: Sequence[str], context: str | None = None) -> str:
    """The one prompt layout of every task: [context line], question line, choices line, "Answer:".

    The choices are listed with letters so the model sees all options before scoring one; the
    scored continuation is the choice text itself, never the letter.
    """
    lines = [context.strip()] if context and context.strip() else []
    lines.append(f"Question: {question.strip()}")
    lines.append("Choices: " + " ".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices)))
    lines.append("Answer:")
    return "\n".join(lines)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _checked(label: int | None, choices: list[str], fmt: str) -> int | None:
    """A gold index inside the choices, or None; anything else is corrupt data, not "unlabelled"."""
    if label is not None and not 0 <= label < len(choices):
        raise PlrError(f"a {fmt} row has label {label} but only {len(choices)} choices; task.path does not hold "
                       f"{fmt} data in its Hub schema (check task.path, task.subset and task.format)")
    return label


def _one_based(value: Any, fmt: str) -> int | None:
    """SIQA's "1".."3" and WinoGrande's "1"/"2" as a 0-based index; "" (hidden test label) is None."""
    text = _text(value)  # strip: old SIQA copies carry "1\n"
    if not text:
        return None
    if not text.isdigit():
        raise PlrError(f"a {fmt} row has the answer '{text}', not a 1-based choice number; check that task.path "
                       f"holds {fmt} data and task.format={fmt} is right")
    return int(text) - 1


def _keyed(choices: Mapping[str, Sequence[str]], key: Any, fmt: str) -> tuple[list[str], int | None]:
    """ARC / OpenBookQA: `choices: {text, label}` and an `answerKey` that is one of those labels.

    ARC mixes letter keys ("A".."E") and digit keys ("1".."5"); looking the key up in the row's
    own label list handles both. An empty key is an unlabelled row.
    """
    texts = [_text(t) for t in choices["text"]]
    labels = [_text(lab) for lab in choices["label"]]
    key = _text(key)
    if not key:
        return texts, None
    if key not in labels:
        raise PlrError(f"a {fmt} row has answerKey '{key}', which is none of its choice labels {labels}; check that "
                       f"task.path holds {fmt} data and task.format is right")
    return texts, labels.index(key)


def format_boolq(row: Mapping[str, Any]) -> Formatted:
    """google/boolq: passage as context; `answer` True -> "yes" (0), False -> "no" (1)."""
    question = _text(row["question"])
    question = question[:1].upper() + question[1:]  # [ours] BoolQ questions are lower-case, without "?"
    if not question.endswith("?"):
        question += "?"
    choices = ["yes", "no"]
    answer = row["answer"]
    label = None if answer is None else (0 if answer else 1)
    return build_prompt(question, choices, _text(row["passage"])), choices, label


def format_piqa(row: Mapping[str, Any]) -> Formatted:
    """ybisk/piqa: the `goal` is the question, `sol1`/`sol2` the choices; test labels are -1."""
    choices = [_text(row["sol1"]), _text(row["sol2"])]
    label = row["label"]
    label = None if label is None or int(label) < 0 else int(label)
    return build_prompt(_text(row["goal"]), choices), choices, _checked(label, choices, "piqa")


def format_siqa(row: Mapping[str, Any]) -> Formatted:
    """allenai/social_i_qa: `context` + `question`, answers A/B/C, `label` the string "1".."3"."""
    choices = [_text(row["answerA"]), _text(row["answerB"]), _text(row["answerC"])]
    label = _checked(_one_based(row["label"], "siqa"), choices, "siqa")
    return build_prompt(_text(row["question"]), choices, _text(row["context"])), choices, label


_BRACKETED = re.compile(r"\[[^\]]*\]")


def clean_hellaswag(text: str) -> str:
    """Remove the WikiHow markup left in HellaSwag (`[title]`, `[header]`, `[step]` ...).

    Same rules as lm-evaluation-harness, so prompts match what the literature scores: " [title]"
    becomes a sentence break, other bracketed tags go, double spaces become single. [ours] The
    result is stripped at both ends (a choice must not start with a space: one is added when it
    is scored).
    """
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ").strip()


def format_hellaswag(row: Mapping[str, Any]) -> Formatted:
    """Rowan/hellaswag: "<activity>: <ctx_a> <Ctx_b>" as the context, the 4 `endings` as choices.

    [ours] Only the first letter of `ctx_b` is upper-cased (lm-evaluation-harness's
    `str.capitalize` also lower-cases the rest). `label` is a string; "" on the test split.
    """
    ctx_b = _text(row["ctx_b"])
    context = f"{_text(row['activity_label'])}: {_text(row['ctx_a'])} {ctx_b[:1].upper() + ctx_b[1:]}"
    choices = [clean_hellaswag(e) for e in row["endings"]]
    label_text = _text(row["label"])
    if label_text and not label_text.isdigit():
        raise PlrError(f"a hellaswag row has the label '{label_text}', not a choice index; check that task.path "
                       f"holds hellaswag data and task.format=hellaswag is right")
    label = int(label_text) if label_text else None
    prompt = build_prompt("How does it continue?", choices, clean_hellaswag(context))
    return prompt, choices, _checked(label, choices, "hellaswag")


def format_winogrande(row: Mapping[str, Any]) -> Formatted:
    """allenai/winogrande: the sentence with its "_" as context, `option1`/`option2`, `answer` "1"/"2"."""
    choices = [_text(row["option1"]), _text(row["option2"])]
    label = _checked(_one_based(row["answer"], "winogrande"), choices, "winogrande")
    return build_prompt("Which option fills the blank (_)?", choices, _text(row["sentence"])), choices, label


def format_arc(row: Mapping[str, Any]) -> Formatted:
    """allenai/ai2_arc (ARC-Easy / ARC-Challenge): 3 to 5 choices, letter or digit answer keys."""
    choices, label = _keyed(row["choices"], row["answerKey"], "arc")
    return build_prompt(_text(row["question"]), choices), choices, label


def format_obqa(row: Mapping[str, Any]) -> Formatted:
    """allenai/openbookqa (config `main`): `question_stem`, 4 keyed choices, `answerKey` A-D."""
    choices, label = _keyed(row["choices"], row["answerKey"], "obqa")
    return build_prompt(_text(row["question_stem"]), choices), choices, label


FORMATS: dict[str, Callable[[Mapping[str, Any]], Formatted]] = {
    "boolq": format_boolq,
    "piqa": format_piqa,
    "siqa": format_siqa,
    "hellaswag": format_hellaswag,
    "winogrande": format_winogrande,
    "arc": format_arc,
    "obqa": format_obqa,
}

# The raw columns each format reads, checked up front so a wrong dataset fails with one line.
COLUMNS: dict[str, tuple[str, ...]] = {
    "boolq": ("question", "answer", "passage"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "siqa": ("context", "question", "answerA", "answerB", "answerC", "label"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "arc": ("question", "choices", "answerKey"),
    "obqa": ("question_stem", "choices", "answerKey"),
}


def _format_batch(batch: dict[str, list[Any]], fmt: str) -> dict[str, list[Any]]:
    """`datasets.map` body: raw rows -> prompt/choices/label (-1 marks an unlabelled row)."""
    formatter = FORMATS[fmt]
    out: dict[str, list[Any]] = {"prompt": [], "choices": [], "label": []}
    for values in zip(*batch.values(), strict=True):
        prompt, choices, label = formatter(dict(zip(batch, values, strict=True)))
        out["prompt"].append(prompt)
        out["choices"].append(choices)
        out["label"].append(_UNLABELLED if label is None else label)
    return out


def _check_columns(spec: TaskSpec, fmt: str, split: str, ds: datasets.Dataset) -> None:
    for column in COLUMNS[fmt]:
        if column not in ds.column_names:
            raise PlrError(f"task.format={fmt} reads column '{column}', which split '{split}' of "
                           f"task.path='{spec.path}' lacks (columns: {', '.join(ds.column_names)}); point task.path "
                           f"(and task.subset/task.revision) at the {fmt} data or set task.format=<its format>")


def _max_choices(dd: Mapping[str, datasets.Dataset]) -> int:
    """The most choices any row has, read from Arrow (no Python loop over the rows)."""
    most = 0
    for ds in dd.values():
        if len(ds):
            most = max(most, pc.max(pc.list_value_length(ds.with_format("arrow")["choices"])).as_py())
    return most


def load_choice(spec: TaskSpec) -> TaskData:
    """Load a multiple-choice task as `prompt` / `choices` / `label` rows (see the module docstring).

    `label_names` are "0".."C-1" for the largest choice count C over all splits (ARC: 5), so
    `num_labels` bounds every label.

    Raises:
        PlrError: an unknown `task.format`, a raw column that format needs but the data lacks,
            labels outside the choices, or any problem `load_source` / the split policy reports.
    """
    fmt = spec.format
    if fmt not in FORMATS:
        raise PlrError(f"task.format={fmt!r} is not a multiple-choice format (task '{spec.name}', loader choice); "
                       f"set task.format=<one of: {', '.join(FORMATS)}>")
    formatted = {}
    for split, ds in load_source(spec).items():
        _check_columns(spec, fmt, split, ds)
        ds = ds.map(functools.partial(_format_batch, fmt=fmt), batched=True, remove_columns=ds.column_names,
                    features=FEATURES, desc=f"formatting {spec.name}/{split}")
        formatted[split] = ds
    formatted = drop_unlabelled(datasets.DatasetDict(formatted), _UNLABELLED)
    most = _max_choices(formatted)
    if most == 0:
        raise PlrError(f"task '{spec.name}' has no labelled rows in any split of task.path='{spec.path}'; point "
                       f"task.path at the {fmt} data")
    return task_data(spec, "choice", formatted, [str(i) for i in range(most)])


class ChoiceCollate:
    """Tokenise `prompt` + " <choice>" for a causal LM, dynamically padded on the right.

    The answer's tokens are what tokenising prompt + " <choice>" adds after the prompt's tokens
    (see `_answers`), so that the prompt's tokens are identical for every choice and the answer
    carries no stray prefix token. The prompt gets the tokenizer's BOS (when it has one) in front. A sequence longer
    than `max_length` loses the start of its prompt (the BOS stays): the question and the answer,
    at the end, are what the prediction depends on. An answer longer than `max_length` on its own
    keeps its beginning.

    Args:
        tokenizer: a `transformers` tokenizer.
        max_length: the longest sequence (prompt + answer) in tokens.
        train: training batches (the gold answer as LM targets) or evaluation batches (every choice).
        shared_prompt: when every answer in an evaluation batch is a single token (a verbalizer's
            " positive" / " negative"), score all choices from one row per example (see
            `_one_token_batch`); False always builds one row per choice (the reference).

    Returns (per call):
        train: `input_ids`, `attention_mask` (B, T) and `labels` (B, T): the token id at the gold
            answer's positions, -100 elsewhere. The model shifts: labels[t] is the token at t.
        eval: every example expanded to C = the most choices in the batch, example-major (row
            i*C + j is example i, choice j): `input_ids`, `attention_mask`, `target_mask` (B*C, T;
            True where the token is an answer token), `choice_mask` (B, C; False for padded-out
            choices, whose row is a 1-token dummy with no target), `choice_tokens` (B, C; answer
            tokens per choice, 0 for padding) and `labels` (B,): the gold index.
        eval, every answer one token: one row per example, `input_ids`, `attention_mask` (B, T),
            `last` (B,): the prompt's last position, `choice_ids` (B, C): each choice's token,
            and `choice_mask`, `choice_tokens`, `labels` as above.
    """

    def __init__(self, tokenizer: Any, max_length: int = 256, train: bool = False, shared_prompt: bool = True):
        if max_length < 2:
            raise PlrError(f"model.max_length={max_length} leaves no room for a prompt and an answer; "
                           f"set model.max_length to 2 or more (e.g. 256)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train = train
        self.shared_prompt = shared_prompt
        self.bos = tokenizer.bos_token_id
        self.pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: a long prompt is expected here (it is cut to max_length below), no warning.
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    def _answers(self, prompt: str, prompt_ids: list[int], choices: list[str]) -> list[list[int]]:
        """Each choice's answer tokens as they follow the prompt.

        The answer is what tokenising `prompt + " " + choice` adds after the prompt's own tokens
        (as lm-evaluation-harness splits context and continuation). Tokenising " <choice>" on
        its own is wrong for SentencePiece tokenizers (LLaMA-1/2): their dummy prefix turns the
        leading space into a token of its own, which every answer would then carry. Where the
        joint tokenisation does not start with the prompt's tokens (a merge across the
        boundary), the choice is tokenised on its own instead.
        """
        # An empty choice tokenises to nothing; [ours] score it as "the answer ends here" (EOS, or
        # the pad id) so every choice has at least one target token.
        empty = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.pad
        joint = self._encode([f"{prompt} {c}" for c in choices])
        alone: list[list[int]] | None = None
        out = []
        for i, ids in enumerate(joint):
            if len(ids) > len(prompt_ids) and ids[:len(prompt_ids)] == prompt_ids:
                out.append(ids[len(prompt_ids):])
                continue
            alone = alone or self._encode([" " + c for c in choices])
            out.append(alone[i] or [empty])
        return out

    def _fit(self, prompt: list[int], answer: list[int]) -> tuple[list[int], int]:
        """BOS + the prompt's tail + the answer, within `max_length`; returns (ids, answer length)."""
        head = [] if self.bos is None else [self.bos]
        room = self.max_length - len(head)
        answer = answer[:room]
        keep = room - len(answer)
        body = prompt[max(0, len(prompt) - keep):] if keep > 0 else []
        return head + body + answer, len(answer)

    def _pad(self, seqs: list[list[int]], fill: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [fill] * (width - len(s)) for s in seqs], dtype=torch.long)

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        prompts = self._encode([r["prompt"] for r in rows])
        if self.train:
            return self._train_batch(rows, prompts)
        return self._eval_batch(rows, prompts)

    def _train_batch(self, rows: list[dict[str, Any]], prompts: list[list[int]]) -> Batch:
        golds = [self._answers(r["prompt"], p, [r["choices"][r["label"]]])[0] for r, p in zip(rows, prompts, strict=True)]
        seqs, targets = [], []
        for prompt, gold in zip(prompts, golds, strict=True):
            ids, n = self._fit(prompt, gold)
            seqs.append(ids)
            targets.append([-100] * (len(ids) - n) + ids[len(ids) - n:])
        return {"input_ids": self._pad(seqs, self.pad),
                "attention_mask": self._pad([[1] * len(s) for s in seqs], 0),
                "labels": self._pad(targets, -100)}

    def _eval_batch(self, rows: list[dict[str, Any]], prompts: list[list[int]]) -> Batch:
        width = max(len(r["choices"]) for r in rows)
        every = [self._answers(row["prompt"], prompt, list(row["choices"]))
                 for row, prompt in zip(rows, prompts, strict=True)]
        if self.shared_prompt and all(len(a) == 1 for answers in every for a in answers):
            return self._one_token_batch(rows, prompts, every, width)
        dummy = self.pad if self.bos is None else self.bos
        seqs, targets = [], []
        choice_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        choice_tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (prompt, answers) in enumerate(zip(prompts, every, strict=True)):
            for j in range(width):
                if j < len(answers):
                    ids, n = self._fit(prompt, answers[j])
                    choice_mask[i, j] = True
                    choice_tokens[i, j] = n
                else:  # a padded-out choice: one attended token (no all-masked rows), no target
                    ids, n = [dummy], 0
                seqs.append(ids)
                targets.append([0] * (len(ids) - n) + [1] * n)
        return {"input_ids": self._pad(seqs, self.pad),
                "attention_mask": self._pad([[1] * len(s) for s in seqs], 0),
                "target_mask": self._pad(targets, 0).bool(),
                "choice_mask": choice_mask,
                "choice_tokens": choice_tokens,
                "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long)}

    def _one_token_batch(self, rows: list[dict[str, Any]], prompts: list[list[int]],
                         every: list[list[list[int]]], width: int) -> Batch:
        """Every answer is one token: one row per example, scored at the prompt's last position.

        The row is what every choice's row shares (BOS + the prompt's tail, cut as for a 1-token
        answer), so the scores equal the one-row-per-choice path's (a causal LM's prediction at a
        position does not see later tokens), at 1/C of its cost: a verbalizer with C classes.
        """
        seqs = [self._fit(prompt, answers[0])[0][:-1] for prompt, answers in zip(prompts, every, strict=True)]
        choice_ids = torch.zeros(len(rows), width, dtype=torch.long)
        choice_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, answers in enumerate(every):
            choice_ids[i, :len(answers)] = torch.tensor([a[0] for a in answers])
            choice_mask[i, :len(answers)] = True
        return {"input_ids": self._pad(seqs, self.pad),
                "attention_mask": self._pad([[1] * len(s) for s in seqs], 0),
                "last": torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long),
                "choice_ids": choice_ids, "choice_mask": choice_mask,
                "choice_tokens": choice_mask.long(),
                "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long)}
