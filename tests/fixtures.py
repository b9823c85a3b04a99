"""Generated local copies of the real datasets, in each one's Hub schema, for offline tests.

Each writer makes the directory layout `hf download --repo-type dataset --local-dir` gives
(parquet files named `<split>-00000-of-00001.parquet`), with the real column names, label
features and split names, and small random contents. The loaders then run exactly the code
they run on the real data.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import datasets
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import `experiments/<name>.py` (a script, not a package module) for testing."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cfg_of(*overrides: str):
    """The composed `plr train` config for these overrides (not validated)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def one_line(exc_info) -> str:
    """A raised error's message, which must be one line."""
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# name -> (text columns, label names or None for a float score, split names)
GLUE: dict[str, tuple[tuple[str, ...], list[str] | None, tuple[str, ...]]] = {
    "cola": (("sentence",), ["unacceptable", "acceptable"], ("train", "validation", "test")),
    "sst2": (("sentence",), ["negative", "positive"], ("train", "validation", "test")),
    "mrpc": (("sentence1", "sentence2"), ["not_equivalent", "equivalent"], ("train", "validation", "test")),
    "qqp": (("question1", "question2"), ["not_duplicate", "duplicate"], ("train", "validation", "test")),
    "stsb": (("sentence1", "sentence2"), None, ("train", "validation", "test")),
    "mnli": (("premise", "hypothesis"), ["entailment", "neutral", "contradiction"],
             ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")),
    "qnli": (("question", "sentence"), ["entailment", "not_entailment"], ("train", "validation", "test")),
    "rte": (("sentence1", "sentence2"), ["entailment", "not_entailment"], ("train", "validation", "test")),
}

WORDS = "the a cat dog sat ran on under mat tree big small red blue quickly slowly house river".split()


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))


def write_glue(root: Path, task: str, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """`root/<task>/<split>-00000-of-00001.parquet` as in `nyu-mll/glue`; test labels are -1.

    Returns:
        `root` (what `task.path` points at; the task's folder is found from `task.subset`).
    """
    columns, names, splits = GLUE[task]
    rng = np.random.default_rng(seed)
    label = datasets.Value("float32") if names is None else datasets.ClassLabel(names=names)
    features = datasets.Features({**{c: datasets.Value("string") for c in columns}, "label": label,
                                  "idx": datasets.Value("int32")})
    out = root / task
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        n = (sizes or {}).get(split, 120 if split == "train" else 30)
        if split.startswith("test"):
            labels = [-1.0 if names is None else -1] * n
        elif names is None:
            labels = np.round(rng.uniform(0, 5, n), 2).astype(np.float32).tolist()
        else:
            labels = (np.arange(n) % len(names)).tolist()
        rows = {**{c: [_sentence(rng) for _ in range(n)] for c in columns}, "label": labels, "idx": list(range(n))}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(out / f"{split}-00000-of-00001.parquet")
    return root


# name -> (layout folder, image column, label column, label classes (0: bool), splits, extra columns)
# Real schemas on the Hub (see conf/task/<name>.yaml for the ids); sizes here are tiny.
VISION: dict[str, tuple[str, str, str, int, tuple[str, ...], tuple[str, ...]]] = {
    "cifar100": ("cifar100", "img", "fine_label", 100, ("train", "test"), ("coarse_label",)),
    "caltech101": ("data", "image", "label", 102, ("train", "test"), ()),
    "dtd": ("data", "image", "label", 47, ("train", "test"), ()),
    "flowers102": ("data", "image", "label", 102, ("train", "validation", "test"), ()),
    "pets": ("data", "image", "label", 37, ("train", "test"), ("image_id", "label_cat_dog")),
    "svhn": ("cropped_digits", "image", "label", 10, ("train", "test", "extra"), ()),
    "eurosat": ("data", "image", "label", 10, ("train", "validation", "test"), ("image_id",)),
    "resisc45": ("data", "image", "label", 45, ("train", "validation", "test"), ("image_id",)),
    "cifar10": ("plain_text", "img", "label", 10, ("train", "test"), ()),
    "cars": ("data", "image", "label", 196, ("train", "test"), ()),
    # FGVC-Aircraft (Donghyun99/FGVC-Aircraft): `variation` holds the 100 variants, `label` the 70
    # families and `manufacturer` the 30 manufacturers (the Hub's dataset viewer).
    "aircraft": ("data", "image", "variation", 100, ("train", "val", "test"), ("label", "manufacturer")),
    "food101": ("data", "image", "label", 101, ("train", "validation"), ()),
    "sun397": ("data", "image", "label", 397, ("train", "test"), ()),
    "gtsrb": ("data", "image", "label", 43, ("train", "test"), ()),
    "mnist": ("mnist", "image", "label", 10, ("train", "test"), ()),
    "camelyon": ("data", "image", "label", 2, ("train", "validation", "test"), ()),
}


# Extra class-label columns with their real class counts (the others get 2 classes).
EXTRA_CLASSES = {("aircraft", "label"): 70, ("aircraft", "manufacturer"): 30}


def write_vision(root: Path, task: str, sizes: dict[str, int] | None = None, seed: int = 0,
                 classes_used: int = 4) -> Path:
    """A local copy of a vision dataset in its Hub layout: `root/<folder>/<split>-00000-of-00001.parquet`.

    Labels cycle over the first `classes_used` classes of the real `ClassLabel` (so stratified
    splits work on tiny sizes); images are small random RGB (grayscale for MNIST).

    Returns:
        `root`, the folder `task.path` points at.
    """
    from PIL import Image

    folder, image_col, label_col, n_classes, splits, extra = VISION[task]
    rng = np.random.default_rng(seed)
    names = [f"class_{i}" for i in range(n_classes)]
    label = datasets.ClassLabel(names=names)
    feats = {image_col: datasets.Image(), label_col: label}
    for col in extra:
        n_extra = EXTRA_CLASSES.get((task, col), 2)
        feats[col] = (datasets.Value("string") if col == "image_id"
                      else datasets.ClassLabel(names=[f"{col}_{i}" for i in range(n_extra)]))
    out = root / folder
    out.mkdir(parents=True, exist_ok=True)
    if task == "svhn":  # the other config of the repo, which task.subset=cropped_digits must skip
        (root / "full_numbers").mkdir(exist_ok=True)
        (root / "full_numbers" / "README.txt").write_text("another config")
    mode, channels = ("L", 1) if task == "mnist" else ("RGB", 3)
    for split in splits:
        n = (sizes or {}).get(split, 60 if split == "train" else 20)
        pixels = rng.integers(0, 256, (n, 12, 12, channels), dtype=np.uint8)
        rows = {image_col: [Image.fromarray(p.squeeze(-1) if channels == 1 else p, mode) for p in pixels],
                label_col: [i % min(classes_used, n_classes) for i in range(n)]}
        for col in extra:
            rows[col] = [f"{split}_{i}" for i in range(n)] if col == "image_id" else [i % 2 for i in range(n)]
        ds = datasets.Dataset.from_dict(rows, features=datasets.Features(feats))
        ds.to_parquet(out / f"{split}-00000-of-00001.parquet")
    return root


# --- multiple choice (the commonsense-8 of LLM-Adapters / DoRA) --------------------------------
# task -> (format, config folder written (None: the Hub's `data/` folder, "default": the
# refs/convert/parquet layout `default/<split>/0000.parquet`), sibling config folder or None,
# splits, the split whose gold labels are hidden). Real schemas: see conf/task/<task>.yaml.
COMMONSENSE: dict[str, tuple[str, str | None, str | None, tuple[str, ...], str | None]] = {
    "boolq": ("boolq", None, None, ("train", "validation"), None),
    "piqa": ("piqa", "default", None, ("train", "validation", "test"), "test"),
    "siqa": ("siqa", "default", None, ("train", "validation"), None),
    "hellaswag": ("hellaswag", None, None, ("train", "validation", "test"), "test"),
    "winogrande": ("winogrande", "winogrande_xl", "winogrande_debiased", ("train", "validation", "test"), "test"),
    "arc-e": ("arc", "ARC-Easy", "ARC-Challenge", ("train", "validation", "test"), None),
    "arc-c": ("arc", "ARC-Challenge", "ARC-Easy", ("train", "validation", "test"), None),
    "obqa": ("obqa", "main", "additional", ("train", "validation", "test"), None),
}

_STR = datasets.Value("string")
_KEYED = {"text": datasets.List(_STR), "label": datasets.List(_STR)}
COMMONSENSE_FEATURES: dict[str, datasets.Features] = {
    "boolq": datasets.Features({"question": _STR, "answer": datasets.Value("bool"), "passage": _STR}),
    "piqa": datasets.Features({"goal": _STR, "sol1": _STR, "sol2": _STR,
                               "label": datasets.ClassLabel(names=["0", "1"])}),
    "siqa": datasets.Features({"context": _STR, "question": _STR, "answerA": _STR, "answerB": _STR,
                               "answerC": _STR, "label": _STR}),
    "hellaswag": datasets.Features({"ind": datasets.Value("int32"), "activity_label": _STR, "ctx_a": _STR,
                                    "ctx_b": _STR, "ctx": _STR, "endings": datasets.List(_STR), "source_id": _STR,
                                    "split": _STR, "split_type": _STR, "label": _STR}),
    "winogrande": datasets.Features({"sentence": _STR, "option1": _STR, "option2": _STR, "answer": _STR}),
    "arc": datasets.Features({"id": _STR, "question": _STR, "choices": _KEYED, "answerKey": _STR}),
    "obqa": datasets.Features({"id": _STR, "question_stem": _STR, "choices": _KEYED, "answerKey": _STR}),
}
_OBQA_ADDITIONAL = {"fact1": _STR, "humanScore": datasets.Value("float32"), "clarity": datasets.Value("float32"),
                    "turkIdAnonymized": _STR}

NOUNS = "apple river stone chair lamp garden window bottle ladder pillow engine basket candle mirror bridge".split()
NAMES = "Alex Sam Robin Kai Jordan Casey".split()


def commonsense_row(task: str, i: int, rng: np.random.Generator, hidden: bool = False) -> dict:
    """Raw row `i` of `task` in its Hub schema; `hidden` writes the hidden-test label (-1 / "").

    Learnable on purpose: the gold choice repeats a key noun of the question/context (BoolQ: the
    cue word "indeed" means yes, "hardly" no), so a tiny LM can beat chance. The gold index
    cycles over the choices, so every split has every label (stratified carving works).
    """
    fmt = COMMONSENSE[task][0]
    key, *others = rng.choice(NOUNS, size=5, replace=False).tolist()
    name = NAMES[i % len(NAMES)]
    filler = _sentence(rng)
    if fmt == "boolq":
        truth = i % 2 == 0
        return {"question": f"is the {key} {'indeed' if truth else 'hardly'} near the {others[0]}",
                "answer": truth, "passage": f"The {key} is a thing. {filler}."}
    if fmt == "piqa":
        gold = i % 2
        sols = [f"Put the {others[0]} on the {others[1]}.", f"Put the {others[1]} on the {others[2]}."]
        sols[gold] = f"Put the {key} on the {others[1]}."
        return {"goal": f"How do I move the {key}?", "sol1": sols[0], "sol2": sols[1], "label": -1 if hidden else gold}
    if fmt == "siqa":
        gold = i % 3
        answers = [f"keep the {o}" for o in others[:3]]
        answers[gold] = f"keep the {key}"
        return {"context": f"{name} found a {key} by the {others[3]}.",
                "question": f"What will {name} want to do next?",
                "answerA": answers[0], "answerB": answers[1], "answerC": answers[2], "label": str(gold + 1)}
    if fmt == "hellaswag":
        gold = i % 4
        endings = [f"puts the {o} away. {filler}" for o in others]
        endings[gold] = f"puts the {key} away. {filler}"
        ctx_a, ctx_b = f"A person picks up the {key}.", "then the person"
        return {"ind": i, "activity_label": f"Using a {key}", "ctx_a": ctx_a, "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}", "endings": endings, "source_id": f"activitynet~v_{i}", "split": "val",
                "split_type": "indomain", "label": "" if hidden else str(gold)}
    if fmt == "winogrande":
        gold = i % 2
        options = [key, others[0]] if gold == 0 else [others[0], key]
        return {"sentence": f"{name} looked for the {key} and found _ under the table.", "option1": options[0],
                "option2": options[1], "answer": "" if hidden else str(gold + 1)}
    n = 4 if fmt == "obqa" else 3 + (i // 5) % 3  # ARC: 3 to 5 choices
    gold = i % n
    texts = [f"the {o}" for o in others[:n - 1]]
    texts.insert(gold, f"the {key}")
    labels = [str(k + 1) for k in range(n)] if fmt == "arc" and i % 4 == 3 else [chr(65 + k) for k in range(n)]
    choices = {"text": texts, "label": labels}
    if fmt == "arc":
        return {"id": f"Mercury_{i}", "question": f"Which object is a {key}?", "choices": choices,
                "answerKey": labels[gold]}
    return {"id": f"{i}-{key}", "question_stem": f"A {key} is found near", "choices": choices,
            "answerKey": labels[gold]}


def write_commonsense_rows(root: Path, task: str, rows: dict[str, list[dict]]) -> Path:
    """Write raw rows (split -> rows in `task`'s Hub schema) in that dataset's Hub layout under `root`.

    Layouts: `data/<split>-00000-of-00001.parquet` (boolq, hellaswag), the refs/convert/parquet
    branch's `default/<split>/0000.parquet` (piqa, siqa), or one folder per config (winogrande,
    ARC, OpenBookQA), where a second config folder (the same rows in reverse order) is written
    too, as on the Hub, so the loader must pick the task's one via task.subset.

    Returns:
        `root`, what `task.path` points at.
    """
    fmt, folder, sibling, _, _ = COMMONSENSE[task]
    features = COMMONSENSE_FEATURES[fmt]
    for config, other in [(folder, False)] + ([(sibling, True)] if sibling else []):
        feats, extra = features, {}
        if config == "additional":  # OpenBookQA's other config: the same questions plus their core fact
            feats = datasets.Features({**features, **_OBQA_ADDITIONAL})
            extra = {"fact1": "a fact", "humanScore": 1.0, "clarity": 2.0, "turkIdAnonymized": "x"}
        for split, split_rows in rows.items():
            if other:  # the other config holds other rows: reading it by mistake shows
                split_rows = split_rows[::-1]
            ds = datasets.Dataset.from_list([{**r, **extra} for r in split_rows], features=feats)
            if config == "default":
                out = root / "default" / split / "0000.parquet"
            else:
                out = root / (config or "data") / f"{split}-00000-of-00001.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.to_parquet(out)
    return root


def write_commonsense(root: Path, task: str, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A generated local copy of a commonsense-8 task (`COMMONSENSE`) in its real Hub schema and layout.

    Sizes default to 64 train and 16 rows per other split; the split whose labels are hidden on
    the Hub (PIQA/HellaSwag/WinoGrande test) is unlabelled here too. See `commonsense_row`.

    Returns:
        `root`, what `task.path` points at.
    """
    _, _, _, splits, hidden = COMMONSENSE[task]
    rng = np.random.default_rng(seed)
    rows = {split: [commonsense_row(task, i, rng, hidden=split == hidden)
                    for i in range((sizes or {}).get(split, 64 if split == "train" else 16))]
            for split in splits}
    return write_commonsense_rows(root, task, rows)
