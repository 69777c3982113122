"""Reasoning: generation data with vs without rationales; generation accuracy on indirect prompts, plain
generation and VQA (``uvjax/experiments/reasoning.py``).

Presets:
- ``tiny`` (default, CPU): VQ-VQ ``tiny_long`` (4 layers, image loss at full weight: the ``tiny`` model's
  generation ignores the prompt at this budget, so both arms would score chance on indirect prompts and the
  comparison would say nothing) with 2,000 ``gen_reasoning`` scenes in the interleaved stream (weights
  understanding 1 : generation 1 : reasoning 1); sequences of 256 tokens (a rationale plus 64 codes does not
  fit 128) at batch 16 (half of ``tiny_long``'s examples per step); the rationale arm 1,800 steps (26.4 examples
  per step, measured: ≈ 47k examples, two thirds of them ending in an image — past the ≈ 19k generation
  samples after which ``tiny_long``'s generation starts to follow the prompt), the ablation matched on
  reasoning examples (32.1 per step: 1,481 steps); 2 seeds; 200 test images + 100 indirect prompts.
- ``quick``: the ``smoke`` chain, 24 scenes, 3 steps, 3 indirect prompts, one seed (tests).
"""
from uvjax.experiments.arms import add_overrides, experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("reasoning", preset)
    c.eval.indirect_prompts = 100
    c.eval.indirect_max_text = 160
    add_overrides(c, ("stages.reasoning.num_scenes", 2000), ("stages.reasoning.tasks", ("gen_reasoning",)),
                  ("data.streams.interleaved.weight", 1.0), ("train.seq_len", 256), ("train.batch_size", 16))
    if preset == "tiny":
        c.base = "vqvq.py:tiny_long"
        add_overrides(c, ("data.streams.understanding.weight", 1.0), ("data.streams.generation.weight", 1.0),
                      ("train.steps", 1800))
    elif preset == "quick":
        c.eval.indirect_prompts, c.eval.indirect_max_text = 3, 16
        add_overrides(c, ("stages.reasoning.num_scenes", 24), ("train.batch_size", 8))
    return c
