"""`plr export`: finished runs as PEFT LoRA adapters that stock PEFT loads with the same logits.

Runs are produced in-process (`hydra.compose` + `run_pipeline`, two steps at lr 0.05 so that B is
non-trivial), with the files `plr train` adds around the pipeline (`.hydra/config.yaml`,
`.hydra/overrides.yaml`, `git.json`). The tiny models are random-init, so the tests rebuild the
base the way the model card says: seed with the run's seed and build from `plr_config.yaml`. One
run uses a `save_pretrained` folder as a pretrained source, loaded with plain transformers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file

from partial_lora import artifacts
from partial_lora import config as plr_config
from partial_lora.errors import PlrError
from partial_lora.export import export_run, load_spec, rebuild
from partial_lora.models.backbones import build_model
from partial_lora.pipeline.runner import run_pipeline
from partial_lora.training.runtime import set_seed
from partial_lora.working_set.loaders import loader

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
PLR_FILES = ("plr_masks.safetensors", "plr_layers.json", "plr_config.yaml", "README.md")


def make_run(run_dir: Path, *overrides: str) -> Path:
    """A finished run dir, as `plr train <overrides>` leaves it."""
    overrides = ("trainer.max_steps=2", "trainer.lr=0.05", "trainer.head_lr=0.05", *overrides)
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    run_pipeline(cfg, run_dir, echo=lambda s: None)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra/config.yaml")  # unresolved, with ${now:...}, as Hydra writes it
    (run_dir / ".hydra/overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    artifacts.write_run_info(run_dir)
    return run_dir


def first_batch(run_dir: Path):
    """plr's trained model and a real eval batch of the run's test split."""
    run = load_spec(run_dir)
    s = rebuild(run, run_dir)
    batch = next(iter(loader(s, s.data.test, run.train, train=False)))
    return s, batch


def peft_logits(model, batch, family: str) -> torch.Tensor:
    with torch.no_grad():
        if family == "timm":
            return model(batch["pixel_values"])
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def user_base(out: Path, num_labels: int) -> torch.nn.Module:
    """The model card's recipe for a random-init base: seed, build from plr_config.yaml."""
    cfg = OmegaConf.load(out / "plr_config.yaml")
    set_seed(int(cfg.seed))
    return build_model(plr_config.model_spec(cfg), num_labels).model.net


def assert_exported_logits_match(run_dir: Path, out: Path) -> tuple[torch.Tensor, torch.nn.Module]:
    s, batch = first_batch(run_dir)
    with torch.no_grad():
        ours = s.built.model(batch)
    model = PeftModel.from_pretrained(user_base(out, s.data.num_labels), str(out)).eval()
    theirs = peft_logits(model, batch, s.built.model.family)
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    return ours, model


def assert_nontrivial_b(run_dir: Path, out: Path) -> None:
    trained = load_file(str(run_dir / "retrain/adapter.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.endswith("lora_B")), "B is all zero: test is void"
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("bert"), "experiment=smoke", "adapter.sparsity=0.5")


@pytest.fixture(scope="module")
def bert_export(bert_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bert-export") / "out"
    export_run(bert_run, out, merged=True, echo=lambda s: None)
    return out


def test_partial_bert_export_loads_in_peft_with_equal_logits(bert_run, bert_export):
    out = bert_export
    for name in (*PEFT_FILES, *PLR_FILES, "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    assert_nontrivial_b(bert_run, out)
    assert_exported_logits_match(bert_run, out)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["base_model_name_or_path"] == "tiny-bert"
    assert sorted(config["target_modules"]) == sorted(
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value"))
    assert "classifier" in config["modules_to_save"]
    # Zero-padding: PEFT's B is non-zero only on kept rows, A only on kept columns.
    masks, saved = load_file(str(out / "plr_masks.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    lid = "bert.encoder.layer.0.attention.self.query"
    b = next(v for k, v in saved.items() if k.endswith(f"{lid}.lora_B.weight"))
    a = next(v for k, v in saved.items() if k.endswith(f"{lid}.lora_A.weight"))
    rows, cols = masks[f"{lid}.rows"], masks[f"{lid}.cols"]
    assert b.shape == (32, 8) and a.shape == (8, 32) and len(rows) == len(cols) == 16
    assert set(b.abs().sum(1).nonzero().flatten().tolist()) <= set(rows.tolist())
    assert set(a.abs().sum(0).nonzero().flatten().tolist()) <= set(cols.tolist())

    layers = json.loads((out / "plr_layers.json").read_text())
    assert layers["layers"][lid] | {"ratio": 0.5, "d_out": 32, "d_in": 32, "rows": 16, "cols": 16, "params": 256} \
        == layers["layers"][lid]
    card = (out / "README.md").read_text()
    for text in ("Partial-LoRA", "r = 8", "| `bert.encoder.layer.0.attention.self.query` | 0.5 |", "1,024", "2,048",
                 "50.0%", "| accuracy |", "plr train trainer.max_steps=2", "plr git commit",
                 "PeftModel.from_pretrained", "random-init"):
        assert text in card, text


def test_merged_model_equals_the_unmerged_peft_model(bert_run, bert_export):
    from transformers import AutoModelForSequenceClassification

    _, batch = first_batch(bert_run)
    s_labels = json.loads((bert_export / "merged/config.json").read_text())["id2label"]
    model = PeftModel.from_pretrained(user_base(bert_export, len(s_labels)), str(bert_export)).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(str(bert_export / "merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(peft_logits(merged, batch, "hf-text"), peft_logits(model, batch, "hf-text"),
                               atol=ATOL, rtol=0)


def test_hf_vit_partial_export(tmp_path):
    run = make_run(tmp_path / "run", "experiment=smoke-vision", "model=tiny-vit", "adapter.sparsity=0.5")
    export_run(run, tmp_path / "out", echo=lambda s: None)
    assert_nontrivial_b(run, tmp_path / "out")
    assert_exported_logits_match(run, tmp_path / "out")
    assert "AutoModelForImageClassification" not in (tmp_path / "out/README.md").read_text()  # random init: plr recipe


def test_shared_input_run_exports_plain_masks_with_equal_logits(tmp_path):
    # adapter.mask.shared_input: plr's model gathers q's and v's input once (nested columns, 6 and 7
    # of 32 with spectrum ratios); the export holds the plain per-layer masks and gives its logits
    run = make_run(tmp_path / "run", "experiment=smoke", "adapter.allocation.allocator=spectrum",
                   "adapter.allocation.energy=0.5", "adapter.mask.shared_input=true")
    export_run(run, tmp_path / "out", echo=lambda s: None)
    s, _ = first_batch(run)
    assert any(b.input_group is not None and b.group_pos is not None for b in s.branches.values())
    assert_nontrivial_b(run, tmp_path / "out")
    assert_exported_logits_match(run, tmp_path / "out")


def test_element_masks_are_multiplied_in(tmp_path):
    run = make_run(tmp_path / "run", "experiment=smoke", "adapter.sparsity=0.5", "adapter.mask.granularity=element",
                   "adapter.mask.method=random")
    export_run(run, tmp_path / "out", echo=lambda s: None)
    assert_exported_logits_match(run, tmp_path / "out")
    masks = load_file(str(tmp_path / "out/plr_masks.safetensors"))
    lid = "bert.encoder.layer.1.attention.self.value"
    mask_a = masks[f"{lid}.mask_A"].bool()
    saved = load_file(str(tmp_path / "out/adapter_model.safetensors"))
    a = next(v for k, v in saved.items() if k.endswith(f"{lid}.lora_A.weight"))
    assert mask_a.shape == a.shape and not mask_a.all() and (a[~mask_a] == 0).all()


def test_timm_fused_qkv_is_one_peft_lora_of_rank_2r(tmp_path):
    run = make_run(tmp_path / "run", "experiment=smoke-vision", "adapter.sparsity=0.5")
    out = tmp_path / "out"
    export_run(run, out, merged=True, echo=lambda s: None)
    assert_nontrivial_b(run, out)
    _, model = assert_exported_logits_match(run, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert set(config["rank_pattern"].values()) == {16} and set(config["alpha_pattern"].values()) == {32}
    layer = model.get_base_model().get_submodule("blocks.0.attn.qkv")
    assert layer.r["default"] == 16 and layer.scaling["default"] == pytest.approx(2.0)
    b = layer.lora_B["default"].weight  # (96, 16): q rows [0, 32) use ranks 0-7, v rows [64, 96) ranks 8-15
    assert (b[32:64] == 0).all() and (b[:32, 8:] == 0).all() and (b[64:, :8] == 0).all()
    layers = json.loads((out / "plr_layers.json").read_text())["layers"]
    assert layers["blocks.0.attn.qkv.v"] | {"module": "blocks.0.attn.qkv", "slice": "v", "out_offset": 64,
                                           "peft_ranks": [8, 16]} == layers["blocks.0.attn.qkv.v"]
    # The merged timm checkpoint gives the same logits as the adapter.
    import timm

    merged = timm.create_model(f"local-dir:{out / 'merged'}", pretrained=True).eval()
    _, batch = first_batch(run)
    torch.testing.assert_close(peft_logits(merged, batch, "timm"), peft_logits(model, batch, "timm"), atol=ATOL, rtol=0)


def test_dense_lora_run_exports_without_masks(tmp_path):
    run = make_run(tmp_path / "run", "experiment=smoke", "adapter=lora")
    export_run(run, tmp_path / "out", echo=lambda s: None)
    assert not (tmp_path / "out/plr_masks.safetensors").exists()
    assert_exported_logits_match(run, tmp_path / "out")
    layers = json.loads((tmp_path / "out/plr_layers.json").read_text())["layers"]
    assert {la["ratio"] for la in layers.values()} == {1.0}
    assert "# LoRA adapter" in (tmp_path / "out/README.md").read_text()


def test_pretrained_local_source_loads_with_plain_transformers(tmp_path):
    """A local save_pretrained base without a pooler: a source that lacks backbone weights is refused
    (they would start random), unless the model lists them as new (model.head_modules); then they
    train with the head and are saved too."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

    torch.manual_seed(0)
    src = tmp_path / "base"
    bert_config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=128)
    BertModel(bert_config, add_pooling_layer=False).save_pretrained(src)
    source = ["experiment=smoke", "adapter.sparsity=0.5", "model.pretrained=true", f"+model.source={src}"]
    with pytest.raises(PlrError, match=r"lacks 2 of model tiny-bert's pretrained weights \(bert.pooler.dense.bias"):
        make_run(tmp_path / "refused", *source)
    run = make_run(tmp_path / "run", *source, "model.head_modules=[bert.pooler,classifier]")
    out = tmp_path / "out"
    export_run(run, out, echo=lambda s: None)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(src.resolve())
    assert any(m.startswith("bert.pooler") for m in config["modules_to_save"])
    s, batch = first_batch(run)
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"],
                                                              num_labels=s.data.num_labels)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        ours = s.built.model(batch)
    torch.testing.assert_close(peft_logits(model, batch, "hf-text"), ours, atol=ATOL, rtol=0)
    card = (out / "README.md").read_text()
    assert f'AutoModelForSequenceClassification.from_pretrained("{src.resolve()}", num_labels=5)' in card
    assert "bert.pooler" in card


def test_pretrained_hf_vit_merged_keeps_its_image_processor(tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    src = tmp_path / "base"
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(src)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(src)
    run = make_run(tmp_path / "run", "experiment=smoke-vision", "model=tiny-vit", "adapter.sparsity=0.5",
                   "model.pretrained=true", f"+model.source={src}")
    out = tmp_path / "out"
    export_run(run, out, merged=True, echo=lambda s: None)
    s, batch = first_batch(run)
    base = AutoModelForImageClassification.from_pretrained(str(src.resolve()), num_labels=10)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        ours = s.built.model(batch)
    torch.testing.assert_close(peft_logits(model, batch, "hf-vision"), ours, atol=ATOL, rtol=0)
    merged = AutoModelForImageClassification.from_pretrained(str(out / "merged")).eval()
    torch.testing.assert_close(peft_logits(merged, batch, "hf-vision"), ours, atol=ATOL, rtol=0)
    assert AutoImageProcessor.from_pretrained(str(out / "merged")).size == {"height": 32, "width": 32}
    assert "AutoModelForImageClassification.from_pretrained" in (out / "README.md").read_text()


def test_unfinished_run_is_a_one_line_error(bert_run, tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra/config.yaml").write_text((bert_run / ".hydra/config.yaml").read_text())
    with pytest.raises(PlrError, match="no finished retrain stage") as e:
        export_run(run, tmp_path / "out", echo=lambda s: None)
    assert "\n" not in str(e.value) and "plr train run_dir=" in str(e.value)
    with pytest.raises(PlrError, match="not a plr run dir"):
        export_run(tmp_path, tmp_path / "out", echo=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_non_empty_out_dir_needs_force_and_force_replaces_only_an_earlier_export(bert_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(PlrError, match="not empty.*--force"):
        export_run(bert_run, out, echo=lambda s: None)
    with pytest.raises(PlrError, match=r"holds files that are not a plr export \(keep.txt\); --force replaces only"):
        export_run(bert_run, out, force=True, echo=lambda s: None)  # plr deletes only what it wrote
    assert (out / "keep.txt").read_bytes() == b"x" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(PlrError, match="run dir itself"):
        export_run(bert_run, bert_run.parent, force=True, echo=lambda s: None)
    (out / "keep.txt").unlink()
    export_run(bert_run, out, echo=lambda s: None)
    first = (out / "adapter_model.safetensors").stat().st_ino
    export_run(bert_run, out, force=True, echo=lambda s: None)  # an earlier export is replaced
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_model.safetensors").stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folders left


def test_cli_export_subprocess(bert_run, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "partial_lora.cli", "export", str(bert_run), str(out)],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in (*PEFT_FILES, *PLR_FILES):
        assert (out / name).is_file(), name
    assert "[plr] export: wrote" in res.stdout and "adapter 1,024" in res.stdout and "README.md" in res.stdout

    bad = subprocess.run([sys.executable, "-m", "partial_lora.cli", "export", str(tmp_path / "nope"), str(out)],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plr: error:") and "does not exist" in lines[0]


def test_partial_llm_export_loads_as_a_causal_lm_adapter(tmp_path):
    from fixtures import write_commonsense

    data = write_commonsense(tmp_path / "arc", "arc-e")
    run_dir = make_run(tmp_path / "run", "experiment=smoke", "model=tiny-llama", "task=arc-e", f"task.path={data}",
                       "adapter.sparsity=0.5")
    out = tmp_path / "out"
    export_run(run_dir, out, merged=True, echo=lambda s: None)
    assert_nontrivial_b(run_dir, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] in (None, [])
    s, batch = first_batch(run_dir)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = PeftModel.from_pretrained(user_base(out, s.data.num_labels), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, s.built.model.net(**inputs).logits, atol=ATOL, rtol=0)
    assert "AutoModelForCausalLM" in (out / "README.md").read_text()


def test_force_never_deletes_a_run_dir_or_anything_inside_one(bert_run, tmp_path):
    before = sorted(p.relative_to(bert_run) for p in bert_run.rglob("*"))
    with pytest.raises(PlrError, match="lies inside the run dir"):
        export_run(bert_run, bert_run / "retrain", force=True, echo=lambda s: None)
    with pytest.raises(PlrError, match="lies inside the run dir"):
        export_run(bert_run, bert_run / "retrain" / "new", force=True, echo=lambda s: None)
    assert sorted(p.relative_to(bert_run) for p in bert_run.rglob("*")) == before  # nothing touched
    # A folder that holds another run dir (a sweep root) is refused too, even with --force.
    other = tmp_path / "sweep" / "0"
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(PlrError, match="holds the run dir .*--force would delete it"):
        export_run(bert_run, tmp_path / "sweep", force=True, echo=lambda s: None)
    assert (other / ".hydra" / "config.yaml").exists()


@pytest.mark.parametrize("out", ["..", "."])
def test_export_into_the_working_folder_or_above_it_is_one_line_and_deletes_nothing(bert_run, tmp_path, capsys,
                                                                                    monkeypatch, out):
    """`plr export RUN .. --force` ended in a traceback (os.replace on '..'); with an absolute path the same
    command would have replaced the user's folder. It is refused, and the folder is left as it was."""
    from partial_lora import cli

    here = tmp_path / "mine" / "work"
    here.mkdir(parents=True)
    (tmp_path / "mine" / "user.txt").write_text("mine\n")
    monkeypatch.chdir(here)
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(bert_run), out, "--force"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("plr: error:") and "\n" not in err, err
    assert f"out dir '{out}' is the working folder or holds it" in err
    assert sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None)
                  for p in tmp_path.rglob("*")) == before
