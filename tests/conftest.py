"""Shared test setup: never touch the network, keep CPU threads modest, build tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "partial_lora" / "conf"

# torch's thread count before this file changed it (the machine's cores, or OMP_NUM_THREADS): the
# golden results are recorded per thread count, and `default_threads` gives the golden test this one.
DEFAULT_THREADS = torch.get_num_threads()

# Under pytest-xdist every worker would start one torch thread per core: on 2 cores, 2 workers ran 4
# threads and each test ran about 1.5x slower than at one thread each. So a worker takes its share of
# the cores, for itself and (through OMP_NUM_THREADS) for the `plr` subprocesses it starts, unless the
# user set OMP_NUM_THREADS.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _share = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)


@pytest.fixture
def default_threads():
    """Run the test at torch's default thread count (restored after), whatever the worker's share."""
    before = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_THREADS)
    yield DEFAULT_THREADS
    torch.set_num_threads(before)


@pytest.fixture
def model_spec():
    """ModelSpec of a config in conf/model by name."""
    from partial_lora.models.backbones import ModelSpec

    def make(name: str) -> ModelSpec:
        return ModelSpec(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml")))

    return make


@pytest.fixture(scope="module")
def llm():
    """The tiny random LLaMA (`model=tiny-llama`, 5 choice slots) in eval mode, and its tokenizer."""
    from partial_lora.models.backbones import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny-llama.yaml")))
    built = build_model(spec, 5)
    return built.model.eval(), built.tokenizer
