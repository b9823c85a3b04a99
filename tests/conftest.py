"""Shared test setup: never touch the network, keep CPU threads modest, build tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "partial_lora" / "conf"


@pytest.fixture
def model_spec():
    """ModelSpec of a config in conf/model by name."""
    from partial_lora.models import ModelSpec

    def make(name: str) -> ModelSpec:
        return ModelSpec(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml")))

    return make


@pytest.fixture(scope="module")
def llm():
    """The tiny random LLaMA (`model=tiny-llama`, 5 choice slots) in eval mode, and its tokenizer."""
    import torch

    from partial_lora.models import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny-llama.yaml")))
    built = build_model(spec, 5)
    return built.model.eval(), built.tokenizer
