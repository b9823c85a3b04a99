"""The backbone sizes: random-init Hugging Face models (no download) and the fixed batch each is fed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Size:
    """One backbone: a random-init Hugging Face model and the batch it is fed."""

    name: str
    family: str  # "hf-text" | "hf-vision" (the Classifier call convention)
    config: Callable[[], object]  # -> transformers config
    targets: tuple[str, ...]
    batch: int
    seq_len: int = 0  # text only
    num_labels: int = 2
    head_modules: tuple[str, ...] = ("classifier",)


def _bert(**kw: object) -> Callable[[], object]:
    def make() -> object:
        from transformers import BertConfig

        return BertConfig(num_labels=2, **kw)
    return make


def _vit(**kw: object) -> Callable[[], object]:
    def make() -> object:
        from transformers import ViTConfig

        return ViTConfig(num_labels=10, **kw)
    return make


def _deberta(**kw: object) -> Callable[[], object]:
    def make() -> object:
        from transformers import DebertaV2Config

        return DebertaV2Config(num_labels=2, **kw)
    return make


# microsoft/deberta-v3-base's config.json. DebertaV2Config()'s defaults are DeBERTa-v2-xlarge's
# (hidden 1536, 24 layers, no relative attention), so every value that differs is spelled out.
# position_buckets, norm_rel_ebd and share_att_key are not constructor arguments: the model reads
# them with getattr and they are stored as extra config attributes.
DEBERTA_V3_BASE = dict(
    vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=0, initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=True,
    max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
    pos_att_type=["p2c", "c2p"], position_biased_input=False, pooler_hidden_size=768, pooler_dropout=0.0,
    pooler_hidden_act="gelu", pad_token_id=0,
)

SIZES: dict[str, Size] = {
    # ViTConfig() defaults: 12 layers, hidden 768, 224x224 images, 16x16 patches (ViT-B/16, 86M).
    # transformers 5 names the attention projections q_proj/k_proj/v_proj/o_proj.
    "vit-b": Size("vit-b", "hf-vision", _vit(image_size=224, patch_size=16), ("q_proj", "v_proj"),
                  batch=4, num_labels=10),
    # DeBERTa-v3-base (184M, 98M of them the 128k-token embedding); the paper's GLUE backbone.
    # Targets and head as conf/model/deberta-v3-base.yaml (lora_targets.qv, head_modules).
    "deberta-v3-base": Size("deberta-v3-base", "hf-text", _deberta(**DEBERTA_V3_BASE),
                            ("query_proj", "value_proj"), batch=8, seq_len=128,
                            head_modules=("pooler", "classifier")),
    # BertConfig() defaults: 12 layers, hidden 768, 12 heads, FFN 3072 (BERT-base, 110M).
    "bert-base": Size("bert-base", "hf-text", _bert(), ("query", "value"), batch=8, seq_len=128),
    # The shapes of conf/model/tiny-bert.yaml, tiny-vit.yaml and tiny-deberta.yaml: seconds.
    "tiny-bert": Size("tiny-bert", "hf-text",
                      _bert(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128),
                      ("query", "value"), batch=8, seq_len=64),
    "tiny-vit": Size("tiny-vit", "hf-vision",
                     _vit(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64),
                     ("q_proj", "v_proj"), batch=4, num_labels=10),
    "tiny-deberta": Size("tiny-deberta", "hf-text",
                         _deberta(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, pooler_hidden_size=32,
                                  relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"]),
                         ("query_proj", "value_proj"), batch=8, seq_len=64, head_modules=("pooler", "classifier")),
}
ALIASES = {"tiny": ["tiny-bert", "tiny-vit", "tiny-deberta"]}


def build_backbone(size: Size) -> nn.Module:
    """A random-init model with a classification head (no download)."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = size.config()
    cfg.num_labels = size.num_labels
    auto = AutoModelForSequenceClassification if size.family == "hf-text" else AutoModelForImageClassification
    return auto.from_config(cfg)


def make_batch(size: Size, net: nn.Module, batch: int, seq_len: int, device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    cfg = net.config
    if size.family == "hf-text":
        out = {"input_ids": torch.randint(cfg.vocab_size, (batch, seq_len), generator=g),
               "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    else:
        out = {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}
    out["labels"] = torch.randint(size.num_labels, (batch,), generator=g)
    return {k: v.to(device) for k, v in out.items()}
