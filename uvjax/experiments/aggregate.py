"""Results over seeds: every run's ``DONE.json`` → ``results.json`` (every arm and seed, plus the
mean/std summary), ``results.md`` (the table: mean ± std over seeds per arm and metric),
``results.png`` (``uvjax.experiments.plots``) and, when the runs logged quick evaluations during training
(``train.eval_every``), ``curves.png``: each arm's learning curves, mean and min..max over seeds."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Sequence

import numpy as np

from uvjax.evaluation.curves import curves_over_seeds, plot_curves, read_curves
from uvjax.experiments.arms import Arm, Experiment, Panel
from uvjax.experiments.plots import plot
from uvjax.experiments.provenance import commit, machine, write_json
from uvjax.experiments.runs import load_done, run_dir


def _stats(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def aggregate(runs: list[dict], arms: Sequence[Arm], panels: Sequence[Panel]) -> list[dict]:
    """Per arm: ``{arm, group, x, seeds, wall_s, metrics: {metric: {mean, std, n}}}``."""
    out = []
    for a in arms:
        rs = [r for r in runs if r["arm"] == a.name]
        row = {"arm": a.name, "group": a.group, "x": a.x, "seeds": sorted(r["seed"] for r in rs),
               "wall_s": sum(r["wall_s"] for r in rs), "cpu_s": sum(r.get("cpu_s", 0.0) for r in rs),
               "train_steps": sorted({r["train_steps"] for r in rs}),
               "metrics": {}}
        for p in panels:
            mean, std, n = _stats([r["metrics"].get(p.metric) for r in rs])
            if n:
                row["metrics"][p.metric] = {"mean": mean, "std": std, "n": n}
        out.append(row)
    return out


def markdown_table(exp: Experiment, rows: list[dict], panels: Sequence[Panel], x_label: str) -> str:
    head = ["arm", "group", x_label, "steps", "seeds"] + [p.label for p in panels]
    lines = [f"# {exp.name}", "", "Mean ± std over seeds (sample std; 0 with one seed); — = not measured in that arm.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arm"], r["group"], "" if r["x"] is None else str(r["x"]),
                 ",".join(str(s) for s in r["train_steps"]), str(len(r["seeds"]))]
        for p in panels:
            m = r["metrics"].get(p.metric)
            cells.append("—" if m is None else f"{m['mean']:.3f} ± {m['std']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def collect(exp: Experiment, ec, arms: Sequence[Arm], workdir: str) -> dict:
    """Reads every DONE.json and writes results.json, results.md and results.png."""
    runs, missing = [], []
    for a in arms:
        for s in ec.seeds:
            d = load_done(run_dir(workdir, a, int(s)))
            (runs.append(d) if d is not None else missing.append(f"{a.name}/seed_{s}"))
    curves = {}
    for a in arms:  # the learning curves of the finished seeds (a run without quick evaluations has none)
        per_seed = [read_curves(run_dir(workdir, a, int(s))) for s in ec.seeds
                    if load_done(run_dir(workdir, a, int(s))) is not None]
        c = curves_over_seeds([p for p in per_seed if p])
        if c and any(len(v["steps"]) >= 2 for v in c.values()):
            curves[a.name] = c
    panels = exp.panels(ec)
    x_label = ec.get("x_label") or exp.x_label
    rows = aggregate(runs, arms, panels)
    results = {"experiment": exp.name, "description": exp.description, "x_label": x_label,
               "config": json.loads(ec.to_json_best_effort()), "panels": [dataclasses.asdict(p) for p in panels],
               "arms": [dataclasses.asdict(a) for a in arms], "runs": runs, "summary": rows, "missing": missing,
               "curves": curves,
               "commit": commit(), "machine": machine(),
               "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(os.path.join(workdir, "results.json"), results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown_table(exp, rows, panels, x_label))
    plot(exp, rows, panels, x_label, os.path.join(workdir, "results.png"))
    if curves:
        plot_curves(curves, os.path.join(workdir, "curves.png"),
                    title=f"{exp.name}: learning curves (mean, min..max over seeds)")
    return results
