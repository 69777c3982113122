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


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's OpenMP pool spins next to XLA's threads on a busy 2-core machine: one torch thread for the
    module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``), restored after."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hypothesis_profiles():
    """CI (``CI`` set and not false/0, as CI runners set it): derandomised hypothesis -- a red run is the
    same run when repeated -- with no example database carried between runs and the reproduce blob
    printed on failure. Locally (``dev``) hypothesis stays random, so repeated runs keep exploring new
    examples; ``HYPOTHESIS_PROFILE=ci`` gives CI's. Explicit here rather than relying on hypothesis' own
    CI detection (6.155 loads a similar built-in "ci" profile whenever ``CI`` is in the environment, even
    ``CI=false``). No deadline in either: timings on a shared 2-core runner are not a test result."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the test extra is not installed: nothing to configure
        return
    default = settings.get_profile("default")
    settings.register_profile("ci", parent=default, derandomize=True, database=None, print_blob=True,
                              deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", parent=default, print_blob=True, deadline=None)
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if ci else "dev"))


_hypothesis_profiles()
