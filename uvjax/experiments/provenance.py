"""Where a result came from: the code's commit, the machine, this process's CPU time, and the JSON
writer every experiment record goes through (atomic; numpy values and configs serialised)."""
from __future__ import annotations

import functools
import json
import os
import platform
import resource
import subprocess

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """The git commit of the code this process runs: read once (``main`` reads it at start), since a
    long experiment keeps the modules it imported while the checkout may move on under it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    devs = jax.devices()
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": len(devs), "device_kind": devs[0].device_kind if devs else ""}


def cpu_s() -> float:
    """CPU seconds (user + system, all threads) of this process: on a shared machine, the honest cost."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=json_default, sort_keys=False)
    os.replace(tmp, path)


def json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)
