"""The experiment driver shared by ``uvjax/experiments/<name>.py``: arms × seeds → runs → results.

An experiment is a config (``configs/experiments/<name>.py``: a base model config, overrides shared by
every arm, the arm variable's values, seeds, evaluation settings) plus a driver module that turns the
config into arms and says what to plot (``uvjax.experiments.arms``). Nothing here forks the trainer: every
run is ``uvjax.train.run_all`` (cached stages + LM) followed by ``uvjax.evaluation.run.evaluate_run``,
in-process, in its own work directory ``<workdir>/<arm>/seed_<seed>`` (``uvjax.experiments.runs``); all
runs share one stage cache (tokenizer, VQ, SigLIP tower, pre-tokenised data, judge), so data and towers
are built once per experiment.

What the driver writes under ``--workdir``:

    <arm>/seed_<s>/             the run (checkpoints, metrics.jsonl, eval/step_N/report.json, ...)
    <arm>/seed_<s>/DONE.json    written last: metrics, wall time, steps, commit, machine. A rerun skips
                                the runs that have it (and resumes the others from their checkpoints)
    budget.json                 measured examples per step of each arm (steps for equal samples per task:
                                ``uvjax.experiments.budget``)
    results.json                every arm and seed: metrics, wall time, commit, machine
    results.md                  the table: mean ± std over seeds per arm and metric
    results.png                 the plot: each panel one metric against the arm variable, error bars = std
                                (``uvjax.experiments.aggregate``, ``uvjax.experiments.plots``)
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Callable

import jax
from absl import app, flags, logging

from uvjax import train
from uvjax.experiments.aggregate import collect
from uvjax.experiments.arms import Experiment, cache_dir
from uvjax.experiments.budget import plan_steps
from uvjax.experiments.provenance import commit, write_json
from uvjax.experiments.runs import Interrupted, check_done, run_one


def run_experiment(exp: Experiment, ec, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Every arm × seed not yet DONE, then the results files. A failing run is reported and the others
    go on; the driver then exits non-zero (rerun to retry only the missing runs)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    arms = exp.arms(ec)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate arm names in {exp.name}: {names}")
    write_json(os.path.join(workdir, "experiment_config.json"), json.loads(ec.to_json_best_effort()))
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
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(ec, workdir), "xla"))


def main(exp: Experiment):
    """``python -m uvjax.experiments.<name> --config=configs/experiments/<name>.py[:quick] --workdir=DIR``.
    The ``--config`` / ``--workdir`` flags are uvjax.train's (one definition for every command)."""
    train.define_flags()
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
