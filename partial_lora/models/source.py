"""Where a model's files are, and loading them with one-line errors (never unpickling).

A model source is a hub id, a local folder, `package:<module>[/<subdir>]` (inside an installed
Python package: the MiniLM fixture) or `fetch:<source>` (an entry of the `plr fetch` cache:
Gemma 3 270M); `resolve_source` turns it into a name or path. A local folder that transformers
cannot read, and a hub id that is neither cached nor reachable, become one `PlrError` line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from partial_lora.errors import PlrError
from partial_lora.fetch.hub import check_local_path, load_from_hub, looks_local


def resolve_source(source: str | None, key: str = "model.source") -> tuple[str, bool]:
    """Return (name or path, is_local) for a model source string."""
    if not source:
        raise PlrError(f"the model has no source; set {key}=<hub id or local dir>")
    if source.startswith("fetch:"):
        from partial_lora.fetch.cache import resolve_uri

        return str(resolve_uri(source, what=f"{key}={source}")), True
    if source.startswith("package:"):
        module, _, sub = source[len("package:"):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise PlrError(f"package '{module}' is not installed; pip install {module.replace('_', '-')} "
                           "(or pip install 'plr[offline]')")
        return str(Path(spec.submodule_search_locations[0]) / sub), True
    if looks_local(source):
        return str(check_local_path(source, what="model", key=key)), True
    return source, False


PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle_only(source: str | None, key: str = "model.source", transformers: bool = True) -> None:
    """A local model folder with a pickle checkpoint and no safetensors weights is refused in one line,
    with a command that converts it (transformers' own save, or torch's weights-only reader for a
    timm state dict): plr never unpickles (unpickling can run code; weights_only only narrows that)."""
    if not source:
        return
    path, local = resolve_source(source, key)
    folder = Path(path)
    if not local or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLES)
    if pickles:
        convert = (f"from transformers import AutoModel; AutoModel.from_pretrained('{path}').save_pretrained('{path}')"
                   if transformers else "import torch, safetensors.torch as st; "
                   f"st.save_file(torch.load('{folder / pickles[0]}', weights_only=True), "
                   f"'{folder / 'model.safetensors'}')")
        raise PlrError(f"{key}={source} holds only a pickle checkpoint ({pickles[0]}), and plr never unpickles a file "
                       "(it can run code); convert it to safetensors where you trust it, e.g. `python -c "
                       f"\"{convert}\"`, then run again")


def hf_load(fn: Callable[..., Any], source: str | None, revision: str | None, key: str, **kw: Any) -> Any:
    path, local = resolve_source(source, key)
    if local:
        return load_local(fn, path, source, key, **kw)
    return load_from_hub(lambda lfo: fn(path, revision=revision, local_files_only=lfo, **kw), path,
                         what="model", key=key)


def short_cause(e: BaseException) -> str:
    """An exception's first line without its full stop (its type when it has no message), for a one-line error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")


def load_local(fn: Callable[..., Any], path: str, source: str | None, key: str, **kw: Any) -> Any:
    """`fn(path)` for a local folder, with a folder that transformers cannot read (no or corrupt
    config.json, no or truncated weights) turned into one line naming the folder and the cause."""
    try:
        return fn(path, **kw)
    except (OSError, ValueError, SafetensorError) as e:
        raise PlrError(f"{key}={source} cannot be loaded from '{path}': {short_cause(e)}; point {key} at a "
                       "save_pretrained folder (config.json and model.safetensors) or re-download it") from None
