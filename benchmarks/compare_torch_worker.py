"""benchmarks/compare_torch.py's worker harness: each side runs in its own subprocess (a "worker").

A worker (``worker_main``: ``python benchmarks/compare_torch.py --worker ...``) builds one side, then answers
JSON-line commands on stdin, one timed unit each. The parent holds a ``Worker`` per side and runs them in
turn (``alternate``: A B A B …, the idle one blocks on its pipe and uses no CPU), with a CPU snapshot before
every unit. Neither numpy, jax nor torch is imported here (see ``worker_main``).
"""
from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import cpu_snapshot, peak_rss_mb
from uvjax.runtime_env import tuned_env

# the CLI whose --worker mode runs worker_main (its flags carry the run's settings to the worker)
MAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_torch.py")
# side → its module: ``worker_setup(args)`` and ``UNITS`` (task → timed-unit class)
SIDE_MODULES = {"jax": "benchmarks.compare_torch_uvjax", "torch": "benchmarks.compare_torch_hf"}


# ============================================================================ the worker process
def _send(out, obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()


def parse_cpus(text: str) -> tuple[int, ...]:
    """``--cpus`` ("0" or "0,1"): CPU ids this process may run on, checked against its own affinity."""
    try:
        cpus = tuple(sorted({int(c) for c in text.split(",") if c.strip()}))
    except ValueError:
        raise ValueError(f"--cpus={text!r}: expected comma-separated CPU ids, e.g. 0 or 0,1") from None
    allowed = os.sched_getaffinity(0)
    bad = [c for c in cpus if c not in allowed]
    if not cpus or bad:
        raise ValueError(f"--cpus={text!r}: CPU ids {bad or '(none)'} not available; this process may use "
                         f"{sorted(allowed)}")
    return cpus


def pin_cpus(text: str) -> tuple[int, ...]:
    """Pin this process (and the threads it starts later: XLA's and torch's pools) to ``--cpus``."""
    cpus = parse_cpus(text)
    os.sched_setaffinity(0, cpus)
    return tuple(sorted(os.sched_getaffinity(0)))


def worker_main(args):
    """A worker: builds one side, then answers JSON-line commands on stdin ({"run": n} / {"quit": 1})."""
    proto = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    if args.cpus:  # before jax / torch start their thread pools, which size themselves to the affinity
        pin_cpus(args.cpus)
    # imported only now, after the pinning (numpy's BLAS threads start when it loads), and only this side
    # (the other side's framework would count in this worker's peak RSS)
    from benchmarks.compare_torch_common import load_weights, spec_of
    side = importlib.import_module(SIDE_MODULES[args.side])
    side.worker_setup(args)
    s = spec_of(args.config)
    w = load_weights(args.weights)
    t = time.perf_counter()
    obj = side.UNITS[args.task](s, w, args)
    del w
    _send(proto, {"ready": True, "setup_s": time.perf_counter() - t, "info": obj.info, "rss_mb": peak_rss_mb(),
                  "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "cpus": sorted(os.sched_getaffinity(0))})
    for line in sys.stdin:
        cmd = json.loads(line)
        if "quit" in cmd:
            break
        res = obj.run(cmd["run"])
        res["rss_mb"] = peak_rss_mb()
        _send(proto, res)
    _send(proto, {"bye": True, "rss_mb": peak_rss_mb()})


# ============================================================================ the parent's side
class Worker:
    def __init__(self, side, task, config, weights, args, attn_block=-1, malloc="uvjax"):
        cmd = [sys.executable, MAIN_SCRIPT, "--worker", "--side", side, "--task", task,
               "--config", config, "--weights", weights, "--lr", str(args.lr), "--seed", str(args.seed),
               "--new_tokens", str(args.new_tokens), "--prompt", str(args.prompt),
               "--torch_threads", str(args.torch_threads), "--attn_block", str(attn_block), "--cpus", args.cpus,
               "--scan_unroll", str(args.scan_unroll), "--decode_scan_unroll", str(args.decode_scan_unroll)] + (
                   ["--hf_full_logits"] if args.hf_full_logits else [])
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", "cpu")
        if malloc == "uvjax":
            # the glibc malloc settings `python -m uvjax.train` sets for itself (uvjax/runtime_env.py); HF's
            # steps are faster with them too on the benchmark machine, so both sides get them by default
            env = tuned_env(env) or env
        self.side = side
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._recv()

    def _recv(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker died (exit {self.p.wait()})")
        return json.loads(line)

    def run(self, n):
        self.p.stdin.write(json.dumps({"run": n}) + "\n")
        self.p.stdin.flush()
        return self._recv()

    def close(self):
        self.p.stdin.write(json.dumps({"quit": 1}) + "\n")
        self.p.stdin.flush()
        bye = self._recv()
        self.p.wait()
        return bye


def alternate(workers: dict, arg, rounds: int, snap_s: float):
    """Timed units A B A B …, a CPU snapshot before each; returns per side: results and snapshots."""
    out = {k: {"runs": [], "snapshots": []} for k in workers}
    for _ in range(rounds):
        for k, w in workers.items():
            out[k]["snapshots"].append(cpu_snapshot(snap_s))
            out[k]["runs"].append(w.run(arg))
    return out


def snap_summary(snaps):
    return {"cpu_busy_percent_median": statistics.median(s["cpu_busy_percent"] for s in snaps),
            "cpu_busy_percent_max": max(s["cpu_busy_percent"] for s in snaps),
            "loadavg_1m_max": max(s["loadavg_1m"] for s in snaps)}
