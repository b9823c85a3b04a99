"""Batch builders for `DataLoader`: tokenise text, transform images or expand answer choices, plus `labels`.

They are top-level classes (not closures) so DataLoader worker processes can pickle them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from partial_lora.data.base import ImagePreprocess, Kind
from partial_lora.errors import PlrError

Batch = dict[str, torch.Tensor]


def labels(rows: list[dict[str, Any]]) -> torch.Tensor:
    """Class ids as int64, or regression scores (floats, STS-B) as float32."""
    values = [r["label"] for r in rows]
    if isinstance(values[0], float):
        return torch.tensor(values, dtype=torch.float32)
    return torch.tensor(values, dtype=torch.long)


def pretokenize(ds: Any, tokenizer: Any, max_length: int) -> Any:
    """Tokenise a text split once (truncated, unpadded), keeping `label`.

    `datasets` caches the result next to the source data when the split comes from files (Hub
    or local), so later stages and runs read the token ids instead of tokenising again; an
    in-memory split (BBC News) is tokenised once per stage instead of once per epoch.
    """
    pair = "text_pair" in ds.column_names

    def encode(batch: dict[str, list[Any]]) -> Any:
        pairs = batch["text_pair"] if pair else None
        if pairs is None or all(p is not None for p in pairs):
            return tokenizer(batch["text"], pairs, truncation=True, max_length=max_length)
        # A multi-task union mixes sentence pairs with single sentences (text_pair None).
        rows = [tokenizer(t, p, truncation=True, max_length=max_length) for t, p in zip(batch["text"], pairs)]
        return {k: [r[k] for r in rows] for k in rows[0]}

    keep = ("label", "task_id")
    return ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c not in keep],
                  desc="tokenising", new_fingerprint=_fingerprint(ds, tokenizer, max_length, pair))


def _fingerprint(ds: Any, tokenizer: Any, max_length: int, pair: bool) -> str | None:
    """The tokenised split's `datasets` fingerprint (its cache key), from what decides the token ids.

    Left to itself, `datasets` pickles `encode` with the whole tokenizer to hash it, about a second
    per split and stage. A fast tokenizer's own JSON (vocabulary, normaliser, pre- and post-processor,
    added tokens) names it exactly and serialises in milliseconds; the truncation and padding that
    a call leaves set on it are left out, so the key does not depend on what it tokenised before. A
    tokenizer without one (None) leaves the hashing to `datasets`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    # `tokenizers` writes its fields in a fixed order, truncation and padding (what the last call left
    # set; the call below sets its own) before added_tokens: hash from there on.
    text = backend.to_str()
    start = text.find('"added_tokens":')
    if start < 0:
        return None
    parts = ("plr-pretokenize-1", ds._fingerprint, type(tokenizer).__name__,
             hashlib.sha256(text[start:].encode()).hexdigest(), str(max_length), str(pair),
             repr(sorted(tokenizer.special_tokens_map.items())), repr(tokenizer.model_input_names),
             tokenizer.truncation_side, tokenizer.padding_side)
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


class TextCollate:
    """Pad pretokenised rows (`input_ids`, ...) or tokenise `text` (+ `text_pair`), dynamically.

    Args:
        tokenizer: a `transformers` tokenizer.
        max_length: longer inputs are truncated to this many tokens.
    """

    def __init__(self, tokenizer: Any, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        if "input_ids" in rows[0]:
            enc = self.tokenizer.pad([{k: v for k, v in r.items() if k != "label"} for r in rows], padding=True,
                                     return_tensors="pt")
            return {**enc, "labels": labels(rows)}
        texts = [r["text"] for r in rows]
        pairs = [r["text_pair"] for r in rows] if "text_pair" in rows[0] else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        return {**enc, "labels": labels(rows)}


class ImageCollate:
    """Turn PIL images into a normalised `pixel_values` batch of shape (B, 3, size, size).

    Eval follows the timm convention: resize the shorter side to `size / crop_pct`, then
    center-crop `size`. Training replaces both with a random resized crop and a horizontal flip.

    Args:
        preprocess: the model's size, normalisation and interpolation.
        train: use the training augmentation.
    """

    def __init__(self, preprocess: ImagePreprocess, train: bool = False):
        # Imported here, not at the top: torchvision (and the torch._dynamo it loads) takes seconds, which
        # text runs and a config error should not pay.
        from torchvision.transforms import InterpolationMode, v2

        self.preprocess = preprocess
        self.train = train
        try:
            interpolation = InterpolationMode(preprocess.interpolation.lower())
        except ValueError:
            choices = ", ".join(m.value for m in InterpolationMode)
            raise PlrError(f"image interpolation '{preprocess.interpolation}' is unknown; "
                           f"use one of: {choices}") from None
        size = preprocess.size
        if train:
            geometry = [v2.RandomResizedCrop(size, interpolation=interpolation), v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize(int(size / preprocess.crop_pct), interpolation=interpolation), v2.CenterCrop(size)]
        # Geometry runs on the PIL image: every interpolation mode (lanczos too) is available there.
        self.transform = v2.Compose([
            *geometry,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(preprocess.mean), list(preprocess.std)),
        ])

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        # Grayscale (digits), palette or RGBA images all become 3-channel RGB first.
        pixels = torch.stack([self.transform(r["image"].convert("RGB")) for r in rows])
        return {"pixel_values": pixels, "labels": labels(rows)}


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
        golds = [self._answers(r["prompt"], p, [r["choices"][r["label"]]])[0] for r,
                 p in zip(rows, prompts, strict=True)]
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


def make_collate(kind: Kind, *, tokenizer: Any = None, max_length: int = 128, image: ImagePreprocess | None = None,
                 train: bool = False) -> Callable[[list[dict[str, Any]]], Batch]:
    """The collate function for a task kind.

    Args:
        kind: `text`, `image` or `choice`.
        tokenizer: required for text and choice.
        max_length: text truncation length (choice: prompt + answer).
        image: image preprocessing; defaults to `ImagePreprocess()` (224 px, 0.5 mean/std).
        train: image training augmentation; for choice, gold-answer LM targets instead of
            every choice expanded for scoring (ignored for text).
    """
    if kind == "text":
        if tokenizer is None:
            raise ValueError("make_collate('text') needs a tokenizer")
        return TextCollate(tokenizer, max_length)
    if kind == "image":
        return ImageCollate(image or ImagePreprocess(), train)
    if kind == "choice":
        if tokenizer is None:
            raise ValueError("make_collate('choice') needs a tokenizer")
        return ChoiceCollate(tokenizer, max_length, train)
    raise ValueError(f"unknown collate kind {kind!r}; expected 'text', 'image' or 'choice'")
