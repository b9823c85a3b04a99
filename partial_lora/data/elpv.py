"""ELPV: real electroluminescence images of solar cells (`plr fetch elpv`), CC-BY-NC-SA-4.0.

The entry (built by `partial_lora.fetch.elpv`) holds 2,624 300x300 grayscale images of solar cells
cut from 44 modules, each with the defect probability an expert gave it (0, 1/3, 2/3 or 1) and
the type of its module (mono or poly). The file does not say which module a cell came from, so
the splits cannot keep a module's cells together.

Tasks [ours]:
- `elpv-defect`: defective (probability >= 1/2: 821 images) vs functional (1,803).
- `elpv-type`: the module type, mono vs poly.
"""

from __future__ import annotations

from collections.abc import Mapping

from partial_lora.data.base import TaskData, TaskSpec
from partial_lora.data.packaged import read_table
from partial_lora.data.split import task_data
from partial_lora.errors import PlrError
from partial_lora.fetch.elpv import TYPES

LABELS: Mapping[str, tuple[str, list[str]]] = {
    "defect": ("defective if the defect probability is at least 1/2", ["functional", "defective"]),
    "type": ("the module's type", list(TYPES)),
}


def load_elpv(spec: TaskSpec) -> TaskData:
    """The fetched cells as grayscale PIL images, labelled by `task.label_column` (`defect` or `type`)."""
    import datasets

    if spec.label_column not in LABELS:
        raise PlrError(f"task.label_column='{spec.label_column}' is not an elpv label; use one of: {', '.join(LABELS)}")
    df = read_table(spec, ("png", "probability", "type"))
    names = LABELS[spec.label_column][1]
    labels = (df["probability"] >= 0.5).astype(int) if spec.label_column == "defect" else df["type"].map(names.index)
    if labels.isna().any():
        raise PlrError(f"{spec.path} has module types other than {'/'.join(TYPES)}; "
                       f"run `plr fetch {spec.name} --force`")
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in df["png"]],
                                    "label": labels.astype(int).tolist()}, features=features)
    return task_data(spec, "image", {spec.train_split: ds}, names)
