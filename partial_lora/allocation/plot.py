"""The allocation's picture: the keep ratio per layer (`allocate/allocation.png`)."""

from __future__ import annotations

from pathlib import Path

from partial_lora import artifacts
from partial_lora.allocation.allocators import Allocation


def plot(alloc: Allocation, path: Path, title: str) -> None:
    """Bar chart of the keep ratio per layer (log2 axis), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [la.name for la in alloc.layers]
    ratios = [la.ratio for la in alloc.layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), ratios, color="#3b6ea5")
    ax.set_yscale("log", base=2)
    floor = min(min(ratios), min(alloc.grid or [1.0]))
    ax.set_ylim(floor / 1.5, 1.3)
    ax.set_ylabel("keep ratio ρ (rows and columns)")
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=6)
    red = 100.0 * (1 - alloc.params() / max(1, alloc.dense_params()))
    ax.set_title(f"{title} · {alloc.allocator}: {alloc.params():,} params ({red:.1f}% fewer than dense)", fontsize=8)
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _short(name: str) -> str:
    """`bert.encoder.layer.3.attention.self.query` -> `3.self.query` (tick labels)."""
    parts = name.split(".")
    nums = [p for p in parts if p.isdigit()]
    return ".".join(nums[:1] + parts[-2:])
