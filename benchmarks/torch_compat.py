"""Making the registry's torchvision importable next to the CPU torch (tests and benchmarks only).

The torchvision 0.28.0 wheel on the package registry is CUDA-built: with torch 2.13.0+cpu its C ops do
not load, and ``import torchvision`` then fails on two unguarded fake-op registrations
(``torchvision::nms`` / ``qnms``). transformers imports torchvision whenever it is installed, so without
this even ``LlamaForCausalLM`` fails to import. Declaring the two schemas lets the pure-Python parts
(model classes that pytorch-fid and transformers build on) import; no torchvision op is ever run.
"""
from __future__ import annotations

# one implementation, in the package (the lmms-eval launcher needs it too): uvjax/integrations/lmms_eval.py
from uvjax.integrations.torch_compat import make_torchvision_importable as ensure_torchvision_importable

__all__ = ["ensure_torchvision_importable"]
