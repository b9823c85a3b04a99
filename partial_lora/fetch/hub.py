"""Fast, explained access to the Hugging Face Hub.

Loading a hub name on a machine without internet makes `transformers`/`datasets` retry for
tens of seconds and then raise a long traceback. We check reachability once (a DNS lookup and
a TCP connect with a short timeout), and when the Hub cannot be reached we load from the local
cache only; if the name is not cached the user gets one line saying how to point at a local
path instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from partial_lora.errors import PlrError, first_line

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}


def looks_local(name_or_path: str) -> bool:
    """Whether a string names a local path rather than a hub id (`org/name`)."""
    if Path(name_or_path).expanduser().exists():
        return True
    return name_or_path.startswith(("/", "./", "../", "~")) or name_or_path in {".", ".."}


def offline_env() -> bool:
    """True when the user asked for offline mode through the standard variables."""
    return any(os.environ.get(v, "").lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.cache
def hub_reachable(timeout: float = 4.0) -> bool:
    """One quick connectivity check against the configured Hub endpoint.

    With a proxy configured we cannot test the route ourselves and assume the Hub is
    reachable (the library then does its own, slower, error handling).
    """
    if offline_env():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_local_path(path: str, *, what: str, key: str) -> Path:
    """Resolve a local path or raise a one-line error naming the config key to fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PlrError(f"{what} path '{path}' does not exist; set {key}=<an existing path or a hub id>")
    return p.resolve()


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """Make huggingface_hub (and datasets) cache-only for the duration of a load.

    `local_files_only` alone is not enough: transformers still asks the Hub for optional files
    (an `adapter_config.json`) and `datasets.load_dataset` has no such switch; both read the
    offline flags at call time, and without them an unreachable Hub costs tens of seconds of
    retries.
    """
    import huggingface_hub.constants as hub_constants

    targets = [hub_constants]
    if "datasets" in sys.modules:
        targets.append(sys.modules["datasets"].config)
    saved = [t.HF_HUB_OFFLINE for t in targets]
    for t in targets:
        t.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for t, v in zip(targets, saved):
            t.HF_HUB_OFFLINE = v


def load_from_hub(load: Callable[[bool], T], name: str, *, what: str, key: str) -> T:
    """Call `load(local_files_only)` for a hub id, explaining failures in one line.

    Args:
        load: the actual loader; receives `local_files_only`.
        name: the hub id, used in the message.
        what: "model" or "dataset", used in the message.
        key: the config key that selects it (e.g. `model.name`), used in the message.
    """
    online = hub_reachable()
    try:
        if online:
            return load(False)
        with cache_only():
            return load(True)
    except PlrError:
        raise
    except Exception as e:  # noqa: BLE001 - libraries raise OSError, ValueError, HTTP errors...
        if online:
            raise PlrError(f"could not load {what} '{name}' from the Hugging Face Hub ({type(e).__name__}: "
                           f"{first_line(e)}); check the name or set {key}=<local dir>") from e
        raise PlrError(
            f"{what} '{name}' is not in the local cache and the Hugging Face Hub cannot be reached; "
            f"download it where there is internet (`hf download {name}"
            f"{' --repo-type dataset' if what == 'dataset' else ''} --local-dir DIR`) and set {key}=DIR"
        ) from e
