"""Data scaling: single-task baseline vs unified as the other task's data grows 0/25/50/100 %
(``uvjax/experiments/data_scaling.py``).

Presets:
- ``tiny`` (default, CPU): VQ-VQ ``tiny``; baselines of 250 (understanding) and 120 (generation) steps at
  batch 32 × 128 (≈ 1 step/s on 2 cores); adding the other task's data adds steps at equal target-task
  samples (≈ 1,200 + 900 steps per seed over the 8 arms); 2 seeds; 200 test images, one task evaluated per
  arm. ≈ 80 min + cold stages (VQ ≈ 15 min, judge ≈ 4 min): under 2 h.
- ``quick``: the ``smoke`` chain, fractions 0 and 100 %, 3 steps, one seed (tests).
"""
from uvjax.experiments.common import experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("data_scaling", preset)
    c.targets = ("understanding", "generation")
    c.fractions = (0.0, 0.25, 0.5, 1.0)
    c.steps = dict(understanding=250, generation=120)
    if preset == "quick":
        c.fractions = (0.0, 1.0)
        c.steps = dict(understanding=3, generation=3)
    return c
