"""Alignment: affine distortion s ∈ {0, 0.1, 0.2, 0.3} of the understanding features, unified vs
understanding-only (``uvjax/experiments/alignment.py``). Adapters are shared (as in the reference VQ-VQ),
otherwise the distortion is absorbed by the understanding adapter.

Presets:
- ``tiny`` (default, CPU): VQ-VQ ``tiny``; unified 1,500 steps at batch 32 × 128 (the first run's budget,
  ≈ 2.3 steps/s on 2 cores), understanding-only matched (≈ 1,000 steps); 8 arms; VQA on 200 test images (and
  generation for the unified arms). One seed (``--config.seeds="(0,)"``) measured 76 min (unified
  640–703 s, understanding-only 432–495 s per run), both seeds ≈ 2 h 30 min (the driver resumes, so a
  second seed can be added later). Why not fewer steps: the first preset's
  350 / 235 steps were sized at ≈ 1 step/s, and at that length (and at 800 / 533, knowledge transfer) VQA
  stays at chance (docs/RESULTS.md §2, §3).
- ``quick``: the ``smoke`` chain, s ∈ {0, 0.3}, 3 steps, one seed (tests).
"""
from uvjax.experiments.arms import add_overrides, experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("alignment", preset)
    c.strengths = (0.0, 0.1, 0.2, 0.3)
    add_overrides(c, ("model.image.share_adapters", True))
    if preset == "quick":
        c.strengths = (0.0, 0.3)
    return c
