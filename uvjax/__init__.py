"""uvjax: unified vision-language models (understand + generate images) in JAX/Flax."""
import sys as _sys

__version__ = "0.1.0"

# `python -m uvjax.<module>`: restart once with glibc's huge-page malloc (uvjax/runtime_env.py says why)
# (uvjax.runtime_env, the probe, does it itself: importing it here would shadow its __main__)
if _sys.argv[:1] == ["-m"] and "uvjax.runtime_env" not in getattr(_sys, "orig_argv", []):
    from uvjax import runtime_env as _runtime_env
    if _runtime_env.launched_as_uvjax_module(_sys.orig_argv):
        _runtime_env.reexec_with_malloc_hugetlb()


def __getattr__(name):
    """``uvjax.load`` / ``uvjax.Model`` (``uvjax/api.py``) without importing JAX on ``import uvjax``."""
    if name in ("load", "Model"):
        from uvjax import api
        return getattr(api, name)
    raise AttributeError(f"module 'uvjax' has no attribute {name!r}")
