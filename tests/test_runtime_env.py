"""uvjax/runtime_env.py: `python -m uvjax.*` restarts itself once with glibc's malloc keeping its memory
(on huge pages)."""
import json
import os
import subprocess
import sys

import pytest

from uvjax import runtime_env as R

linux = pytest.mark.skipif(sys.platform != "linux", reason="GLIBC_TUNABLES is a Linux/glibc setting")


ALL = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
       "glibc.malloc.trim_threshold=68719476736")


@linux
def test_tuned_env_appends_keeps_user_settings_and_honours_the_opt_out():
    assert R.tuned_env({})["GLIBC_TUNABLES"] == ALL
    got = R.tuned_env({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.mem.tagging=0", "X": "y"})
    assert got == {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.mem.tagging=0:glibc.malloc.hugetlb=1:"
                                     "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1", "X": "y"}
    # the user's value of a tunable wins; the others are still added
    assert R.tuned_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=68719476736")
    assert R.tuned_env({"GLIBC_TUNABLES": ALL}) is None  # nothing left to add: no restart
    assert R.tuned_env({"UVJAX_MALLOC_HUGETLB": "0"}) is None


def test_only_uvjax_modules_count_as_uvjax_commands():
    py = sys.executable
    assert R.launched_as_uvjax_module([py, "-m", "uvjax.train", "--config=configs/vqvq.py"])
    assert R.launched_as_uvjax_module([py, "-X", "dev", "-m", "uvjax.experiments.ratio"])
    assert not R.launched_as_uvjax_module([py, "-m", "pytest", "-m", "uvjax.train"])
    assert not R.launched_as_uvjax_module([py, "script.py", "-m", "uvjax.train"])
    assert not R.launched_as_uvjax_module([py, "-c", "import uvjax"])
    assert not R.launched_as_uvjax_module([py, "-m", "uvjaxx"])


def _run(code_or_module, env_extra, module=False):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "UVJAX_MALLOC_HUGETLB")}
    env.update(env_extra)
    cmd = [sys.executable, "-m", code_or_module] if module else [sys.executable, "-c", code_or_module]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return out.stdout


@linux
def test_package_import_reexecs_a_uvjax_command_and_nothing_else():
    """The hook in uvjax/__init__.py, with os.execve replaced by a print: a `-m uvjax.x` launch re-executes
    with the same arguments and the tunable; a plain import (tests, notebooks, scripts) does not."""
    fake = ("import os, sys, json\n"
            "os.execve = lambda exe, argv, env: (print(json.dumps([exe, argv, env.get('GLIBC_TUNABLES')])), sys.exit(0))\n"
            "{setup}\nimport uvjax\nprint('no exec')\n")
    launched = "sys.argv = ['-m']; sys.orig_argv = [sys.executable, '-m', 'uvjax.train', '--config=c.py']"
    exe, argv, tun = json.loads(_run(fake.format(setup=launched), {}))
    assert exe == sys.executable and argv == [sys.executable, "-m", "uvjax.train", "--config=c.py"]
    assert tun == ALL
    assert _run(fake.format(setup=""), {}).strip() == "no exec"
    assert _run(fake.format(setup=launched), {"UVJAX_MALLOC_HUGETLB": "0"}).strip() == "no exec"


@linux
def test_the_restarted_process_gets_huge_pages_and_keeps_freed_memory():
    """End to end: `python -m uvjax.runtime_env` re-executes itself and writes one 256 MB malloc, frees it
    and writes a second one, on the main thread and on a new thread. With 4 KB pages the first costs 256
    minor faults per MB, with 2 MB transparent huge pages ≈ 0.5–2.5 (measured); the second costs as much
    again when glibc hands the block back to the kernel (its default for blocks this large, and for a
    thread's own arena whatever mmap_max says) and nothing when it keeps it."""
    if R.transparent_hugepage_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {R.transparent_hugepage_mode()!r} on this kernel")
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    version = tuple(int(x) for x in libc.split()[-1].split(".")[:2]) if libc.startswith("glibc") else (0, 0)
    if version < (2, 35):
        pytest.skip(f"glibc.malloc.hugetlb needs glibc >= 2.35 (this is {libc or 'not glibc'})")
    on = json.loads(_run("uvjax.runtime_env", {}, module=True))
    off = json.loads(_run("uvjax.runtime_env", {"UVJAX_MALLOC_HUGETLB": "0"}, module=True))
    # huge pages only, per-thread arenas: what the second half of the policy is there to prevent
    arenas = json.loads(_run("uvjax.runtime_env", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=8"}, module=True))
    assert on["GLIBC_TUNABLES"] == ALL and off["GLIBC_TUNABLES"] == ""
    per_mb = 1024 / (os.sysconf("SC_PAGE_SIZE") // 1024)  # faults per MB with small pages only
    if R.transparent_hugepage_mode() == "madvise":  # ("always" gives huge pages without the advice too)
        assert off["minor_faults_per_mb"] >= 0.9 * per_mb
        assert off["minor_faults_per_mb_after_free"] >= 0.9 * per_mb
    assert on["minor_faults_per_mb"] < 0.25 * per_mb  # ≤ 2.5 measured; margin for a fragmented machine
    assert on["minor_faults_per_mb_after_free"] < 0.05 and on["thread_minor_faults_per_mb_after_free"] < 0.05
    assert arenas["minor_faults_per_mb_after_free"] < 0.05  # main arena: mmap_max=0 keeps it
    assert arenas["thread_minor_faults_per_mb_after_free"] >= 0.2  # a thread arena maps its own block (0.5)
