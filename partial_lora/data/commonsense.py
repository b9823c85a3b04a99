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

`data.collate.ChoiceCollate` builds the batches: the gold continuation as LM targets for training, and every
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

from partial_lora.data.base import TaskData, TaskSpec
from partial_lora.data.columns import drop_unlabelled
from partial_lora.data.source import load_source
from partial_lora.data.split import task_data
from partial_lora.errors import PlrError

Formatted = tuple[str, list[str], int | None]

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
