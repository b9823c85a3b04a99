"""The study's arms: what each compares, and the overrides that make its run.

Each arm (`ARMS`) is an ordinary `plr train` run; its overrides are given the dir of the same task
and seed's Partial-LoRA run, which the arms built on it read (its budget or its allocation).
`study.plan` turns a suite's tasks, seeds and arms into jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PARTIAL = "partial"


@dataclass(frozen=True)
class Arm:
    """One arm: its overrides, given the dir of the same task and seed's Partial-LoRA run.

    `needs_partial`: it reads that run (its budget or its allocation). `probes`: it probes and
    allocates itself, so its tuned runs reuse its untuned run's probe and allocation. `keeps`: keys
    of its own that a variant's overrides do not replace (a key, or a prefix ending in '.'): the SNIP
    arms keep their mask method, the SHiRA arms their mask and one scale, the rank-1-budget arm its
    budget. `tuned`: a tuning grid applies to it.
    """

    name: str
    about: str
    overrides: Callable[[Path], list[str]]
    needs_partial: bool = False
    probes: bool = False
    keeps: tuple[str, ...] = ()
    tuned: bool = True


SNIP_KEEPS = ("adapter.mask.method", "adapter.mask.granularity")
# SHiRA draws its own mask (adapter.shira), and its PEFT layers have no per-layer scale to apply.
SHIRA_KEEPS = ("adapter.mask.", "retrain.lr_scale_per_layer")
BUDGET_KEYS = ("adapter.allocation.budget", "adapter.match.")

ARMS: dict[str, Arm] = {a.name: a for a in (
    # Not tuned: no adapter, and its head learns at the rate every arm's head shares.
    Arm("head", "only the task head trains (no adapter; zero-shot on a causal LM)", lambda p: ["adapter=head"],
        tuned=False),
    Arm("lora", "dense LoRA r=8", lambda p: ["adapter=lora"]),
    Arm(PARTIAL, "Partial-LoRA with the default settings (adapter.sparsity=auto)", lambda p: [], probes=True),
    Arm("partial-random", "Partial-LoRA's allocation with random rows/cols",
        lambda p: [f"from_run={p}", "adapter.mask.method=random", "adapter.allocation.search_masks=subspace"],
        needs_partial=True),
    Arm("uniform", "uniform random rows/cols at Partial-LoRA's budget",
        lambda p: ["adapter=uniform", f"adapter.match.run={p}"], needs_partial=True),
    Arm("lora-matched", "dense LoRA at the rank closest to Partial-LoRA's budget",
        lambda p: ["adapter=lora_matched", f"adapter.match.run={p}"], needs_partial=True),
    Arm("partial-r32-rank1", "Partial-LoRA at r=32 rescaled to the budget of a dense rank-1 LoRA",
        lambda p: ["adapter.r=32", "adapter.match.rank=1"], probes=True, keeps=BUDGET_KEYS),
    Arm("lora-r1", "dense LoRA r=1", lambda p: ["adapter=lora", "adapter.r=1"]),
    Arm("peft-lora", "PEFT's LoRA r=8 (cross-check of plr's layer)", lambda p: ["adapter=peft_lora"]),
    # The peer methods a user would pick instead, at Partial-LoRA's budget (docs/method.md, "Peer methods").
    Arm("shira-random", "Random Masking: PEFT's SHiRA with a random mask at Partial-LoRA's budget",
        lambda p: ["adapter=shira_random", f"adapter.match.run={p}"], needs_partial=True, keeps=SHIRA_KEEPS),
    Arm("shira-snip", "PEFT's SHiRA with a SNIP mask at Partial-LoRA's budget",
        lambda p: ["adapter=shira_snip", f"adapter.match.run={p}"], needs_partial=True, keeps=SHIRA_KEEPS),
    Arm("snip-rows", "TASO-style rows/cols of largest SNIP importance at one ratio, at Partial-LoRA's budget",
        lambda p: ["adapter=snip", f"adapter.match.run={p}"], needs_partial=True, keeps=SNIP_KEEPS),
    # At Partial-LoRA's own per-layer allocation (named like partial-random: '@' would read as a variant).
    Arm("partial-snip", "Partial-LoRA's allocation with the rows/cols of largest SNIP importance",
        lambda p: [f"from_run={p}", "adapter.mask.method=snip", "adapter.allocation.search_masks=subspace"],
        needs_partial=True, keeps=SNIP_KEEPS),
)}


# The arms built on Partial-LoRA's settings: a variant's overrides go to these.
VARIANT_ARMS = (PARTIAL, "partial-random", "uniform", "lora-matched", "partial-r32-rank1", "partial-snip",
                "snip-rows", "shira-random", "shira-snip")
# The matched controls take their budget from the variant's Partial-LoRA run (adapter.match.run), so a
# variant's own budget keys (how *it* picks its budget, e.g. allocator=proportional with a budget) stay off
# them: given both, a run refuses two budgets.
MATCHED_CONTROLS = ("uniform", "lora-matched", "snip-rows", "shira-random", "shira-snip")
