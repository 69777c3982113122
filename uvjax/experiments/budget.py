"""Training steps of every arm, and **equal samples per task**.

An arm with ``match=(stream, reference arm)`` gets the number of steps that makes it see as many
``stream`` examples as the reference arm sees in its ``train.steps``. Examples per step are measured on
the real pipeline (packing makes them depend on the mix), over ``budget_batches`` batches; the mix's
proportions are exact (grain ``mix``), so a stream's share of the examples is its weight's share. E.g.
understanding-only vs unified: the single-task arm trains on the unified arm's understanding examples
only, in fewer steps (the paper's 305 vs 459 steps). The measurements are cached in ``budget.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np

from uvjax import integrity_files as itg
from uvjax.data.storage import expand_paths
from uvjax.experiments.arms import Arm, arm_config, layout_key, shared_overrides
from uvjax.experiments.provenance import json_default, write_json
from uvjax.stages.prepare import prepare
from uvjax.training.data_feed import build_data_iterator

BUDGET_FILE = "budget.json"
BUDGET_DIGEST = "__digest__"  # the digest of the other keys (arm names)


def stream_shares(cfg) -> dict[str, float]:
    """Each active stream's share of the mix (its weight over the active streams' weights)."""
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
    return {"examples_per_step": n * int(cfg.train.grad_accum) / batches, "shares": stream_shares(cfg)}


def plan_steps(ec, arms: Sequence[Arm], workdir: str) -> dict[str, int]:
    """``train.steps`` of every arm; ``match`` arms from measured examples per step (cached in budget.json)."""
    path = os.path.join(workdir, BUDGET_FILE)
    budget = read_budget(path)
    by_name = {a.name: a for a in arms}
    seed0 = int(ec.seeds[0])

    def measure(a: Arm) -> dict:
        key = json.dumps([a.base or ec.base, shared_overrides(ec), list(a.overrides)] + layout_key(ec),
                         sort_keys=True, default=str)
        if a.name not in budget or budget[a.name].get("key") != key:
            cfg = arm_config(ec, a, seed0, workdir)
            m = measure_examples_per_step(cfg, os.path.join(workdir, a.name, "budget"), int(ec.get("budget_batches", 16)))
            budget[a.name] = {"key": key, **m, "configured_steps": int(cfg.train.steps)}
            write_budget(path, budget)
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
        write_budget(path, budget)
    return steps


def read_budget(path: str) -> dict:
    """``budget.json`` (a cache of measurements: each arm's entry is redone when missing). A damaged one (does
    not parse, or its digest differs: a flipped digit must not change an arm's steps) is moved aside as
    ``budget.json.damaged`` with a warning naming it, and every arm is measured again."""
    if not os.path.exists(path):
        return {}
    try:
        budget = itg.read_json(path, "budget cache")
        if not isinstance(budget, dict):
            raise itg.DamagedFile(f"{path}: damaged budget cache: a JSON object expected")
        if BUDGET_DIGEST in budget and budget_digest(budget) != budget[BUDGET_DIGEST]:
            raise itg.DamagedFile(f"{path}: damaged budget cache: its content does not match its digest")
    except itg.DamagedFile as e:
        os.replace(path, path + ".damaged")
        print(f"WARNING: {e}; moved to {path}.damaged: every arm's examples per step are measured again",
              flush=True)
        return {}
    return {k: v for k, v in budget.items() if k != BUDGET_DIGEST}


def budget_digest(budget: dict) -> str:
    body = json.dumps({k: v for k, v in budget.items() if k != BUDGET_DIGEST}, sort_keys=True, default=json_default)
    return hashlib.sha256(body.encode()).hexdigest()


def write_budget(path: str, budget: dict) -> None:
    write_json(path, {**budget, BUDGET_DIGEST: budget_digest(budget)})
