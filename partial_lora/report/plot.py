"""The plot: `report.png`, each task's summary metric against adapter parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from partial_lora import artifacts
from partial_lora.report.groups import Report


def plot(rep: Report, path: Path) -> bool:
    """report.png: per task, the summary metric against adapter parameters (log x), one marker
    per method with std error bars. Returns False (and writes nothing) without complete runs."""
    tasks = [t for t in rep.tasks if rep.summary[t]]
    if not tasks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.8 * rows), squeeze=False)
    colors = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(rep.labels)}
    for ax, task in zip(axes.flat, tasks, strict=False):
        _plot_task(ax, rep, task, colors)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def _plot_task(ax: Any, rep: Report, task: str, colors: dict[str, Any]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    metric = str(rep.summary[task])
    xs = []
    for g in (g for g in rep.groups if g.task == task):
        s, p = g.stat(metric), g.params()
        if s is None or p is None or p.mean <= 0:
            continue
        xs.append(p.mean)
        ax.errorbar(p.mean, s.mean, yerr=s.std or 0.0, fmt="o", capsize=3, color=colors[g.label])
        ax.annotate(g.label, (p.mean, s.mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("log")
    if xs:
        ax.set_xlim(min(xs) / 2, max(xs) * 2)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("adapter trainable parameters")
    ax.set_ylabel(f"{metric} (mean ± std)")
    models = sorted({m for g in rep.groups if g.task == task for m in g.models})
    ax.set_title(f"{task} ({', '.join(models)})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
