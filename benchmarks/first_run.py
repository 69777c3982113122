"""The first run's LM step on the CPU at hand (issue 34): is README line 1's LM at >= 2.5 steps/s, and if
not, what takes the time — the step, the data pipeline, or the loop around them?

    python benchmarks/first_run.py                     # ~3 min with the first run's stages cached
    python benchmarks/first_run.py --steps=300 --out=benchmarks/results/first_run.json

Uses the real preset (``configs/vqvq.py:tiny``, not a retyped shape) and its real stage outputs: the
stages are reused from ``<parent of --workdir>/cache`` (the same cache README line 1 fills: a first run
from this checkout makes this benchmark start at once) or built there. Three measurements, one after the
other in one process:

- ``pipeline``: the grain pipeline alone (``train.build_data_iterator``), batches/s — its CPU share is
  taken from the step on a 2-core machine;
- ``step``: the compiled train step alone on one real batch (no data loading), steps/s;
- ``loop``: ``train.run`` itself for ``--steps`` steps (pipeline, step, metrics, guard, checkpoints at
  the preset's interval), steps/s from its own ``tokens_per_s`` log, the compiling step excluded.

Writes JSON (with the machine: CPU model, flags, cores) and a short table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_STEPS_PER_S = 2.5  # issue 34: the first run's LM on either x86 vendor


def _timed(fn, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def measure(workdir: str, steps: int, preset: str = "tiny", read_threads: int | None = None) -> dict:
    import jax
    from uvjax import train
    from uvjax.config import load_config_file, model_config
    from uvjax.models.unified import UnifiedModel
    from uvjax.stages.prepare import prepare
    from uvjax.training.sharding import global_batch_from_local, make_mesh
    from uvjax.training.step import create_trainer, make_train_step

    cfg = load_config_file("vqvq", preset)
    if read_threads is not None:  # a lever to A/B: grain's read threads (uvjax/data/pipeline.py)
        cfg.data.read_threads = read_threads
    t = time.time()
    cfg, _ = prepare(cfg, workdir)
    stages_s = time.time() - t
    B = int(cfg.train.batch_size)

    # 1. the data pipeline alone
    it = train.build_data_iterator(cfg, workdir, B)
    pipe = _timed(lambda: next(it), steps, warmup=5)
    local = next(it)
    if hasattr(it, "close"):
        it.close()

    # 2. the step alone, on one real batch
    mesh = make_mesh(cfg.mesh.shape)
    model = UnifiedModel(model_config(cfg).validate())
    trainer, state = create_trainer(model, cfg, mesh, cfg.sharding.rules)
    batch = global_batch_from_local(local, mesh)
    step_fn = make_train_step(trainer, batch)
    holder = {"state": state}

    def one_step():
        holder["state"], m = step_fn(holder["state"], batch)
        jax.block_until_ready(m)
    t = time.perf_counter()
    one_step()
    compile_s = time.perf_counter() - t
    step_times = _timed(one_step, steps, warmup=3)
    holder.clear()  # free the state before the loop builds its own

    # 3. the real loop, in a scratch work dir beside --workdir (so it shares the stage cache)
    loop_dir = os.path.join(os.path.dirname(os.path.abspath(workdir)), os.path.basename(workdir) + "-loop")
    shutil.rmtree(loop_dir, ignore_errors=True)
    with cfg.unlocked():
        cfg.train.steps = steps
        cfg.train.progress = False
    t = time.time()
    summary = train.run(cfg, loop_dir)
    loop_wall = time.time() - t
    with open(os.path.join(loop_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    tokens_per_step = B * int(cfg.train.seq_len)
    shutil.rmtree(loop_dir, ignore_errors=True)

    med_step = statistics.median(step_times)
    med_pipe = statistics.median(pipe)
    loop_sps = statistics.median(tps) / tokens_per_step
    return {
        "preset": f"configs/vqvq.py:{preset}", "read_threads": int(cfg.data.read_threads), "batch": B, "seq_len": int(cfg.train.seq_len),
        "layers": int(cfg.model.layers), "hidden": int(cfg.model.hidden), "stages_s": stages_s,
        "pipeline": {"batch_s_median": med_pipe, "batches_per_s": 1 / med_pipe, "batch_s_all": pipe},
        "step": {"step_s_median": med_step, "steps_per_s": 1 / med_step, "compile_and_first_s": compile_s,
                 "step_s_all": step_times},
        "loop": {"steps": steps, "steps_per_s_median": loop_sps, "steps_per_s_per_log": [x / tokens_per_step for x in tps],
                 "wall_s": loop_wall, "compile_s": summary.get("compile_s")},
        # a 2-core machine runs the pipeline beside the step: their times add up when neither overlaps
        "serial_estimate_steps_per_s": 1 / (med_step + med_pipe),
        "target_steps_per_s": TARGET_STEPS_PER_S, "loop_meets_target": loop_sps >= TARGET_STEPS_PER_S,
    }


def table(result: dict) -> str:
    from benchmarks.common import machine_line
    r = result["first_run"]
    idle = result["idle"]
    return "\n".join([
        machine_line(result["machine"]),
        f"idle check: {idle['cpu_busy_percent']:.0f}% busy, load1 {idle['loadavg_1m']:.2f}; "
        f"{r['preset']}: {r['layers']} layers x {r['hidden']}, batch {r['batch']} x {r['seq_len']}, "
        f"data.read_threads {r['read_threads']}",
        "| what | per second | ms each |", "| --- | ---: | ---: |",
        f"| data pipeline alone (batches) | {r['pipeline']['batches_per_s']:.1f} | {1e3 * r['pipeline']['batch_s_median']:.0f} |",
        f"| train step alone (steps) | {r['step']['steps_per_s']:.2f} | {1e3 * r['step']['step_s_median']:.0f} |",
        f"| step + pipeline, no overlap (estimate) | {r['serial_estimate_steps_per_s']:.2f} | "
        f"{1e3 / r['serial_estimate_steps_per_s']:.0f} |",
        f"| `train.run` loop (steps) | **{r['loop']['steps_per_s_median']:.2f}** | "
        f"{1e3 / r['loop']['steps_per_s_median']:.0f} |",
        f"target >= {r['target_steps_per_s']} steps/s in the loop: " + ("met" if r["loop_meets_target"] else "MISSED"),
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/bench-first-run",
                    help="its parent's cache/ holds the stages (runs/cache: the one README line 1 fills)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--read_threads", type=int, default=None, help="override data.read_threads (A/B of the lever)")
    ap.add_argument("--out", default="benchmarks/results/first_run.json")
    args = ap.parse_args(argv)
    from benchmarks.common import idle_check, machine, machine_line, write_results
    print(machine_line())
    idle = idle_check()
    result = {"machine": machine(), "idle": idle, "first_run": measure(args.workdir, args.steps, args.preset,
                                                                         args.read_threads)}
    write_results(args.out, result, table(result))
    return result


if __name__ == "__main__":
    from uvjax.runtime_env import reexec_with_malloc_hugetlb
    reexec_with_malloc_hugetlb()  # as `python -m uvjax.train` does (uvjax/runtime_env.py)
    main()
