"""plr: the Partial-LoRA experiment runner."""

__version__ = "0.1.0"
