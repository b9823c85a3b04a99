"""The ablation configs (conf/experiment/ablation-*.yaml) and their driver (experiments/ablate.py):
every sweep composes into distinct, valid runs; the driver's commands; a real tiny sweep that
reuses one probe."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import load_script
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from partial_lora import config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
ABLATIONS = ["granularity", "init", "lr-scale", "masks", "mode", "rank", "shots", "tau"]
NEW_PROBE = {"shots", "rank"}  # the ablations whose probe changes with the setting
ABLATE = [sys.executable, str(ROOT / "experiments" / "ablate.py")]


def load_ablate():
    return load_script("ablate")


def compose_cfg(*overrides: str, hydra_config: bool = False):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def sweep_of(name: str) -> dict[str, list[str]]:
    """hydra.sweeper.params of an ablation, each expanded by Hydra's own override parser."""
    params = compose_cfg(f"experiment=ablation-{name}", hydra_config=True).hydra.sweeper.params
    parser = OverridesParser.create()
    out = {}
    for key, value in params.items():
        ov = parser.parse_override(f"{key}={value}")
        out[key] = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
    return out


def test_every_ablation_has_a_config():
    assert load_ablate().names() == ABLATIONS


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_sweeps_real_keys_into_distinct_valid_runs(name):
    sweep = sweep_of(name)
    assert sweep and all(len(v) > 1 for v in sweep.values())
    default = compose_cfg()
    missing = object()
    for key in sweep:  # a typo in a sweep key fails only once the sweep launches
        assert OmegaConf.select(default, key, default=missing) is not missing, key
    assert load_ablate().Ablation.load(name).params == sweep  # the driver reads the same sweep
    hydra_cfg = compose_cfg(f"experiment=ablation-{name}", hydra_config=True).hydra
    assert str(hydra_cfg.sweep.dir).startswith(f"outputs/ablation-{name}/")  # plain `plr train -m`: readable dirs
    assert OmegaConf.to_container(hydra_cfg.sweep)["subdir"] == "${task.name}/${label}/seed${seed}"
    labels = set()
    for values in itertools.product(*sweep.values()):
        cfg = compose_cfg(f"experiment=ablation-{name}", *(f"{k}={v}" for k, v in zip(sweep, values)))
        config.validate(cfg)
        for key, value in zip(sweep, values):
            assert str(OmegaConf.select(cfg, key)) == value
        labels.add(str(cfg.label))
    n = len(list(itertools.product(*sweep.values())))
    assert len(labels) == n and "partial" not in labels, labels


def test_sweep_values_are_the_issue_s():
    assert sweep_of("tau") == {"adapter.allocation.tau": ["0.8", "0.9", "0.95"],
                               "adapter.allocation.relative_to": ["probe", "gain"]}
    assert sweep_of("shots") == {"adapter.probe.shots": ["4", "8", "16", "32", "64"]}
    assert sweep_of("rank") == {"adapter.r": ["4", "8", "16", "32"]}
    assert sweep_of("masks") == {"adapter.mask.method": ["subspace", "random", "probe_magnitude"]}
    assert sweep_of("granularity") == {"adapter.mask.granularity": ["rowcol", "element"]}
    assert sweep_of("init") == {"retrain.init": ["rewind", "fresh"]}
    assert sweep_of("lr-scale") == {"retrain.adapter_lr_scale": ["1", "auto", "2", "4", "8"]}
    assert sweep_of("mode") == {"adapter.allocation.mode": ["joint", "independent"]}


def test_fixed_settings_keep_the_allocation_and_the_budget():
    for name in ("masks", "granularity"):  # the allocation is the subspace one: only the retrained masks change
        assert compose_cfg(f"experiment=ablation-{name}").adapter.allocation.search_masks == "subspace"
    assert compose_cfg("experiment=ablation-granularity").adapter.mask.method == "random"
    rank = compose_cfg("experiment=ablation-rank")
    assert rank.adapter.match.rank == 4 and rank.label == "r8-budget-r4"
    ab = load_ablate()
    assert ab.REFERENCES["rank"] == [["adapter.sparsity=0", f"adapter.r={rank.adapter.match.rank}", "label=lora-r4"]]
    assert config.sparsity(compose_cfg(*ab.REFERENCES["rank"][0])) == 0  # the reference is a dense LoRA at r=4


@pytest.mark.parametrize("name", ABLATIONS)
def test_header_gives_the_commands_the_claim_and_the_probe_reuse(name):
    text = (ROOT / "partial_lora" / "conf" / "experiment" / f"ablation-{name}.yaml").read_text()
    header = "\n".join(itertools.takewhile(lambda ln: ln.startswith("#"), text.splitlines()))
    assert text.startswith("# @package _global_\n")
    assert f"python experiments/ablate.py {name}" in header and f"plr train -m experiment=ablation-{name}" in header
    assert "docs/method.md" in header
    assert load_ablate().Ablation.load(name).reuses_probe == (name not in NEW_PROBE)
    assert ("from_run reuses" in header) == (name not in NEW_PROBE)


def test_dry_run_prints_base_sweeps_references_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ab = load_ablate()
    assert ab.main(["all", "--dry-run", "--out", "out", "--seeds", "0,1", "--", "trainer.num_workers=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("[ablate] granularity: 2 settings x 2 seed(s) = 4 runs (reuses the base run's probe); "
                        "runs in out/granularity/runs, report in out/granularity/report")
    assert "[ablate] rank: 5 settings x 2 seed(s) = 10 runs (a probe per run)" in lines[5]
    trains = [ln for ln in lines if " train -m " in ln]
    assert all(ln.startswith("  CUDA_VISIBLE_DEVICES=0 ") and ln.endswith(" trainer.num_workers=2") for ln in trains)
    assert all(" seed=0,1 " in ln and " trainer.progress=false " in ln for ln in trains)
    base = trains[0]  # first, once: the default Partial-LoRA run each reusing sweep copies its probe from
    assert "experiment=" not in base
    assert " hydra.sweep.dir=out/base 'hydra.sweep.subdir=${task.name}/seed${seed}' " in base
    sweeps = {n: next(ln for ln in trains if f" experiment=ablation-{n} " in ln) for n in ABLATIONS}
    for name, ln in sweeps.items():
        assert f" hydra.sweep.dir=out/{name}/runs 'hydra.sweep.subdir=${{task.name}}/${{label}}/seed${{seed}}' " in ln
        assert (" 'from_run=out/base/${task.name}/seed${seed}' " in ln) == (name not in NEW_PROBE)
    reference = next(ln for ln in trains if " label=lora-r4 " in ln)
    assert " adapter.sparsity=0 adapter.r=4 " in reference and " hydra.sweep.dir=out/rank/runs " in reference
    assert len(trains) == 1 + len(ABLATIONS) + 1
    assert lines[-len(ABLATIONS):] == [f"{sys.executable} -m partial_lora.cli report out/{n}/runs --out out/{n}/report"
                                       for n in ABLATIONS]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_combines_a_recipe_and_deals_seeds_to_gpus(capsys):
    ab = load_ablate()
    assert ab.main(["shots,masks", "--dry-run", "--gpus", "0,1", "--seeds", "0,1,2", "--out", "o", "--",
                    "experiment=vtab", "task=dtd"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines.count("(") == 2 and lines.count("wait") == 1
    assert ") >> o/logs/gpu0.log 2>&1 &" in lines and ") >> o/logs/gpu1.log 2>&1 &" in lines
    trains = [ln for ln in lines if " train -m " in ln]
    gpu0 = [ln for ln in trains if ln.startswith("  CUDA_VISIBLE_DEVICES=0 ")]
    gpu1 = [ln for ln in trains if ln.startswith("  CUDA_VISIBLE_DEVICES=1 ")]
    assert len(gpu0) == len(gpu1) == 3  # base, shots, masks
    assert all(" seed=0,2 " in ln for ln in gpu0) and all(" seed=1 " in ln for ln in gpu1)
    assert " experiment=vtab task=dtd" in gpu0[0]  # the base run keeps the recipe as given
    assert " 'experiment=[vtab,ablation-shots]' " in gpu0[1] and gpu0[1].endswith(" task=dtd")
    assert " 'experiment=[vtab,ablation-masks]' " in gpu0[2] and " experiment=vtab" not in gpu0[2]


@pytest.mark.parametrize("args", [["nope", "--dry-run"], ["tau", "--dry-run", "--", "seed=3"],
                                  ["tau", "--dry-run", "--", "experiment=vtab,smoke"]])
def test_bad_arguments_are_refused(args):
    with pytest.raises(SystemExit) as e:
        load_ablate().main(args)
    assert e.value.code == 2


def test_other_overrides_in_the_same_out_are_refused(tmp_path):
    ab = load_ablate()
    assert ab.check_overrides(tmp_path, ["experiment=smoke"]) is None
    assert ab.check_overrides(tmp_path, ["experiment=smoke"]) is None
    refused = ab.check_overrides(tmp_path, ["experiment=smoke", "adapter.r=4"])
    assert refused and "use another --out" in refused


@pytest.mark.slow  # 30+ s of real runs; the probe reuse itself is also covered in test_partial.py
def test_tiny_tau_sweep_reuses_one_probe_and_reports_six_settings(tmp_path):
    out = tmp_path / "abl"
    fast = ["experiment=smoke", "trainer.max_steps=2", "adapter.probe.epochs=1", "adapter.probe.val_shots=2",
            "adapter.allocation.grid=[1,0.5]", "task.max_eval_samples=16"]
    # About a minute on 2 busy cores: one base run, then a sweep of 6 runs in one process.
    res = subprocess.run([*ABLATE, "tau", "--gpus", "cpu", "--seeds", "0", "--out", str(out), "--", *fast],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    log = (out / "logs" / "gpucpu.log").read_text()
    assert res.returncode == 0, res.stderr[-2000:] + log[-3000:]

    base = out / "base" / "bbc-news" / "seed0"
    assert json.loads((base / "results.json").read_text())["status"] == "complete"
    labels = [f"tau{t}-{r}" for t in (0.8, 0.9, 0.95) for r in ("probe", "gain")]
    init = (base / "probe" / "init.safetensors").read_bytes()
    for label in labels:
        run = out / "tau" / "runs" / "bbc-news" / label / "seed0"
        results = json.loads((run / "results.json").read_text())
        assert results["status"] == "complete" and results["label"] == label
        assert results["adapter"]["allocation"]["tau"] == float(label[3:].split("-")[0])
        assert (run / "probe" / "init.safetensors").read_bytes() == init  # the base's probe, copied
    assert log.count(f"[plr] from_run: reusing probe from {base}") == 6
    assert log.count(f"[plr] from_run: reusing allocate from {base}") == 1  # tau 0.9 / probe = the base's settings

    report = (out / "tau" / "report" / "report.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| bbc-news | tau")]
    assert sorted(ln.split(" | ")[1] for ln in rows) == sorted(labels)
    assert (out / "tau" / "report" / "report.png").is_file()
    assert json.loads((out / "ablate.json").read_text()) == {"overrides": fast}

    other = [*fast, "adapter.r=4"]
    again = subprocess.run([*ABLATE, "tau", "--gpus", "cpu", "--seeds", "0", "--out", str(out), "--", *other],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "use another --out" in again.stderr  # refused before running anything
