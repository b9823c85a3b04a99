"""`hf-text`: text classification (single sentences or pairs) from the Hub or local files."""

from __future__ import annotations

from partial_lora.data.base import TaskData, TaskSpec
from partial_lora.data.columns import encode_labels, select_columns
from partial_lora.data.source import load_source
from partial_lora.data.split import task_data


def load_hf_text(spec: TaskSpec) -> TaskData:
    """Load a text task with columns `text` (+ `text_pair` for sentence pairs) and `label`.

    GLUE (`nyu-mll/glue`, one config per task) loads this way; see `conf/task/<task>.yaml`.
    """
    mapping = {"text": (spec.text_column, "task.text_column")}
    if spec.text_pair_column:
        mapping["text_pair"] = (spec.text_pair_column, "task.text_pair_column")
    mapping["label"] = (spec.label_column, "task.label_column")
    dd, label_names = encode_labels(select_columns(load_source(spec), mapping), regression=spec.regression,
                                    unlabelled=spec.unlabelled_value)
    return task_data(spec, "text", dd, label_names)
