"""Alignment: affine distortion s ∈ {0, 0.1, 0.2, 0.3} of the understanding features, unified vs
understanding-only (``uvjax/experiments/alignment.py``). Adapters are shared (as in the reference VQ-VQ),
otherwise the distortion is absorbed by the understanding adapter.

Presets:
- ``tiny`` (default, CPU): VQ-VQ ``tiny``; unified 350 steps at batch 32 × 128 (≈ 1 step/s on 2 cores),
  understanding-only matched (≈ 235 steps); 8 arms × 2 seeds; VQA on 200 test images (and generation for
  the unified arms). ≈ 90 min + cold
  stages (VQ ≈ 15 min): under 2 h.
- ``quick``: the ``smoke`` chain, s ∈ {0, 0.3}, 3 steps, one seed (tests).
"""
from uvjax.experiments.common import add_overrides, experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("alignment", preset)
    c.strengths = (0.0, 0.1, 0.2, 0.3)
    add_overrides(c, ("model.image.share_adapters", True))
    if preset == "tiny":
        add_overrides(c, ("train.steps", 350))
    elif preset == "quick":
        c.strengths = (0.0, 0.3)
    return c
