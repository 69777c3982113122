"""Reasoning: generation data with vs without rationales; generation accuracy on indirect prompts, plain
generation and VQA (``uvjax/experiments/reasoning.py``).

Presets:
- ``tiny`` (default, CPU): VQ-VQ ``tiny`` with 2,000 ``gen_reasoning`` scenes in the interleaved stream
  (weights understanding 2 : generation 1 : reasoning 1); sequences of 256 tokens (a rationale plus 64 codes
  does not fit 128) at batch 16 (the same tokens per step, ≈ 1 step/s on 2 cores); the rationale arm 1,200
  steps, the ablation matched on reasoning examples; 2 seeds; 200 test images + 100 indirect prompts.
  ≈ 85 min + cold stages (VQ ≈ 15 min, judge ≈ 4 min, reasoning records ≈ 1 min per arm): under 2 h.
- ``quick``: the ``smoke`` chain, 24 scenes, 3 steps, 3 indirect prompts, one seed (tests).
"""
from uvjax.experiments.common import add_overrides, experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("reasoning", preset)
    c.eval.indirect_prompts = 100
    c.eval.indirect_max_text = 160
    add_overrides(c, ("stages.reasoning.num_scenes", 2000), ("stages.reasoning.tasks", ("gen_reasoning",)),
                  ("data.streams.interleaved.weight", 1.0), ("train.seq_len", 256), ("train.batch_size", 16))
    if preset == "tiny":
        add_overrides(c, ("train.steps", 1200))
    elif preset == "quick":
        c.eval.indirect_prompts, c.eval.indirect_max_text = 3, 16
        add_overrides(c, ("stages.reasoning.num_scenes", 24), ("train.batch_size", 8))
    return c
