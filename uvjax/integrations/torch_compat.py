"""Import fixes for the registry's PyTorch-side packages, light enough for benchmark workers (no JAX, no uvjax):
a CUDA-built torchvision beside a CPU torch, and filelock 4 under lmms-eval 0.7.3."""
from __future__ import annotations

import sys

_LIBS: list = []  # keeps the torch.library fragment of make_torchvision_importable alive


# ================================================================================ import-time compatibility
def make_torchvision_importable() -> None:
    """Lets ``import torchvision`` succeed when its C ops cannot load (the registry's torchvision 0.28.0 wheel is
    CUDA-built; next to torch 2.13.0+cpu its two unguarded fake-op registrations ``torchvision::nms`` / ``qnms``
    raise at import). lmms-eval imports ``evaluate`` → transformers → torchvision at start, so without this no
    evaluation can begin. Declaring the two op schemas lets the pure-Python parts import; lmms-eval's VQA path
    never runs a torchvision op. A torchvision that imports (or is absent) is left alone."""
    try:
        import torchvision
        return
    except ImportError:
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        del sys.modules[name]
    import torch
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBS.append(lib)
    import torchvision  # noqa: F401


def make_filelock_api_importable() -> None:
    """lmms-eval 0.7.3 patches ``filelock._api.FileLockMeta.__call__`` (a cross-class singleton cache so that
    ``datasets``' and filelock's locks on one file are one instance) before loading task data; filelock 4 moved
    that class to ``filelock._core._singleton`` and dropped ``_api``, so every evaluation stops with
    ``No module named 'filelock._api'``. This names the moved classes under the old module (same call signature:
    ``lock_file, timeout, mode, thread_local`` + keywords) so lmms-eval's own patch applies. Nothing is done when
    ``filelock._api`` exists (filelock 3) or the classes are not where filelock 4 keeps them."""
    try:
        import filelock._api
        return
    except ImportError:
        pass
    try:
        import types

        import filelock
        from filelock._core._lock import BaseFileLock
        from filelock._core._settings import UNSET_FILE_MODE
        from filelock._core._singleton import FileLockMeta
    except ImportError:
        return
    api = types.ModuleType("filelock._api", "alias of filelock 4's classes for lmms-eval 0.7.3 (uvjax)")
    api.FileLockMeta, api.BaseFileLock, api._UNSET_FILE_MODE = FileLockMeta, BaseFileLock, UNSET_FILE_MODE
    sys.modules["filelock._api"] = api
    filelock._api = api
