"""One arm × seed: an ordinary run (``uvjax.train.run_all``: cached stages + LM) followed by
``uvjax.evaluation.run.evaluate_run``, in-process, in ``<workdir>/<arm>/seed_<seed>``, and its record
``DONE.json``, written last (metrics, wall time, steps, commit, machine). A rerun skips the runs that
have it (and resumes the others from their checkpoints); a finished run of another configuration of the
same arm is refused instead of being mixed into the table.
"""
from __future__ import annotations

import json
import os
import signal
import time

import jax

from uvjax.evaluation.report import flat_metrics
from uvjax.evaluation.run import evaluate_run
from uvjax.experiments.arms import Arm, Experiment, arm_config, arm_key
from uvjax.experiments.provenance import commit, cpu_s, json_default, machine, write_json
from uvjax.inference.decode import find_vq
from uvjax.inference.loading import load_config, load_trained
from uvjax.integrity_files import DamagedFile, read_json, seal
from uvjax.remote_lock import lock_for_workdir
from uvjax.stages.features import evaluation_kwargs
from uvjax.towers.vq_codec import VQCodec
from uvjax.train import run_all

DONE_FILE = "DONE.json"


class Interrupted(Exception):
    """SIGTERM/SIGINT reached the trainer: it checkpointed; rerunning the driver resumes."""


def run_dir(workdir: str, arm: Arm, seed: int) -> str:
    return os.path.join(workdir, arm.name, f"seed_{seed}")


def load_done(path: str) -> dict | None:
    """The finished run's record in ``path`` (None: not finished), checked against its digest (records
    written before digests have none). A damaged one raises ``DamagedFile`` naming it and saying what to do
    (it holds the run's results: never redone behind the user's back)."""
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


def check_done(ec, arm: Arm, seed: int, workdir: str) -> dict | None:
    d = load_done(run_dir(workdir, arm, seed))
    if d is not None and d.get("key") not in (None, arm_key(ec, arm)):
        raise ValueError(f"{run_dir(workdir, arm, seed)} holds a finished run of another configuration of arm "
                         f"{arm.name!r}; use another --workdir, or delete that run directory to redo it")
    return d


def run_one(exp: Experiment, ec, arm: Arm, seed: int, steps: int, workdir: str) -> dict:
    """Trains + evaluates one arm × seed in ``<workdir>/<arm>/seed_<seed>`` and writes DONE.json last."""
    rd = run_dir(workdir, arm, seed)
    cfg = arm_config(ec, arm, seed, workdir, steps=steps)
    t0, c0 = time.time(), cpu_s()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:  # the trainer installs its own handlers (checkpoint and stop); give the previous ones back after
        with lock_for_workdir(rd, enabled=jax.process_index() == 0):
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
        report = evaluate_run(rd, num_images=int(ev.num_images) or None, judge_preset=str(ev.judge_preset),
                              batch_size=int(ev.batch_size), tasks=tasks, seed=int(ev.get("sample_seed", 0)),
                              progress=False, **evaluation_kwargs(rd, load_config(rd)))
        metrics.update({k[len("eval/"):] if k.startswith("eval/") else k: v for k, v in flat_metrics(report).items()})
        report_path = report.get("files", {}).get("report")
    if exp.extra is not None:
        metrics.update({k: float(v) for k, v in exp.extra(ec, arm, rd, load_config(rd)).items()})
    t_eval = time.time() - t1
    done = {"experiment": exp.name, "arm": arm.name, "key": arm_key(ec, arm), "group": arm.group, "x": arm.x,
            "seed": int(seed),
            "train_steps": int(cfg.train.steps), "steps_run": int(summary.get("steps_run", 0)),
            "metrics": metrics, "wall_s": round(time.time() - t0, 2), "cpu_s": round(cpu_s() - c0, 2),
            "train_wall_s": round(t_train, 2), "eval_wall_s": round(t_eval, 2), "eval_tasks": list(tasks),
            "report": report_path, "overrides": [[k, v] for k, v in list(arm.overrides)],
            "base": arm.base or ec.base, "commit": commit(), "machine": machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # a digest of the record: a flipped digit that still parses is caught
    write_json(os.path.join(rd, DONE_FILE), seal(json.loads(json.dumps(done, default=json_default))))
    return done


def load_run_and_vq(run_dir: str, what: str):
    """A trained arm and the VQ codec it was trained with (drivers that probe or decode on their own)."""
    run = load_trained(run_dir)
    vq, looked = find_vq(run.workdir, run.cfg)
    if vq is None:
        raise FileNotFoundError(f"{what}: no VQ tokenizer for {run_dir} (looked at {looked})")
    return run, VQCodec(vq)
