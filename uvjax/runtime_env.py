"""Process environment for the CPU hot path: glibc's malloc keeps XLA's per-step buffers, on huge pages.

XLA:CPU allocates every execution's temporary buffer afresh (2.8 GB for the M benchmark step, 0.7 GB for
S) and frees it at the end of the step. By default glibc serves allocations that large with a new ``mmap``
and returns them with ``munmap``, so every training step faults in and zeroes gigabytes of fresh pages:

- with 4 KB pages, 820k minor page faults per M step (≈ 10% of the CPU time in the kernel);
- with 2 MB pages (``glibc.malloc.hugetlb=1``) 1.4k faults, but the kernel still zeroes 2.8 GB per step,
  and on a VM whose freed guest memory goes back to the host (free page reporting), a step that follows
  anything else that ran for a few seconds (a data loader, an eval, another process) finds its huge pages
  reported and zeroes them at a few hundred MB/s: 7–8 s of kernel time per M step measured on the 2-core
  machine of ``docs/PERFORMANCE.md`` (step 7 → 11 s).

So a uvjax command runs with glibc's malloc told to keep what it gets from the kernel:
``glibc.malloc.mmap_max=0`` (large blocks come from the heap, not from their own mappings),
``glibc.malloc.arena_max=1`` (one heap: threads' own arenas would fall back to ``mmap`` for blocks larger
than an arena), ``glibc.malloc.trim_threshold`` = 64 GiB (the heap's free top is not handed back), and
``glibc.malloc.hugetlb=1`` (the heap on 2 MB pages). After the first step the buffers are reused with no
page faults at all. The costs: the process keeps its high-water mark of heap memory until it exits, and
fragmentation around the kept blocks raises the peak (M benchmark step 4.2 → 4.7 GB RSS); now and then a
freed temp buffer's hole is split by a smaller allocation and the heap grows by a whole buffer (a solo M
run: 4.7 GB for 16 steps, 7.4 GB from the 17th on, that step paying ~8 s of page faults once); compiling
is slower with one arena for LLVM's threads (S step 5 → 7 s). mimalloc (``LD_PRELOAD``, purging off,
memory reserved up front) was tried instead: it still returned the large blocks (RSS 2.0 ↔ 4.7 GB, 0.5–1.8 s
of system time per M step), so glibc stays.

The tunables are read when the process starts, so they cannot be switched on from Python; a uvjax command
(``python -m uvjax.<module>``) re-executes itself once with them set — same PID, same arguments — before
anything heavy is imported. Library imports (tests, notebooks, user scripts) are never re-executed.
``UVJAX_MALLOC_HUGETLB=0`` turns all of it off; a tunable the user set in ``GLIBC_TUNABLES`` keeps the
user's value; other platforms are left alone.

``python -m uvjax.runtime_env`` prints what is in effect and probes it (page faults of one large malloc,
and of a second one after the first was freed).
"""
from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading

TUNABLES = (("glibc.malloc.hugetlb", "1"),             # 2 MB pages for malloc's memory
            ("glibc.malloc.mmap_max", "0"),            # no per-block mappings: large blocks from the heap
            ("glibc.malloc.arena_max", "1"),           # one heap for all threads (no per-thread arenas)
            ("glibc.malloc.trim_threshold", str(1 << 36)))  # never give the heap's free top back
OPT_OUT = "UVJAX_MALLOC_HUGETLB"


def tuned_env(env: dict) -> dict | None:
    """``env`` with uvjax's malloc tunables appended to GLIBC_TUNABLES, or None if nothing is to change."""
    if sys.platform != "linux" or env.get(OPT_OUT, "1") == "0":
        return None
    current = env.get("GLIBC_TUNABLES", "")
    user = {item.split("=", 1)[0] for item in current.split(":") if item}
    add = [f"{name}={value}" for name, value in TUNABLES if name not in user]  # the user's own values win
    if not add:
        return None
    out = dict(env)
    out["GLIBC_TUNABLES"] = ":".join(([current] if current else []) + add)
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


def probe_faults_per_mb(mb: int = 256, in_thread: bool = False) -> tuple[float, float]:
    """Minor page faults per MB when one ``mb`` MB malloc is written once (≈ 256 with 4 KB pages, ≈ 0.5
    with 2 MB pages), and again for a second malloc of the same size after the first was freed (the same
    as the first when glibc gives large blocks back to the kernel, ≈ 0 when it keeps them). Uses libc's
    malloc directly: numpy would advise huge pages on its own. ``in_thread``: from a new thread, i.e. from
    a thread arena of its own unless ``glibc.malloc.arena_max=1`` (XLA allocates on its worker threads)."""
    if in_thread:
        box = []
        t = threading.Thread(target=lambda: box.append(probe_faults_per_mb(mb)))
        t.start()
        t.join()
        return box[0]
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = mb << 20
    out = []  # (ru_minflt counts the whole process: the calling thread is the only one working here)
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        if not p:
            raise MemoryError(f"malloc({n}) failed")
        ctypes.memset(p, 1, n)
        out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / mb)
        libc.free(p)
    return out[0], out[1]


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
    first, again = probe_faults_per_mb()
    print(json.dumps({"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
                      "transparent_hugepage": transparent_hugepage_mode(),
                      "minor_faults_per_mb": round(first, 2), "minor_faults_per_mb_after_free": round(again, 2),
                      "thread_minor_faults_per_mb_after_free": round(probe_faults_per_mb(in_thread=True)[1], 2)}))
