"""`plr fetch elpv`: the wheel `elpv-dataset==1.0.0.post1` as one parquet file, CC-BY-NC-SA-4.0.

The wheel holds 2,624 300x300 8-bit grayscale images of solar cells cut from 44 modules
(`elpv_dataset/data/images/cellNNNN.png`) and `elpv_dataset/data/labels.csv`: one
whitespace-separated line per image, `images/cellNNNN.png <defect probability> <mono|poly>`, the
probability one of 0, 1/3, 2/3, 1 (1,508 / 295 / 106 / 715 images) and the type of the module the
cell came from (1,074 mono, 1,550 poly). The data is licensed CC-BY-NC-SA-4.0: non-commercial use
only, attribution, share-alike (the entry keeps the package's LICENSE.md). The tasks that read the
entry are in `partial_lora.data.elpv`.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pandas as pd

PACKAGE, VERSION = "elpv-dataset", "1.0.0.post1"
LABELS_MEMBER = "elpv_dataset/data/labels.csv"
IMAGES_DIR = "elpv_dataset/data/"
LICENSE_MEMBER = "elpv_dataset-1.0.0.post1.dist-info/licenses/LICENSE.md"
FILE, LICENSE = "elpv.parquet", "LICENSE.md"
PROBABILITIES = (0.0, 1 / 3, 2 / 3, 1.0)
TYPES = ("mono", "poly")
SIDE = 300


def parse_labels(raw: bytes) -> pd.DataFrame:
    """labels.csv -> path, probability, type (checked against the values the dataset defines)."""
    rows = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"{LABELS_MEMBER} line {n} has {len(parts)} fields, not 3 (path, probability, type)")
        prob = float(parts[1])
        if min(abs(prob - p) for p in PROBABILITIES) > 1e-6 or parts[2] not in TYPES:
            raise ValueError(f"{LABELS_MEMBER} line {n}: probability {parts[1]} or type {parts[2]} is not one of "
                             f"0, 1/3, 2/3, 1 and {'/'.join(TYPES)}")
        rows.append((parts[0], prob, parts[2]))
    return pd.DataFrame(rows, columns=["path", "probability", "type"])


def build(wheel: Path, out: Path) -> None:
    """`plr fetch elpv`: every image's PNG bytes with its labels, in one parquet file, and the licence."""
    from PIL import Image

    with zipfile.ZipFile(wheel) as archive:
        df = parse_labels(archive.read(LABELS_MEMBER))
        images = []
        for path in df["path"]:
            data = archive.read(IMAGES_DIR + path)
            with Image.open(io.BytesIO(data)) as img:
                if img.size != (SIDE, SIDE) or img.mode != "L":
                    raise ValueError(f"{path} is {img.mode} {img.size}, not an 8-bit grayscale {SIDE}x{SIDE} image")
            images.append(data)
        (out / LICENSE).write_bytes(archive.read(LICENSE_MEMBER))
    df.assign(png=images).to_parquet(out / FILE, index=False)
