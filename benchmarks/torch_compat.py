"""Making the registry's torchvision importable next to the CPU torch (tests and benchmarks only).

The torchvision 0.28.0 wheel on the package registry is CUDA-built: with torch 2.13.0+cpu its C ops do
not load, and ``import torchvision`` then fails on two unguarded fake-op registrations
(``torchvision::nms`` / ``qnms``). transformers imports torchvision whenever it is installed, so without
this even ``LlamaForCausalLM`` fails to import. Declaring the two schemas lets the pure-Python parts
(model classes that pytorch-fid and transformers build on) import; no torchvision op is ever run.
"""
from __future__ import annotations

import sys

_LIBS = []  # keeps the torch.library fragment alive


def ensure_torchvision_importable() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: nothing to fix
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
