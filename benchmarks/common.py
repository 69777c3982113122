"""Benchmark utilities: idle check, matmul peak, peak RSS, the CPU a number was measured on, JSON output.

Every benchmark's JSON carries ``machine()`` (which includes ``cpu_info()``) and every table opens with
``machine_line()``: a CPU number means little without the vendor, the vector/matrix units and the core count
(issue 34: the same code ran train ×1.0 on a Xeon against ×1.2 on an EPYC).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import time

# the vector / matrix units XLA:CPU's GEMM backends (YNNPACK, oneDNN, Eigen) can use
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """CPU model, vendor family, the flags above and core count (lscpu, falling back to /proc/cpuinfo)."""
    model, vendor, flags = "", "", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k == "Model name":
                model = v.strip()
            elif k == "Vendor ID":
                vendor = v.strip()
            elif k == "Flags":
                flags = set(v.split())
    except (OSError, subprocess.SubprocessError):
        pass
    if not model or not flags:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    k = k.strip()
                    if k == "model name" and not model:
                        model = v.strip()
                    elif k == "vendor_id" and not vendor:
                        vendor = v.strip()
                    elif k == "flags" and not flags:
                        flags = set(v.split())
        except OSError:
            pass
    have = {f: f in flags for f in CPU_FLAGS}
    return {"cpu_model": model or "unknown", "cpu_vendor": vendor or "unknown", "cores": os.cpu_count(),
            "flags": have, "cpu_family": cpu_family(model, vendor, have)}


def cpu_family(model: str, vendor: str, flags: dict) -> str:
    """The key PERFORMANCE.md keeps one table per: vendor + widest vector unit + bf16/AMX support."""
    name = "AMD EPYC" if "EPYC" in model else "Intel Xeon" if "Xeon" in model else (
        "AMD" if vendor == "AuthenticAMD" else "Intel" if vendor == "GenuineIntel" else model or "unknown CPU")
    units = "AVX-512" if flags.get("avx512f") else "AVX2" if flags.get("avx2") else "no AVX2"
    extra = [u for u, f in (("BF16", "avx512_bf16"), ("AMX", "amx_tile")) if flags.get(f)]
    return f"{name} ({', '.join([units] + extra)})"


def machine_line(m: dict | None = None) -> str:
    """One line for the top of a table: model, family, cores, the units, jax, date."""
    m = m or machine()
    units = " ".join(f for f, on in m.get("flags", {}).items() if on) or "none of " + "/".join(CPU_FLAGS)
    return (f"CPU: {m.get('cpu_model')} — {m.get('cpu_family')}, {m.get('cores')} cores; flags: {units}; "
            f"jax {m.get('jax')} ({m.get('backend')}); XLA_FLAGS={m.get('xla_flags') or '(none)'}; {m.get('date')}")


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
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            **cpu_info()}


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def write_results(path: str, payload: dict, table: str) -> None:
    """The JSON at ``path``, its table beside it (``.md``) and on stdout."""
    write_json(path, payload)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)


def cpu_snapshot(seconds: float = 0.5) -> dict:
    """A quiet, short idle check (busy % over ``seconds`` + load averages) to take before each timed
    unit of an alternating A/B comparison."""
    import psutil
    busy = psutil.cpu_percent(interval=seconds)
    load1, load5, _ = os.getloadavg()
    return {"cpu_busy_percent": busy, "loadavg_1m": load1, "loadavg_5m": load5}
