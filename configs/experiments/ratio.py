"""Understanding/generation ratio: one side's data fixed, the other's varied 0/25/50/75/100 %; both
metrics against the ratio (``uvjax/experiments/ratio.py``).

Presets:
- ``tiny`` (default, CPU): VQ-VQ ``tiny``; understanding fixed (``fixed='generation'`` flips it) at the
  examples of 350 understanding-only steps (batch 32 × 128, ≈ 1 step/s on 2 cores); adding generation data
  adds steps (≈ 2,200 steps per seed over the 5 arms); 2 seeds; 200 test images, VQA and generation.
  ≈ 85 min + cold stages (VQ ≈ 15 min, judge ≈ 4 min): under 2 h.
- ``quick``: the ``smoke`` chain, ratios 0/50/100 %, 3 steps, one seed (tests).
"""
from uvjax.experiments.common import add_overrides, experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("ratio", preset)
    c.fixed = "understanding"
    c.ratios = (0.0, 0.25, 0.5, 0.75, 1.0)
    if preset == "tiny":
        add_overrides(c, ("train.steps", 350))
    elif preset == "quick":
        c.ratios = (0.0, 0.5, 1.0)
    return c
