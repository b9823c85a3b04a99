"""The names of the files an export reads from a run dir and writes into its folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from partial_lora import artifacts

HYDRA_CONFIG, HYDRA_OVERRIDES = artifacts.HYDRA_CONFIG, artifacts.HYDRA_OVERRIDES
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's names
MASKS, LAYERS, CONFIG = "plr_masks.safetensors", "plr_layers.json", "plr_config.yaml"
CARD, MERGED = "README.md", "merged"


def read_optional(path: Path) -> Any:
    return artifacts.read_json(path) if path.exists() else None
