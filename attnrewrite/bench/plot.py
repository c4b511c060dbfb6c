"""Two log-log panels: latency and peak memory against sequence length (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attnrewrite.bench.results import BenchmarkResult

_LINESTYLES = {"eager": "-", "inductor": "--", "onnxruntime": ":"}


def plot_result(result: BenchmarkResult, path: Path, *, title: str | None = None) -> Path:
    """Write the plot of ``result`` to ``path`` (format from its suffix) and return ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed: we only write files
    import matplotlib.pyplot as plt

    figure, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    has_memory = False
    for v, variant in enumerate(result.variants):
        colour = "black" if variant == "original" else colours[v % len(colours)]
        for backend in result.backends:
            rows = [
                r for r in result.rows if r.variant == variant and r.backend == backend and r.ok
            ]
            rows.sort(key=lambda r: r.length)
            style = _LINESTYLES.get(backend, "-.")
            label = variant if len(result.backends) == 1 else f"{variant} ({backend})"
            timed = [(r.length, r.median_ms) for r in rows if r.median_ms]
            if timed:
                xs, ys = zip(*timed, strict=True)
                time_ax.plot(xs, ys, style, marker="o", color=colour, label=label)
            measured = [(r.length, r.peak_mb) for r in rows if r.peak_mb]
            if measured:
                has_memory = True
                xs, ys = zip(*measured, strict=True)
                memory_ax.plot(xs, ys, style, marker="s", color=colour, label=label)
    for ax, ylabel in ((time_ax, "median latency (ms)"), (memory_ax, "peak memory added (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if not has_memory:
        memory_ax.text(
            0.5, 0.5, "memory not measured", ha="center", va="center", transform=memory_ax.transAxes
        )
    time_ax.set_title("time per forward call")
    memory_ax.set_title("peak memory per forward call")
    handles, labels = time_ax.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="center right", fontsize="small", frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 0.8 if handles else 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
