"""Learning curves: when each attribute is learned, in each direction.

A run with ``train.eval_every`` logs a quick evaluation (VQA and judge-read generation on the first
``train.eval_images`` test images) into ``metrics.jsonl`` as ``eval/...`` at every N steps, and the final
evaluation (the whole test split) at the last step. This module reads those points back and draws them:
:func:`plot_run_curves` for one run (``<workdir>/eval/curves.png``), :func:`curves_over_seeds` and
:func:`plot_curves` for the experiment drivers (one line per arm, mean with the min..max band over seeds).
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

from uvjax import storage_paths as sp
from uvjax.training.metrics import read_metrics

# (metric key in metrics.jsonl, panel title): the attributes the tiny model can learn, understanding then
# generation (exact time and battery stay near zero at this scale; they are in metrics.jsonl all the same)
CURVE_METRICS: tuple[tuple[str, str], ...] = (
    ("eval/vqa/weather/strict", "VQA weather"),
    ("eval/vqa/weather_pos/strict", "VQA weather corner"),
    ("eval/vqa/battery_pos/strict", "VQA battery corner"),
    ("eval/gen/weather/accuracy", "generated weather (judge)"),
    ("eval/gen/weather_pos/accuracy", "generated weather corner (judge)"),
    ("eval/gen/battery_pos/accuracy", "generated battery corner (judge)"),
)
# chance for a uniform guess: 3 weather kinds, 4 corners
CHANCE = {"weather": 1 / 3, "weather_pos": 1 / 4, "battery_pos": 1 / 4}

Curve = dict[str, tuple[list[int], list[float]]]  # metric -> (steps, values)


def read_curves(workdir: str, metrics: Sequence[str] = tuple(k for k, _ in CURVE_METRICS)) -> Curve:
    """Each metric's logged points (steps ascending) from the run's ``metrics.jsonl``; metrics never logged are
    left out."""
    logged = read_metrics(workdir)
    out: Curve = {}
    for key in metrics:
        pts = sorted((int(step), float(rec[key])) for step, rec in logged.items()
                     if isinstance(rec.get(key), (int, float)))
        if pts:
            out[key] = ([s for s, _ in pts], [v for _, v in pts])
    return out


def curves_over_seeds(per_seed: Sequence[Curve]) -> dict[str, dict[str, list[float]]]:
    """Per metric, at the steps every seed logged: ``{steps, mean, lo, hi, n}`` (lo/hi: min/max over seeds).
    Seeds of one arm log at the same steps; a step some seed lacks (a run stopped early) is left out."""
    out = {}
    for key in sorted({k for c in per_seed for k in c}):
        have = [dict(zip(*c[key])) for c in per_seed if key in c]
        steps = sorted(set.intersection(*(set(h) for h in have))) if have else []
        if not steps:
            continue
        vals = np.array([[h[s] for s in steps] for h in have], np.float64)
        out[key] = {"steps": steps, "mean": vals.mean(0).tolist(), "lo": vals.min(0).tolist(),
                    "hi": vals.max(0).tolist(), "n": len(have)}
    return out


def plot_curves(series: Mapping[str, Mapping[str, Mapping[str, list]]], path: str, title: str = "",
                panels: Sequence[tuple[str, str]] = CURVE_METRICS) -> None:
    """One panel per metric, one line per series (``{label: {metric: {steps, mean[, lo, hi]}}}``), the lo..hi
    band shaded and chance dotted; a PNG at ``path`` (local or gs://)."""
    import matplotlib  # heavy; only the plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes.flat, panels):
        for i, (name, curves) in enumerate(series.items()):
            c = curves.get(key)
            if not c:
                continue
            ax.plot(c["steps"], c["mean"], marker="o", ms=3, color=f"C{i % 10}", label=name)
            if "lo" in c and c.get("n", 1) > 1:
                ax.fill_between(c["steps"], c["lo"], c["hi"], color=f"C{i % 10}", alpha=0.2)
        attr = key.split("/")[2]
        if attr in CHANCE:
            ax.axhline(CHANCE[attr], color="grey", ls=":", lw=1)
        ax.set_ylim(0, 1.02)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1 and ax.has_data():
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    sp.atomic_write_bytes(path, buf.getvalue())


def plot_run_curves(workdir: str) -> str | None:
    """``<workdir>/eval/curves.png`` when the run logged evaluations at two steps or more (else None)."""
    curves = read_curves(workdir)
    if not any(len(steps) >= 2 for steps, _ in curves.values()):
        return None
    path = sp.join(workdir, "eval", "curves.png")
    sp.makedirs(sp.join(workdir, "eval"))
    plot_curves({"run": {k: {"steps": s, "mean": v} for k, (s, v) in curves.items()}}, path,
                title=f"{workdir}: quick evaluations (first points) and the final one (last point)")
    return path
