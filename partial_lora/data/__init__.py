"""Task data: loaders, the split policy and batch collation."""

from partial_lora.data.base import ImagePreprocess, TaskData, TaskSpec
from partial_lora.data.collate import make_collate
from partial_lora.data.registry import TASKS, load_task

__all__ = ["TASKS", "ImagePreprocess", "TaskData", "TaskSpec", "load_task", "make_collate"]
