"""``results.png``: each panel one metric against the arm variable, one series per group, error bars =
std over seeds (matplotlib, headless)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from uvjax.experiments.arms import Experiment, Panel

PANELS_PER_ROW = 4


def plot(exp: Experiment, rows: list[dict], panels: Sequence[Panel], x_label: str, path: str) -> None:
    """One panel per metric: the metric against the arm variable, one series per group, error bars = std.
    A categorical arm variable (strings) gives grouped bars. ``rows``: ``aggregate.aggregate``'s."""
    import matplotlib  # heavy; only the results plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = max(1, len(panels))
    cols = min(n, PANELS_PER_ROW)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    categorical = any(isinstance(r["x"], str) for r in rows)
    cats = list(dict.fromkeys(str(r["x"]) for r in rows)) if categorical else []
    colour = {g: f"C{i % 10}" for i, g in enumerate(dict.fromkeys(r["group"] for r in rows))}  # same in every panel
    for ax, p in zip(axes.flat, panels):
        lows = []
        groups = [g for g in dict.fromkeys(r["group"] for r in rows)
                  if (not p.groups or g in p.groups) and any(r["group"] == g and p.metric in r["metrics"] for r in rows)]
        for gi, g in enumerate(groups):
            pts = [r for r in rows if r["group"] == g and p.metric in r["metrics"]]
            ys = [r["metrics"][p.metric]["mean"] for r in pts]
            es = [r["metrics"][p.metric]["std"] for r in pts]
            lows += [y - e for y, e in zip(ys, es)]
            if categorical:
                width = 0.8 / max(1, len(groups))
                xs = [cats.index(str(r["x"])) - 0.4 + width * (gi + 0.5) for r in pts]
                ax.bar(xs, ys, width=width, yerr=es, capsize=3, label=g, color=colour[g])
            else:
                order = np.argsort([float(r["x"]) for r in pts])
                xs = [float(pts[i]["x"]) for i in order]
                ax.errorbar(xs, [ys[i] for i in order], yerr=[es[i] for i in order], marker="o", capsize=3, label=g,
                            color=colour[g])
        if lows and min(lows) >= 0:  # accuracies and distances: the axis starts at 0
            ax.set_ylim(bottom=0)
        if categorical:
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=15)
        ax.set_xlabel(x_label)
        ax.set_title(p.label, fontsize=10)
        ax.grid(alpha=0.3)
        if groups:
            ax.legend(fontsize=7)
    fig.suptitle(exp.name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
