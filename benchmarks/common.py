"""Benchmark utilities: idle check, matmul peak, peak RSS, JSON + table output."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time


def idle_check(seconds: float = 2.0) -> dict:
    """How busy the machine is before we start (other processes skew CPU timings)."""
    import psutil
    per_cpu = psutil.cpu_percent(interval=seconds, percpu=True)
    load1, load5, _ = os.getloadavg()
    busy = statistics.mean(per_cpu)
    info = {"cpu_busy_percent": round(busy, 1), "per_cpu_percent": per_cpu, "loadavg_1m": load1,
            "loadavg_5m": load5, "cores": os.cpu_count(), "idle": busy < 15.0}
    print(f"[idle check] cpu busy {busy:.1f}% over {seconds:.0f}s, load1 {load1:.2f} on {os.cpu_count()} cores"
          + ("" if info["idle"] else "  (NOT idle: numbers are pessimistic)"))
    return info


def matmul_peak_gflops(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict:
    import jax
    return {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()][:4],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def cpu_snapshot(seconds: float = 0.5) -> dict:
    """A quiet, short idle check (busy % over ``seconds`` + load averages) to take before each timed
    unit of an alternating A/B comparison."""
    import psutil
    busy = psutil.cpu_percent(interval=seconds)
    load1, load5, _ = os.getloadavg()
    return {"cpu_busy_percent": busy, "loadavg_1m": load1, "loadavg_5m": load5}
