"""Block replay (partial_lora.allocation.replay): the allocator's evaluations give identical outputs, faster."""

import logging

import pytest
import torch
from hydra import compose, initialize_config_module

from partial_lora import config as plr_config
from partial_lora.allocation.replay import BlockReplay, find_blocks
from partial_lora.training.predict import predict
from partial_lora.training.runtime import set_seed
from partial_lora.working_set.build import setup
from partial_lora.working_set.loaders import loader


def _setup(*overrides):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    set_seed(0)
    s = setup(plr_config.validate(cfg))
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for b in s.branches.values():
            b.lora_B.normal_(0, 0.5)
    batches = list(loader(s, s.data.val.select(range(12)), plr_config.train_config(cfg, eval_batch_size=5),
                          train=False))
    return s, batches


def _masked(s, config):
    """Zero the masked-out rows of B (a stand-in for the allocator's masking), as a function of config."""
    saved = {lid: b.lora_B.detach().clone() for lid, b in s.branches.items()}
    with torch.no_grad():
        for lid, rho in config.items():
            b = s.branches[lid].lora_B
            b[int(rho * b.shape[0]):] = 0
    return saved


@pytest.mark.parametrize("overrides", [["experiment=smoke"], ["experiment=smoke-vision"],
                                       ["experiment=smoke-vision", "model=tiny-vit"]],
                         ids=["hf-bert", "timm-vit", "hf-vit"])
def test_replayed_evaluations_equal_full_ones(overrides):
    s, batches = _setup(*overrides)
    lids = list(s.branches)
    model = s.built.model.eval()
    # The kind of sequence the joint search produces: one layer at a time, then several.
    configs = [{}, {lids[-1]: 0.5}, {lids[0]: 0.25}, {lids[1]: 0.5, lids[-1]: 0.25}, {lids[1]: 0.5, lids[-1]: 0.25},
               {lids[1]: 0.5, lids[-1]: 0.25, lids[-2]: 0.125}, {}]
    expected = []
    for config in configs:
        saved = _masked(s, config)
        expected.append(predict(model, batches, torch.device("cpu"))[0])
        with torch.no_grad():
            for lid, b in s.branches.items():
                b.lora_B.copy_(saved[lid])
    replay = BlockReplay(s.built.model.net, lids, budget_mb=64)
    assert replay.enabled
    got = []
    with replay:
        for config in configs:
            saved = _masked(s, config)
            replay.begin(config)
            got.append(predict(model, batches, torch.device("cpu"))[0])
            replay.end(len(batches))
            with torch.no_grad():
                for lid, b in s.branches.items():
                    b.lora_B.copy_(saved[lid])
    for e, g in zip(expected, got, strict=True):
        assert (e == g).all()
    assert replay.enabled and replay.saved_share > 0.25
    # The blocks are unpatched afterwards: the class's forward again.
    assert all("forward" not in vars(block) for block in replay.blocks)


def test_replay_switches_off_over_budget_or_without_one_block_list(caplog):
    s, batches = _setup("experiment=smoke")
    replay = BlockReplay(s.built.model.net, s.branches, budget_mb=1e-6)
    with replay, caplog.at_level(logging.INFO, logger="plr"):
        replay.begin({})
        predict(s.built.model, batches, torch.device("cpu"))
        replay.end(len(batches))
    assert not replay.enabled and "exceed the" in caplog.text and replay.size == 0
    assert find_blocks(s.built.model.net, [*s.branches, "classifier"]) is None
    assert not BlockReplay(s.built.model.net, s.branches, budget_mb=0).enabled
    names, of = find_blocks(s.built.model.net, s.branches)
    assert [n.rsplit(".", 2)[-2:] for n in names] == [["layer", "0"], ["layer", "1"]]
    assert all(n.endswith("encoder.layer.0") or n.endswith("encoder.layer.1") for n in names)
    assert sorted(set(of.values())) == [0, 1]


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + x


class _Staged(torch.nn.Module):
    """EfficientNet's layout: a stem, then stages of blocks (`blocks.<stage>.<block>`), one stage of one block."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 1)
        self.blocks = torch.nn.Sequential(*(torch.nn.Sequential(*(_Block() for _ in range(n))) for n in (1, 2, 3)))

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


def test_nested_stages_replay_block_by_block_with_equal_outputs():
    torch.manual_seed(0)
    net = _Staged().eval()
    lids = [f"blocks.{s}.{b}.conv" for s, n in enumerate((1, 2, 3)) for b in range(n)]
    names, of = find_blocks(net, lids)
    assert names == ["blocks.0", "blocks.1.0", "blocks.1.1", "blocks.2.0", "blocks.2.1", "blocks.2.2"]
    assert [of[lid] for lid in lids] == [0, 1, 2, 3, 4, 5]
    x = torch.randn(5, 3, 6, 6)
    weights = {lid: net.get_submodule(lid).weight.detach().clone() for lid in lids}

    def run(config):
        with torch.no_grad():
            for lid in lids:
                net.get_submodule(lid).weight.copy_(weights[lid] * config.get(lid, 1.0))
            return net(x)

    configs = [{}, {lids[4]: 0.5}, {lids[4]: 0.5, lids[2]: 0.25}, {lids[4]: 0.5, lids[2]: 0.25}, {lids[5]: 0.0}, {}]
    expected = [run(c) for c in configs]
    replay = BlockReplay(net, lids, budget_mb=64)
    got = []
    with replay:
        for c in configs:
            replay.begin(c)
            got.append(run(c))
            replay.end(1)
    assert replay.enabled and all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))
    assert replay.saved_share > 0.3  # e.g. the fourth evaluation repeats the third: every block replayed
