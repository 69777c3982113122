"""Layout comparison: shared vocabulary (Chameleon/Anole, UnifiedVisual's model) vs two heads + adapters
(2505.23043), equal data, steps and seeds (``uvjax/experiments/layout.py``).

Presets:
- ``tiny`` (default, CPU): the first run's VQ-VQ ``tiny`` model and recipe (3 layers, 1,500 steps at batch
  32 × 128, α = 0.2, the paper's mix) in both layouts; 3 seeds; 200 test images. Measured on 2 cores:
  591–744 s per run, evaluation included (≈ 65 min for the 6 runs), plus the stages when the cache is cold
  (VQ ≈ 2–6 min). Results: docs/RESULTS.md §7.
- ``quick``: the ``smoke`` chain, 3 steps, 3 test images, one seed (tests).
"""
from uvjax.experiments.arms import experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("layout", preset)
    # the shared-vocabulary arm's vocabulary: the text tokenizer's rows + one per code (the base's sizes)
    c.text_vocab, c.num_codes = (1024, 512) if preset == "tiny" else (512, 64)
    if preset == "tiny":
        c.seeds = (0, 1, 2)
    return c
