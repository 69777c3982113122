"""Where a train step's time goes on this CPU, beyond its GEMMs (issue 34: "where a target is missed, the
profile says what the step spends beyond GEMMs, per CPU family").

    python benchmarks/step_profile.py --configs=tiny,S,M      # ~2 min; JSON + a table per config

Runs the compiled step of ``benchmarks/train_step.py``'s configs under ``jax.profiler`` for a few steps
(after warm-up) and reads the trace back with ``jax.profiler.ProfileData`` (no TensorBoard needed). XLA:CPU
records one event per executed op (thunk) on the thread that runs it; each op's time is summed per step
and grouped:

- ``gemm``: YNNPACK / XNNPACK / oneDNN fusions and Eigen dots (the step's matmuls and what is fused in);
- ``copy/transpose``: copies, transposes, slices, concatenations, pads, gathers, dynamic-update-slices;
- ``reduce``: reductions (softmax / CE sums, norms' statistics);
- ``elementwise``: the remaining loop fusions (RMSNorm, RoPE, SwiGLU, the optimizer update, masks);
- ``wait``: the issuing thread waiting for a parallel region's helpers.

Ops run concurrently on the pool, so the summed op time can exceed the step's wall time; the shares are
of the summed time. The table lists the largest non-GEMM ops by name.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GEMM_WORDS = {"ynn", "xnn", "onednn", "dot", "convolution", "custom"}
COPY_WORDS = {"copy", "transpose", "slice", "concatenate", "pad", "gather", "scatter", "dynamic", "update",
              "reverse", "iota"}
NAME_FILLER = {"fusion", "wrapped", "bitcast", "broadcast", "call", "call_fusion", "input", "loop", "kernel"}
BOOKKEEPING = ("ThreadpoolListener::", "end: ", "ThunkExecutor::", "PjitFunction", "$")


def category(name: str) -> str | None:
    """The group an op event belongs to (None: profiler bookkeeping or the whole program, not an op).
    XLA names a fusion after the ops in it (``slice_concatenate_fusion.1``, ``bitcast_multiply_fusion``):
    a fusion of data-movement ops only is a copy, one with a reduce is a reduction."""
    if not name or name.startswith(BOOKKEEPING):
        return None
    if "Await" in name or "wait for completion" in name:
        return "wait"
    words = [w for w in name.split(".")[0].lower().replace("-", "_").split("_") if w and not w.isdigit()]
    if GEMM_WORDS & set(words):
        return "gemm"
    ops = [w for w in words if w not in NAME_FILLER]
    if "reduce" in ops:
        return "reduce"
    if not ops or set(ops) <= COPY_WORDS:
        return "copy/transpose"
    return "elementwise"


def op_times(trace_dir: str, steps: int) -> dict[str, float]:
    """Seconds per step of each op name, summed over the XLA threads of the trace in ``trace_dir``."""
    from jax.profiler import ProfileData
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not path:
        raise FileNotFoundError(f"no .xplane.pb under {trace_dir}: the profiler wrote nothing")
    total = collections.Counter()
    for plane in ProfileData.from_file(path[0]).planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for e in line.events:
                total[e.name] += e.duration_ns * 1e-9 / steps
    return dict(total)


def summarize(ops: dict[str, float], top: int = 8) -> dict:
    groups = collections.Counter()
    for name, s in ops.items():
        c = category(name)
        if c:
            groups[c] += s
    summed = sum(groups.values())
    non_gemm = sorted(((s, n) for n, s in ops.items() if category(n) not in (None, "gemm", "wait")), reverse=True)
    return {"summed_op_s": summed, "groups_s": dict(groups),
            "shares": {k: v / summed for k, v in groups.items()} if summed else {},
            "top_non_gemm": [{"op": n, "ms": 1e3 * s, "group": category(n)} for s, n in non_gemm[:top]]}


def profile(name: str, steps: int, scan_unroll: int) -> dict:
    import jax
    from benchmarks.train_step import setup
    step, state, gb, _, _ = setup(name, scan_unroll=scan_unroll)
    for _ in range(3):  # compile + settle the heap (uvjax/runtime_env.py)
        state, m = step(state, gb)
        jax.block_until_ready(m)
    untraced = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, gb)
        jax.block_until_ready(m)
        untraced.append(time.perf_counter() - t)
    d = tempfile.mkdtemp(prefix="uvjax-step-profile-")
    try:
        t = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(steps):
                state, m = step(state, gb)
                jax.block_until_ready(m)
        traced_s = (time.perf_counter() - t) / steps
        ops = op_times(d, steps)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"config": name, "steps": steps, "step_s_median": statistics.median(untraced),
            "traced_step_s": traced_s, **summarize(ops)}


def table(result: dict) -> str:
    from benchmarks.common import machine_line
    order = ("gemm", "elementwise", "copy/transpose", "reduce", "wait")
    lines = [machine_line(result["machine"]), "",
             "| config | step ms | op time ms | " + " | ".join(order) + " | largest non-GEMM ops (ms/step) |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in order) + " | --- |"]
    for r in result["profiles"]:
        tops = ", ".join(f"{t['op']} {t['ms']:.1f}" for t in r["top_non_gemm"][:5])
        lines.append(f"| {r['config']} | {1e3 * r['step_s_median']:.0f} | {1e3 * r['summed_op_s']:.0f} | "
                     + " | ".join(f"{100 * r['shares'].get(k, 0):.0f}%" for k in order) + f" | {tops} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,S,M")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/step_profile.json")
    args = ap.parse_args(argv)
    from benchmarks.common import idle_check, machine, machine_line, write_results
    print(machine_line())
    idle = idle_check()
    # the first run's model trains without the layer loop (configs/vqvq.py); S and M with it, as benchmarked
    profiles = [profile(c, args.steps, 0 if c == "tiny" else 1) for c in args.configs.split(",") if c]
    result = {"machine": machine(), "idle": idle, "profiles": profiles}
    write_results(args.out, result, table(result))
    return result


if __name__ == "__main__":
    from uvjax.runtime_env import reexec_with_malloc_hugetlb
    reexec_with_malloc_hugetlb()  # as `python -m uvjax.train` does (uvjax/runtime_env.py)
    main()
