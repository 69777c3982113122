"""Understanding/generation ratio: one side's data fixed, the other's varied 0/25/50/75/100 %; both
metrics against the ratio (``uvjax/experiments/ratio.py``).

Presets:
- ``tiny`` (default, CPU): VQ-VQ ``tiny``; understanding fixed (``fixed='generation'`` flips it) at the
  examples of 1,000 understanding-only steps (batch 32 × 128, ≈ 2.3 steps/s on 2 cores; at 100 % generation
  this is the first run's 1,500-step mix); adding generation data adds steps (≈ 6,250 steps per seed over the
  5 arms); 2 seeds; 200 test images, VQA and generation; measured 46 min per seed (430–649 s per run) + cold
  stages (VQ ≈ 2 min, judge ≈ 15 s); ``--config.ratios="(0.0,0.5,1.0)" --config.seeds="(0,)"`` 27 min. Why 1,000: the first
  preset's 350 steps (sized at ≈ 1 step/s) leave VQA at chance (docs/RESULTS.md §2).
- ``quick``: the ``smoke`` chain, ratios 0/50/100 %, 3 steps, one seed (tests).
"""
from uvjax.experiments.arms import add_overrides, experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("ratio", preset)
    c.fixed = "understanding"
    c.ratios = (0.0, 0.25, 0.5, 0.75, 1.0)
    if preset == "tiny":
        add_overrides(c, ("train.steps", 1000))
    elif preset == "quick":
        c.ratios = (0.0, 0.5, 1.0)
    return c
