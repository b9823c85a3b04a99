"""Batch builders for `DataLoader`: tokenise text or transform images, plus `labels`.

They are top-level classes (not closures) so DataLoader worker processes can pickle them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from partial_lora.data.base import ImagePreprocess, Kind
from partial_lora.data.commonsense import ChoiceCollate
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
                  desc="tokenising")


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
