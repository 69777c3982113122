"""Data scaling: single-task baseline vs unified as the other task's data grows 0/25/50/100 %
(``uvjax/experiments/data_scaling.py``).

Presets:
- ``tiny`` (default, CPU): VQ-VQ ``tiny``; baselines of 1,000 (understanding) and 300 (generation) steps at
  batch 32 × 128 (≈ 2.3 steps/s on 2 cores); adding the other task's data adds steps at equal target-task
  samples (4,875 + 2,250 steps per seed over the 8 arms); 2 seeds; 200 test images, one task evaluated per
  arm. ≈ 1 h 55 min + cold stages (VQ ≈ 2 min, judge ≈ 15 s). Why 1,000: the first preset's 250 / 120 steps
  (sized at ≈ 1 step/s) left every arm at chance, even on weather (docs/RESULTS.md §2); understanding-only at
  1,000 steps reads weather 1.00 and the corners 0.90–1.00 (mutual benefit). Generation at 300 steps still
  ignores the prompt (that needs `configs/vqvq.py:tiny_long`'s budget), so the generation side measures
  image quality (Fréchet) more than prompt following.
- ``quick``: the ``smoke`` chain, fractions 0 and 100 %, 3 steps, one seed (tests).
"""
from uvjax.experiments.arms import experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("data_scaling", preset)
    c.targets = ("understanding", "generation")
    c.fractions = (0.0, 0.25, 0.5, 1.0)
    c.steps = dict(understanding=1000, generation=300)
    if preset == "quick":
        c.fractions = (0.0, 1.0)
        c.steps = dict(understanding=3, generation=3)
    return c
