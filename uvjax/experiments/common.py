"""The experiment driver shared by ``uvjax/experiments/<name>.py``: arms × seeds → runs → results.

An experiment is a config (``configs/experiments/<name>.py``: a base model config, overrides shared by
every arm, the arm variable's values, seeds, evaluation settings) plus a driver module that turns the
config into :class:`Arm` objects and says what to plot. Nothing here forks the trainer: every run is
``uvjax.train.run_all`` (cached stages + LM) followed by ``uvjax.evaluate.evaluate_run``, in-process, in
its own work directory ``<workdir>/<arm>/seed_<seed>``; all runs share one stage cache (tokenizer, VQ,
SigLIP tower, pre-tokenised data, judge), so data and towers are built once per experiment.

What the driver writes under ``--workdir``:

    <arm>/seed_<s>/             the run (checkpoints, metrics.jsonl, eval/step_N/report.json, ...)
    <arm>/seed_<s>/DONE.json    written last: metrics, wall time, steps, commit, machine. A rerun skips
                                the runs that have it (and resumes the others from their checkpoints)
    budget.json                 measured examples per step of each arm (steps for equal samples per task)
    results.json                every arm and seed: metrics, wall time, commit, machine
    results.md                  the table: mean ± std over seeds per arm and metric
    results.png                 the plot: each panel one metric against the arm variable, error bars = std

**Equal samples per task.** An arm with ``match=(stream, reference arm)`` gets the number of steps that
makes it see as many ``stream`` examples as the reference arm sees in its ``train.steps``. Examples per
step are measured on the real pipeline (packing makes them depend on the mix), over
``budget_batches`` batches; the mix's proportions are exact (grain ``mix``), so a stream's share of the
examples is its weight's share. E.g. understanding-only vs unified: the single-task arm trains on the
unified arm's understanding examples only, in fewer steps (the paper's 305 vs 459 steps).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DONE_FILE = "DONE.json"


# ------------------------------------------------------------------------------------------ arms
@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of an experiment, run once per seed.

    ``overrides``: ``(("dotted.key", value), ...)`` applied on top of the base config and the
    experiment's shared overrides (missing leaf keys are created, e.g. ``data.streams.generation.fraction``).
    ``group``: the series it belongs to in the plot; ``x``: its value of the arm variable (a number, or a
    string for a categorical axis). ``base``: another base config than the experiment's (e.g.
    ``siglipvq.py:tiny``). ``match``: ``(stream, reference arm name)``: see the module doc.
    ``eval_tasks``: the evaluation tasks of this arm (default: the experiment's)."""
    name: str
    overrides: tuple[tuple[str, Any], ...] = ()
    group: str = ""
    x: float | str | None = None
    base: str = ""
    match: tuple[str, str] | None = None
    eval_tasks: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Panel:
    """One plot panel and table column: ``metric`` (a key of the run's metrics), its label, and the
    groups it shows (empty: every group that has the metric)."""
    metric: str
    label: str
    groups: tuple[str, ...] = ()


# Per-attribute panels shown beside a driver's headline metrics: the attributes the `tiny` model can
# learn (weather, the two corners) and, for generation, the Fréchet distance; exact time and battery stay
# near zero at this scale (tiny-scale-calibration.md), so they would only widen the tables.
VQA_DETAIL = (Panel("vqa/weather/strict", "VQA weather"), Panel("vqa/weather_pos/strict", "VQA weather corner"),
              Panel("vqa/battery_pos/strict", "VQA battery corner"))
GEN_DETAIL = (Panel("gen/weather/accuracy", "generation weather (judge)"),
              Panel("gen/weather_pos/accuracy", "generation weather corner (judge)"),
              Panel("gen/battery_pos/accuracy", "generation battery corner (judge)"),
              Panel("gen/frechet_judge", "Fréchet distance (judge features, lower is better)"))


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a driver module declares: how to build the arms from the experiment config, what to plot,
    and optionally extra per-run metrics (``extra(ec, arm, run_dir, cfg) -> {name: float}``)."""
    name: str
    arms: Callable[[Any], list[Arm]]
    panels: Callable[[Any], list[Panel]]
    x_label: str
    extra: Callable[[Any, Arm, str, Any], dict] | None = None
    description: str = ""


# ------------------------------------------------------------------------------------------ configs
def load_base(spec: str):
    """``"vqvq.py:tiny"`` / ``"configs/vqvq.py:tiny"`` / ``"vqvq"`` → that config file's ``get_config``."""
    from uvjax.config import load_config_file
    path, _, preset = spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return load_config_file(name, preset or None)


def set_dotted(cfg, key: str, value) -> None:
    """``cfg[a][b][c] = value`` for ``"a.b.c"``; the leaf may be new (its parent must exist)."""
    parts = key.split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        if p not in node:
            raise KeyError(f"override {key!r}: no section {'.'.join(parts[:i + 1])!r} in the config")
        node = node[p]
    leaf = parts[-1]
    if isinstance(value, list):
        value = tuple(value)
    with node.unlocked() if hasattr(node, "unlocked") else _null():
        if leaf in node and isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        node[leaf] = value


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def pairs(overrides) -> list[tuple[str, Any]]:
    """Experiment-config overrides (a tuple of (key, value) pairs or a dict) as a list of pairs."""
    if not overrides:
        return []
    if hasattr(overrides, "items"):
        return [(k, v) for k, v in overrides.items()]
    return [(str(k), v) for k, v in overrides]


def arm_config(ec, arm: Arm, seed: int, workdir: str, *, steps: int | None = None):
    """The full training config of one run: base config + shared overrides + the arm's + seed/cache."""
    cfg = load_base(arm.base or ec.base)
    for k, v in pairs(ec.get("overrides")) + list(arm.overrides):
        set_dotted(cfg, k, v)
    layout = ec.get("layout", "") or "two_heads"
    if layout == "shared_vocab":  # the same experiment on the Chameleon/Anole layout (config.shared_vocab_layout)
        from uvjax.config import shared_vocab_layout
        shared_vocab_layout(cfg)
    elif layout != "two_heads":
        raise ValueError(f"experiment config layout={layout!r}; expected 'two_heads' or 'shared_vocab'")
    set_dotted(cfg, "train.seed", int(seed))
    set_dotted(cfg, "stages.cache_dir", cache_dir(ec, workdir))
    set_dotted(cfg, "stages.evaluate.enabled", False)  # the driver evaluates with the experiment's settings
    if steps is not None:
        set_dotted(cfg, "train.steps", int(steps))
    return cfg


def cache_dir(ec, workdir: str) -> str:
    return os.path.abspath(ec.get("cache_dir") or os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache"))


# ------------------------------------------------------------------------------------------ budget
def _stream_shares(cfg) -> dict[str, float]:
    from uvjax.data.storage import expand_paths
    w = {}
    for name in cfg.data.streams.keys():
        s = cfg.data.streams[name]
        if float(s.weight) > 0 and s.paths and expand_paths(list(s.paths)) and float(s.get("fraction", 1.0)) > 0:
            w[name] = float(s.weight)
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def measure_examples_per_step(cfg, run_dir: str, batches: int) -> dict:
    """Builds (or reuses) the stages, then reads ``batches`` batches of the arm's real pipeline and counts
    the packed examples (segments). Returns ``{"examples_per_step", "shares": {stream: fraction}}``."""
    from uvjax.stages import prepare
    from uvjax.train import build_data_iterator
    cfg, _ = prepare(cfg, run_dir, progress=False)
    it = build_data_iterator(cfg, run_dir, int(cfg.train.batch_size) // int(cfg.train.grad_accum))
    n = 0
    try:
        for _ in range(batches):
            seg = np.asarray(next(it)["segment_ids"])
            n += int(seg.max(axis=1).sum())
    finally:
        if hasattr(it, "close"):
            it.close()
    return {"examples_per_step": n * int(cfg.train.grad_accum) / batches, "shares": _stream_shares(cfg)}


def plan_steps(ec, arms: Sequence[Arm], workdir: str) -> dict[str, int]:
    """``train.steps`` of every arm; ``match`` arms from measured examples per step (cached in budget.json)."""
    path = os.path.join(workdir, "budget.json")
    budget = _read_budget(path)
    by_name = {a.name: a for a in arms}
    seed0 = int(ec.seeds[0])

    def measure(a: Arm) -> dict:
        key = json.dumps([a.base or ec.base, pairs(ec.get("overrides")), list(a.overrides)] + _layout_key(ec),
                         sort_keys=True, default=str)
        if a.name not in budget or budget[a.name].get("key") != key:
            cfg = arm_config(ec, a, seed0, workdir)
            m = measure_examples_per_step(cfg, os.path.join(workdir, a.name, "budget"), int(ec.get("budget_batches", 16)))
            budget[a.name] = {"key": key, **m, "configured_steps": int(cfg.train.steps)}
            _write_budget(path, budget)
        return budget[a.name]

    steps = {}
    for a in arms:
        base_steps = int(arm_config(ec, a, seed0, workdir).train.steps)
        if a.match is None:
            steps[a.name] = base_steps
            continue
        stream, ref_name = a.match
        if ref_name not in by_name:
            raise ValueError(f"arm {a.name!r} matches {ref_name!r}, which is not an arm of this experiment")
        ref = by_name[ref_name]
        if ref.match is not None:
            raise ValueError(f"arm {a.name!r}: the reference arm {ref_name!r} must have its own train.steps")
        mr, ma = measure(ref), measure(a)
        if stream not in mr["shares"] or stream not in ma["shares"]:
            raise ValueError(f"arm {a.name!r}: stream {stream!r} must be active in it and in {ref_name!r}")
        ref_examples = int(arm_config(ec, ref, seed0, workdir).train.steps) * mr["examples_per_step"] * mr["shares"][stream]
        steps[a.name] = max(1, int(round(ref_examples / (ma["examples_per_step"] * ma["shares"][stream]))))
        budget[a.name]["matched"] = {"stream": stream, "reference": ref_name, "examples": ref_examples,
                                     "steps": steps[a.name]}
        _write_budget(path, budget)
    return steps


def _read_budget(path: str) -> dict:
    """``budget.json`` (a cache of measurements: each arm's entry is redone when missing). A damaged one (does
    not parse, or its digest differs: a flipped digit must not change an arm's steps) is moved aside as
    ``budget.json.damaged`` with a warning naming it, and every arm is measured again."""
    from uvjax import integrity_files as itg
    if not os.path.exists(path):
        return {}
    try:
        budget = itg.read_json(path, "budget cache")
        if not isinstance(budget, dict):
            raise itg.DamagedFile(f"{path}: damaged budget cache: a JSON object expected")
        if BUDGET_DIGEST in budget and _budget_digest(budget) != budget[BUDGET_DIGEST]:
            raise itg.DamagedFile(f"{path}: damaged budget cache: its content does not match its digest")
    except itg.DamagedFile as e:
        os.replace(path, path + ".damaged")
        print(f"WARNING: {e}; moved to {path}.damaged: every arm's examples per step are measured again",
              flush=True)
        return {}
    return {k: v for k, v in budget.items() if k != BUDGET_DIGEST}


BUDGET_DIGEST = "__digest__"  # the digest of the other keys (arm names)


def _budget_digest(budget: dict) -> str:
    import hashlib
    body = json.dumps({k: v for k, v in budget.items() if k != BUDGET_DIGEST}, sort_keys=True, default=_json_default)
    return hashlib.sha256(body.encode()).hexdigest()


def _write_budget(path: str, budget: dict) -> None:
    _write_json(path, {**budget, BUDGET_DIGEST: _budget_digest(budget)})


# ------------------------------------------------------------------------------------------ provenance
@functools.lru_cache(maxsize=None)
def commit() -> str:
    """The git commit of the code this process runs: read once (``main`` reads it at start), since a
    long experiment keeps the modules it imported while the checkout may move on under it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    import jax
    devs = jax.devices()
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": len(devs), "device_kind": devs[0].device_kind if devs else ""}


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default, sort_keys=False)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


# ------------------------------------------------------------------------------------------ one run
def run_dir(workdir: str, arm: Arm, seed: int) -> str:
    return os.path.join(workdir, arm.name, f"seed_{seed}")


def load_done(path: str) -> dict | None:
    """The finished run's record in ``path`` (None: not finished), checked against its digest (records
    written before digests have none). A damaged one raises ``DamagedFile`` naming it and saying what to do
    (it holds the run's results: never redone behind the user's back)."""
    from uvjax.integrity_files import DamagedFile, read_json, seal
    p = os.path.join(path, DONE_FILE)
    if not os.path.exists(p):
        return None
    todo = (f"It holds the run's results; restore it from a copy, or move it aside (mv {p} {p}.damaged) and rerun "
            "the experiment: that run is evaluated again from its last checkpoint (and trained again if the "
            "checkpoint is gone)")
    done = read_json(p, "record of a finished experiment run", todo)
    if not isinstance(done, dict):
        raise DamagedFile(f"{p}: damaged record of a finished experiment run: a JSON object expected. {todo}")
    if "digest" in done and seal(done)["digest"] != done["digest"]:
        raise DamagedFile(f"{p}: damaged record of a finished experiment run: its content does not match its "
                          f"digest. {todo}")
    return {k: v for k, v in done.items() if k != "digest"}


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) of this process: on a shared machine, the honest cost."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Interrupted(Exception):
    """SIGTERM/SIGINT reached the trainer: it checkpointed; rerunning the driver resumes."""


def arm_key(ec, arm: Arm) -> str:
    """What an arm's results depend on (base, overrides, evaluation settings); a finished run of another
    key in the same work dir is refused instead of being mixed into the table."""
    return json.dumps([arm.base or ec.base, pairs(ec.get("overrides")), list(arm.overrides), arm.match,
                       list(arm.eval_tasks or ()), json.loads(ec.eval.to_json_best_effort(sort_keys=True))]
                      + _layout_key(ec), sort_keys=True, default=str)


def _layout_key(ec) -> list:
    """The model layout joins an arm's key when it is not the default (keys of earlier runs stay valid)."""
    layout = ec.get("layout", "") or "two_heads"
    return [] if layout == "two_heads" else [{"layout": layout}]


def check_done(ec, arm: Arm, seed: int, workdir: str) -> dict | None:
    d = load_done(run_dir(workdir, arm, seed))
    if d is not None and d.get("key") not in (None, arm_key(ec, arm)):
        raise ValueError(f"{run_dir(workdir, arm, seed)} holds a finished run of another configuration of arm "
                         f"{arm.name!r}; use another --workdir, or delete that run directory to redo it")
    return d


def run_one(exp: Experiment, ec, arm: Arm, seed: int, steps: int, workdir: str) -> dict:
    """Trains + evaluates one arm × seed in ``<workdir>/<arm>/seed_<seed>`` and writes DONE.json last."""
    import jax
    from uvjax.evaluate import evaluate_run, flat_metrics
    from uvjax.stages_features import evaluation_kwargs
    from uvjax.train import run_all
    from uvjax.training.lock import workdir_lock
    rd = run_dir(workdir, arm, seed)
    cfg = arm_config(ec, arm, seed, workdir, steps=steps)
    t0, c0 = time.time(), _cpu_s()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:  # the trainer installs its own handlers (checkpoint and stop); give the previous ones back after
        with workdir_lock(rd, enabled=jax.process_index() == 0):
            summary = run_all(cfg, rd)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if summary.get("stopped_by_signal"):
        raise Interrupted(f"{rd}: stopped by a signal at step {summary.get('step')}; rerun to resume")
    t_train = time.time() - t0
    ev = ec.eval
    tasks = tuple(arm.eval_tasks if arm.eval_tasks is not None else ev.tasks)
    t1 = time.time()
    metrics: dict[str, float] = {}
    report_path = None
    if tasks:
        from uvjax.inference.loading import load_config
        report = evaluate_run(rd, num_images=int(ev.num_images) or None, judge_preset=str(ev.judge_preset),
                              batch_size=int(ev.batch_size), tasks=tasks, seed=int(ev.get("sample_seed", 0)),
                              progress=False, **evaluation_kwargs(rd, load_config(rd)))
        metrics.update({k[len("eval/"):] if k.startswith("eval/") else k: v for k, v in flat_metrics(report).items()})
        report_path = report.get("files", {}).get("report")
    if exp.extra is not None:
        from uvjax.inference.loading import load_config
        metrics.update({k: float(v) for k, v in exp.extra(ec, arm, rd, load_config(rd)).items()})
    t_eval = time.time() - t1
    done = {"experiment": exp.name, "arm": arm.name, "key": arm_key(ec, arm), "group": arm.group, "x": arm.x,
            "seed": int(seed),
            "train_steps": int(cfg.train.steps), "steps_run": int(summary.get("steps_run", 0)),
            "metrics": metrics, "wall_s": round(time.time() - t0, 2), "cpu_s": round(_cpu_s() - c0, 2),
            "train_wall_s": round(t_train, 2), "eval_wall_s": round(t_eval, 2), "eval_tasks": list(tasks),
            "report": report_path, "overrides": [[k, v] for k, v in list(arm.overrides)],
            "base": arm.base or ec.base, "commit": commit(), "machine": machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    from uvjax.integrity_files import seal  # a digest of the record: a flipped digit that still parses is caught
    _write_json(os.path.join(rd, DONE_FILE), seal(json.loads(json.dumps(done, default=_json_default))))
    return done


# ------------------------------------------------------------------------------------------ aggregation
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


PANELS_PER_ROW = 4


def plot(exp: Experiment, rows: list[dict], panels: Sequence[Panel], x_label: str, path: str) -> None:
    """One panel per metric: the metric against the arm variable, one series per group, error bars = std.
    A categorical arm variable (strings) gives grouped bars."""
    import matplotlib
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


def collect(exp: Experiment, ec, arms: Sequence[Arm], workdir: str) -> dict:
    """Reads every DONE.json and writes results.json, results.md and results.png."""
    runs, missing = [], []
    for a in arms:
        for s in ec.seeds:
            d = load_done(run_dir(workdir, a, int(s)))
            (runs.append(d) if d is not None else missing.append(f"{a.name}/seed_{s}"))
    panels = exp.panels(ec)
    x_label = ec.get("x_label") or exp.x_label
    rows = aggregate(runs, arms, panels)
    results = {"experiment": exp.name, "description": exp.description, "x_label": x_label,
               "config": json.loads(ec.to_json_best_effort()), "panels": [dataclasses.asdict(p) for p in panels],
               "arms": [dataclasses.asdict(a) for a in arms], "runs": runs, "summary": rows, "missing": missing,
               "commit": commit(), "machine": machine(),
               "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_json(os.path.join(workdir, "results.json"), results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown_table(exp, rows, panels, x_label))
    plot(exp, rows, panels, x_label, os.path.join(workdir, "results.png"))
    return results


# ------------------------------------------------------------------------------------------ driver
def run_experiment(exp: Experiment, ec, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Every arm × seed not yet DONE, then the results files. A failing run is reported and the others
    go on; the driver then exits non-zero (rerun to retry only the missing runs)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    arms = exp.arms(ec)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate arm names in {exp.name}: {names}")
    _write_json(os.path.join(workdir, "experiment_config.json"), json.loads(ec.to_json_best_effort()))
    todo = [(a, int(s)) for a in arms for s in ec.seeds if check_done(ec, a, int(s), workdir) is None]
    log(f"[{exp.name}] {len(arms)} arms x {len(ec.seeds)} seeds: {len(todo)} to run, "
        f"{len(arms) * len(ec.seeds) - len(todo)} already done")
    steps = plan_steps(ec, arms, workdir) if todo else {}
    failures = []
    for i, (a, s) in enumerate(todo):
        log(f"[{exp.name}] ({i + 1}/{len(todo)}) {a.name} seed {s}: {steps[a.name]} steps")
        try:
            d = run_one(exp, ec, a, s, steps[a.name], workdir)
        except Interrupted:
            collect(exp, ec, arms, workdir)
            raise
        except Exception as e:  # noqa: BLE001  (one broken arm must not lose the others)
            import traceback
            failures.append(f"{a.name}/seed_{s}: {type(e).__name__}: {e}")
            log(f"[{exp.name}] FAILED {a.name} seed {s}:\n{traceback.format_exc()}")
            if ec.get("stop_on_error", False):
                break
            continue
        log(f"[{exp.name}] done {a.name} seed {s} in {d['wall_s']:.0f}s: " +
            ", ".join(f"{p.metric}={d['metrics'][p.metric]:.3f}" for p in exp.panels(ec) if p.metric in d["metrics"]))
    results = collect(exp, ec, arms, workdir)
    results["failures"] = failures
    log(f"[{exp.name}] wrote {os.path.join(workdir, 'results.md')} and results.png")
    return results


def enable_compilation_cache(ec, workdir: str) -> None:
    """Arms of one experiment compile the same programs (train step, decoding loops) again and again: a
    persistent XLA cache in ``<cache_dir>/xla`` (``ec.compilation_cache``) compiles each once. An explicit
    ``JAX_COMPILATION_CACHE_DIR`` wins."""
    if not ec.get("compilation_cache", True) or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(ec, workdir), "xla"))


def main(exp: Experiment):
    """``python -m uvjax.experiments.<name> --config=configs/experiments/<name>.py[:quick] --workdir=DIR``.
    The ``--config`` / ``--workdir`` flags are uvjax.train's (one definition for every command)."""
    from absl import app, flags, logging
    import uvjax.train  # noqa: F401  (defines --config and --workdir)

    commit()  # pin the code's commit before any arm runs

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        F = flags.FLAGS
        if F.verbosity <= 0:
            logging.set_verbosity(logging.WARNING)
        ec = F.config
        if ec is None:
            raise app.UsageError(f"--config is required, e.g. --config=configs/experiments/{exp.name}.py")
        workdir = F.workdir or ec.get("workdir") or os.path.join("runs", "experiments", ec.get("name", exp.name))
        enable_compilation_cache(ec, workdir)
        try:
            res = run_experiment(exp, ec, workdir)
        except Interrupted as e:
            print(f"{exp.name}: {e}", file=sys.stderr)
            return 0
        if res["failures"]:
            raise SystemExit(f"{exp.name}: {len(res['failures'])} run(s) failed:\n" + "\n".join(res["failures"]))
        return 0

    app.run(_main)


# ------------------------------------------------------------------------------------------ helpers for drivers
NATURAL_WEIGHTS = {"understanding": 2.0, "generation": 1.0}  # vqa + caption per image vs one generation record


def other(stream: str) -> str:
    return {"understanding": "generation", "generation": "understanding"}[stream]


def only(stream: str) -> tuple[tuple[str, Any], ...]:
    """Overrides that leave ``stream`` the only active stream (the single-task baseline)."""
    return ((f"data.streams.{other(stream)}.weight", 0.0),)


def subset(stream: str, fraction: float, natural: float) -> tuple[tuple[str, Any], ...]:
    """``stream`` restricted to the first ``fraction`` of its records (nested subsets) and weighted by
    ``fraction · natural`` so each of its records is drawn as often as in the full mix; 0 switches it off."""
    if fraction <= 0:
        return ((f"data.streams.{stream}.weight", 0.0),)
    return ((f"data.streams.{stream}.fraction", float(fraction)),
            (f"data.streams.{stream}.weight", float(natural) * float(fraction)))


def pct(f: float) -> int:
    return int(round(100 * float(f)))


__all__ = ["Arm", "Panel", "Experiment", "arm_config", "run_experiment", "collect", "main", "plan_steps",
           "measure_examples_per_step", "load_done", "only", "subset", "pct", "NATURAL_WEIGHTS"]


# ------------------------------------------------------------------------------------------ config defaults
def load_run_and_vq(run_dir: str, what: str):
    """A trained arm and the VQ codec it was trained with (drivers that probe or decode on their own)."""
    from uvjax.inference.decode import VQCodec, find_vq
    from uvjax.inference.loading import load_trained
    run = load_trained(run_dir)
    vq, looked = find_vq(run.workdir, run.cfg)
    if vq is None:
        raise FileNotFoundError(f"{what}: no VQ tokenizer for {run_dir} (looked at {looked})")
    return run, VQCodec(vq)


def experiment_config(name: str, preset: str):
    """Defaults shared by ``configs/experiments/*.py``: ``tiny`` (the CPU default: the ``tiny`` model, 200
    test images, the cached ``full`` judge, 2 seeds) and ``quick`` (the ``smoke`` chain, a handful of steps,
    3 test images, the ``test`` judge, one seed: minutes on CPU, for tests). The experiment file then sets
    its arm variable, steps and overrides."""
    import ml_collections as mlc
    c = mlc.ConfigDict()
    c.name = name
    c.preset = preset
    c.workdir = ""  # "" = runs/experiments/<name> (or --workdir)
    c.cache_dir = ""  # "" = <parent of workdir>/cache, shared by every experiment under that parent
    c.budget_batches = 16  # batches read to measure examples per step (equal samples per task)
    c.stop_on_error = False
    c.compilation_cache = True  # persistent XLA cache in <cache_dir>/xla shared by the arms
    c.x_label = ""
    # two_heads (2505.23043's adapters + generation head) | shared_vocab (Chameleon/Anole: codes are rows
    # of the text vocabulary); every experiment runs on either, its data unchanged
    c.layout = "two_heads"
    c.eval = mlc.ConfigDict(dict(num_images=200, judge_preset="full", batch_size=32, tasks=("vqa", "generation"),
                                 sample_seed=0))
    if preset in ("tiny", "smollm2"):
        c.base = "vqvq.py:" + preset
        c.seeds = (0, 1)
        c.overrides = (("train.progress", True),)
    elif preset == "quick":
        c.base = "vqvq.py:smoke"
        c.seeds = (0,)
        c.overrides = (("train.steps", 3), ("train.checkpoint_every", 1000), ("train.log_every", 1),
                       ("train.progress", False), ("optim.warmup_steps", 1))
        c.eval.num_images, c.eval.judge_preset, c.eval.batch_size = 3, "test", 8
        c.budget_batches = 2
    else:
        raise ValueError(f"configs/experiments/{name}.py: unknown preset {preset!r}")
    return c


def add_overrides(c, *items) -> None:
    """Appends (key, value) pairs to ``c.overrides`` (later pairs win)."""
    c.overrides = tuple(c.overrides) + tuple(items)
