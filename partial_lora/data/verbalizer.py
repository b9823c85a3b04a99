"""Classification on a causal LM: each text becomes a prompt, each class an answer to score.

A task YAML gives `prompt` (a template with `{text}`, and `{text_pair}` for pairs) and
`verbalizer` (class name -> answer text). `as_choices` turns the task's `text`/`label` rows into
the multiple-choice rows of `data.commonsense` (`prompt`, `choices`, `label`), so the causal LM
scores every class's answer by its log-likelihood after the prompt, exactly as it scores a
commonsense task's choices, and trains on the gold answer's tokens. With no adapter this is the
model's zero-shot accuracy.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import datasets

from partial_lora.data.base import TaskData
from partial_lora.data.commonsense import FEATURES
from partial_lora.errors import PlrError

FIELDS = ("text", "text_pair")


def check_template(prompt: Any, task: str) -> str:
    """The prompt template, refused in one line when it is not text or names a field we do not fill."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PlrError(f"task {task} on a causal LM needs task.prompt=<a template with {{text}}>, got {prompt!r}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
    except ValueError as e:
        raise PlrError(f"task.prompt={prompt!r} is not a valid template ({e}); "
                       "write literal braces as {{ }}") from None
    unknown = [f for f in fields if f not in FIELDS]
    if unknown or "text" not in fields:
        raise PlrError(f"task.prompt={prompt!r} must contain {{text}} (and may contain {{text_pair}}), "
                       f"not {{{unknown[0] if unknown else ''}}}")
    return prompt


def check_verbalizer(verbalizer: Any, label_names: list[str], task: str) -> list[str]:
    """One non-empty answer per class, in label order (no leading space: the scorer adds one)."""
    if not isinstance(verbalizer, Mapping) or not verbalizer:
        raise PlrError(f"task {task} on a causal LM needs task.verbalizer={{<class>: <answer>, ...}}, got "
                       f"{verbalizer!r}")
    missing = [n for n in label_names if n not in verbalizer]
    extra = sorted(set(map(str, verbalizer)) - set(label_names))
    if missing or extra:
        raise PlrError(f"task.verbalizer must name each class of task {task} once ({', '.join(label_names)}); "
                       + (f"missing {missing[0]}" if missing else f"'{extra[0]}' is not a class"))
    answers = [verbalizer[n] for n in label_names]
    bad = [a for a in answers if not isinstance(a, str) or not a.strip()]
    if bad:
        raise PlrError(f"task.verbalizer answers must be non-empty text, got {bad[0]!r}")
    answers = [a.strip() for a in answers]
    if len(set(answers)) != len(answers):
        raise PlrError(f"task.verbalizer gives two classes the same answer ({answers}); make them distinct")
    return answers


def as_choices(data: TaskData, prompt: Any, verbalizer: Any) -> TaskData:
    """The task's splits as choice rows: `prompt` filled from each row, the verbalizer's answers as
    the choices (the same for every row), the label unchanged.

    Raises:
        PlrError: a regression task (no classes to verbalise), a bad template or verbalizer.
    """
    if data.regression:
        raise PlrError(f"task {data.name} is a regression task; a causal LM scores classes by their answers, "
                       "so use an encoder model (e.g. model=minilm) for it")
    template = check_template(prompt, data.name)
    choices = check_verbalizer(verbalizer, list(data.label_names), data.name)

    def fill(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        pairs = batch.get("text_pair") or [None] * len(batch["text"])
        return {"prompt": [template.format(text=t.strip(), text_pair=(p or "").strip())
                           for t, p in zip(batch["text"], pairs, strict=True)],
                "choices": [choices] * len(batch["text"]), "label": batch["label"]}

    def convert(ds: datasets.Dataset) -> datasets.Dataset:
        return ds.map(fill, batched=True, remove_columns=ds.column_names, features=FEATURES,
                      desc=f"prompting {data.name}")

    return TaskData(data.name, "choice", convert(data.train), convert(data.val), convert(data.test),
                    list(data.label_names), {k: convert(v) for k, v in data.extra.items()})
