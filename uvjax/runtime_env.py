"""Process environment for the CPU hot path: glibc's malloc backed by transparent huge pages.

XLA:CPU allocates every execution's temporary buffer afresh (3.1 GB for the M benchmark step, 0.9 GB for
S) and glibc serves allocations that large with a new ``mmap``, so every training step touches gigabytes
of never-used 4 KB pages: 820k minor page faults per M step, ≈ 10% of the CPU time spent in the kernel
zeroing pages. With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc ≥ 2.35) malloc advises the kernel
to back those mappings with 2 MB pages: 2k faults per step, M −8%, S −5% on the 2-core machine of
``docs/PERFORMANCE.md`` (HF + torch measured no faster with it).

The tunable is read when the process starts, so it cannot be switched on from Python; a uvjax command
(``python -m uvjax.<module>``) re-executes itself once with it set — same PID, same arguments — before
anything heavy is imported. Library imports (tests, notebooks, user scripts) are never re-executed.
``UVJAX_MALLOC_HUGETLB=0`` turns it off; other platforms and an already-set tunable are left alone.

``python -m uvjax.runtime_env`` prints what is in effect and probes it (page faults of one large malloc).
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "UVJAX_MALLOC_HUGETLB"


def tuned_env(env: dict) -> dict | None:
    """``env`` with the huge-page tunable appended to GLIBC_TUNABLES, or None if nothing is to change."""
    if sys.platform != "linux" or env.get(OPT_OUT, "1") == "0":
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:
        return None  # set (or explicitly unset with =0) by the user: theirs wins
    out = dict(env)
    out["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    return out


def launched_as_uvjax_module(orig_argv: list[str]) -> bool:
    """True for ``python [interpreter options] -m uvjax[.module] ...``."""
    i = 1
    while i < len(orig_argv):
        a = orig_argv[i]
        if a == "-m":
            return i + 1 < len(orig_argv) and (orig_argv[i + 1] == "uvjax" or orig_argv[i + 1].startswith("uvjax."))
        if not a.startswith("-") or a == "-c":
            return False  # a script or -c's code comes first
        i += 2 if a in ("-X", "-W", "--check-hash-based-pycs") else 1  # options that take a separate value
    return False


def reexec_with_malloc_hugetlb() -> None:
    """Replace this process by the same command with the tunable set (no-op when not needed)."""
    env = tuned_env(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)


def probe_faults_per_mb(mb: int = 256) -> float:
    """Minor page faults per MB when one ``mb`` MB malloc is written once (≈ 256 with 4 KB pages, ≈ 0.5
    with 2 MB pages). Uses libc's malloc directly: numpy would advise huge pages on its own."""
    import ctypes
    import resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = mb << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    if not p:
        raise MemoryError(f"malloc({n}) failed")
    ctypes.memset(p, 1, n)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(p)
    return faults / mb


def transparent_hugepage_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


if __name__ == "__main__":
    import json
    reexec_with_malloc_hugetlb()
    print(json.dumps({"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
                      "transparent_hugepage": transparent_hugepage_mode(),
                      "minor_faults_per_mb": round(probe_faults_per_mb(), 2)}))
