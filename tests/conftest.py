"""8 fake CPU devices for mesh tests; must run before jax is imported anywhere."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

# The registry's torchvision (pulled in by pytorch-fid in the torch extra) is CUDA-built; make it importable
# next to the CPU torch before any test imports transformers (benchmarks/torch_compat.py says why).
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.torch_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()
