"""Line plots for the benchmarks: one line per configuration, written as a PNG (matplotlib, Agg)."""
from __future__ import annotations


def plot_lines(series: dict[str, list[tuple[float, float]]], path: str, *, title: str, xlabel: str, ylabel: str,
               logx: bool = False, reference: float | None = None) -> None:
    """`series`: label -> [(x, y)]; `reference`: a horizontal dashed line (e.g. a target ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, points in series.items():
        xs, ys = zip(*sorted(points), strict=False)
        ax.plot(xs, ys, marker="o", label=label)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=f"{reference:g}")
    if logx:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
