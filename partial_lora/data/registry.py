"""Task loaders by `task.loader` name."""

from __future__ import annotations

from collections.abc import Callable

from partial_lora.data import checks, identity
from partial_lora.data.base import TaskData, TaskSpec
from partial_lora.data.commonsense import load_choice
from partial_lora.data.elpv import load_elpv
from partial_lora.data.generation import load_generation
from partial_lora.data.offline import load_bbc_news, load_digits
from partial_lora.data.packaged import load_debates, load_mnist, load_rt_polarity, load_vader
from partial_lora.data.text import load_hf_text
from partial_lora.data.vision import load_hf_image
from partial_lora.errors import PlrError

TASKS: dict[str, Callable[[TaskSpec], TaskData]] = {
    "bbc-news": load_bbc_news,
    "digits": load_digits,
    "rt-polarity": load_rt_polarity,
    "vader": load_vader,
    "debates": load_debates,
    "mnist-5k": load_mnist,
    "elpv": load_elpv,
    "hf-text": load_hf_text,
    "hf-image": load_hf_image,
    "choice": load_choice,
    "generation": load_generation,
}


def load_task(spec: TaskSpec) -> TaskData:
    """Load a task with its loader; the spec's `kind` must be the kind that loader produces.

    Raises:
        PlrError: an unknown loader, a kind mismatch, a class count other than `task.num_labels`,
            degenerate data (`checks`),
            or any data problem the loader reports.

    The returned data's `sources` are what the loader read, each with its digest (`data.identity`).
    """
    loader = TASKS.get(spec.loader)
    if loader is None:
        raise PlrError(f"unknown task loader '{spec.loader}'; choose one of: {', '.join(TASKS)} (task.loader)")
    with identity.recording() as sources:
        data = loader(spec)
    if data.kind != spec.kind:
        # A wrong kind would silently pick the wrong collate and model head later on.
        raise PlrError(f"task.kind='{spec.kind}' does not match loader '{spec.loader}', which yields {data.kind} "
                       f"data; set task.kind={data.kind}")
    if spec.num_labels is not None and spec.num_labels != data.num_labels:
        # Another level of a label hierarchy (aircraft families, CIFAR-100's coarse labels) would
        # train and score without complaint; the YAML's class count catches it at load.
        shown = ", ".join(data.label_names[:3]) + (", ..." if len(data.label_names) > 3 else "")
        raise PlrError(f"task.num_labels={spec.num_labels} but the data has {data.num_labels} labels "
                       f"(task.label_column='{spec.label_column}': {shown}); set task.label_column to the column "
                       f"with {spec.num_labels} classes, or task.num_labels={data.num_labels}")
    data = checks.check(data, spec)
    data.sources = identity.named(sources, spec.path)
    return data
