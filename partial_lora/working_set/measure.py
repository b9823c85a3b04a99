"""What a stage measures on the working set's model before it trains: the SNIP importance of the
adapted layers' W0 (`adapter.mask.method=snip`, `adapter=shira_snip`) and the layers that read one
input tensor (`adapter.mask.shared_input`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from partial_lora import distributed
from partial_lora.adapter import snip
from partial_lora.adapter.inject import layer_id
from partial_lora.adapter.input_groups import trace
from partial_lora.adapter.lora import LoRALinear
from partial_lora.errors import PlrError
from partial_lora.spec import RunSpec
from partial_lora.training.predict import predict
from partial_lora.training.runtime import autocast_dtype
from partial_lora.working_set.build import Setup
from partial_lora.working_set.loaders import loader


def input_groups(spec: RunSpec, s: Setup) -> list[list[str]]:
    """The model's input groups (`input_groups.trace`), from one forward pass of two training examples."""
    split = s.data.train.select(range(min(2, len(s.data.train))))
    batches = [next(iter(loader(s, split, spec.train, train=False)))]
    model = s.built.model.to(s.device)
    return trace(s.built.model.net, lambda: predict(model, batches, s.device, autocast_dtype(spec.train, s.device)))


def snip_scores(spec: RunSpec, s: Setup,
                layers: Mapping[str, tuple[str, int, int]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """SNIP importance (`partial_lora.adapter.snip.importance`) of the W0 slice of each layer, and what was read.

    Args:
        layers: layer id -> (module name, first output row of its slice, its rows).

    Returns:
        The scores by layer id (d_out × d_in, on the run's device), and the record for masks.json:
        the batches, their size, the seed and the training examples read (indices into the
        training split), in order.
    """
    if distributed.sharded():
        raise PlrError("SNIP importance needs each W0 whole on one process, and trainer.strategy=fsdp shards it; "
                       "use trainer.strategy=ddp with adapter.mask.method=snip or adapter=shira_snip")
    cfg, tc = spec.snip, spec.train
    size = cfg.batch_size or tc.batch_size
    examples = snip.examples(len(s.data.train), cfg.batches, size, spec.seed)
    batches = loader(s, s.data.train.select(examples), replace(tc, eval_batch_size=size), train=False)
    model = s.built.model.to(s.device)
    net = model.net
    weights = {m: net.get_submodule(m).weight for m, _, _ in layers.values()}
    dtype = autocast_dtype(tc, s.device)

    def loss(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(s.device) for k, v in batch.items()}
        with torch.autocast(s.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return model.loss(model(batch), batch)

    was_training = model.training
    model.eval()  # no dropout: the scores depend on the rows read and nothing else
    try:
        full = snip.importance(loss, weights, batches)
    finally:
        model.train(was_training)
    scores = {lid: full[m].reshape(full[m].shape[0], -1)[offset:offset + d_out]
              for lid, (m, offset, d_out) in layers.items()}
    n_batches = -(-len(examples) // size)
    print(f"[plr] snip: importance of {len(layers)} layers from {n_batches} training batches of {size} examples "
          f"(seed {spec.seed})")
    return scores, {"batches": n_batches, "batch_size": size, "seed": spec.seed, "examples": examples}


def snip_of_branches(spec: RunSpec, s: Setup) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`snip_scores` of every plr LoRA branch of the model (a fused projection's slices each get theirs)."""
    layers = {layer_id(name, key): (name, b.offset, b.d_out)
              for name, mod in s.built.model.net.named_modules() if isinstance(mod, LoRALinear)
              for key, b in mod.branches.items()}
    return snip_scores(spec, s, layers)
