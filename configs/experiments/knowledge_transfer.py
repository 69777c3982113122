"""Knowledge transfer: understanding data biased against weather, complete generation data; weather VQA
of unified vs understanding-only, plus linear probes of weather on the trained representations
(``uvjax/experiments/knowledge_transfer.py``).

Presets:
- ``tiny`` (default, CPU): VQ-VQ ``tiny``; weather VQA turns and caption fragments kept with rate 0.1 in the
  train understanding records (a pre-tokenised dataset of its own, ≈ 90 s once); unified 1,500 steps at batch
  32 × 128 (the first run's length, ≈ 2.3 steps/s on 2 cores), understanding-only matched (≈ 1,000 steps);
  3 seeds; 200 test images; probes fit on 1,000 rendered images. ≈ 24 min per seed, ≈ 75 min for 3
  (estimated from the 800-step preset's measured 25 min for 2 seeds) + cold stages (VQ ≈ 2 min, judge
  ≈ 15 s). Why not 800: at 800 / 533 steps (the first preset, sized at ≈ 1 step/s) even the corners stay
  near chance in both arms (docs/RESULTS.md §3), so the weather comparison could not show transfer.
- ``quick``: the ``smoke`` chain, 3 steps, 2 seeds (so the spread is exercised), small probes (tests).
"""
import ml_collections as mlc

from uvjax.experiments.arms import experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("knowledge_transfer", preset)
    c.weather_keep = 0.1
    c.probe = mlc.ConfigDict(dict(train_images=1000, test_images=200, l2=1e-2))
    c.seeds = (0, 1, 2)
    if preset == "quick":
        c.seeds = (0, 1)
        c.probe.train_images, c.probe.test_images = 24, 12
    return c
