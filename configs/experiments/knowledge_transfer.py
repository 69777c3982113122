"""Knowledge transfer: understanding data biased against weather, complete generation data; weather VQA
of unified vs understanding-only, plus linear probes of weather on the trained representations
(``uvjax/experiments/knowledge_transfer.py``).

Presets:
- ``tiny`` (default, CPU): VQ-VQ ``tiny``; weather VQA turns and caption fragments kept with rate 0.1 in the
  train understanding records (a pre-tokenised dataset of its own, ≈ 90 s once); unified 800 steps at batch
  32 × 128 (≈ 1 step/s on 2 cores), understanding-only matched (≈ 530 steps); 3 seeds; 200 test images;
  probes fit on 1,000 rendered images. ≈ 80 min + cold stages (VQ ≈ 15 min, judge ≈ 4 min): under 2 h.
- ``quick``: the ``smoke`` chain, 3 steps, 2 seeds (so the spread is exercised), small probes (tests).
"""
import ml_collections as mlc

from uvjax.experiments.common import add_overrides, experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("knowledge_transfer", preset)
    c.weather_keep = 0.1
    c.probe = mlc.ConfigDict(dict(train_images=1000, test_images=200, l2=1e-2))
    c.seeds = (0, 1, 2)
    if preset == "tiny":
        add_overrides(c, ("train.steps", 800))
    elif preset == "quick":
        c.seeds = (0, 1)
        c.probe.train_images, c.probe.test_images = 24, 12
    return c
