"""Mutual benefit: unified vs understanding-only vs generation-only, equal samples per task
(``uvjax/experiments/mutual_benefit.py``).

Presets:
- ``tiny`` (default, CPU): VQ-VQ and SigLIP-VQ ``tiny`` models; the unified arm is the first run's LM
  (1,500 steps at batch 32 × 128, ≈ 2.2 steps/s on 2 cores), the single-task arms their matched share
  (≈ 1,000 understanding / ≈ 500 generation steps), plus the step control (understanding only, 1,500 steps);
  2 seeds; 200 test images. Measured on 2 cores: unified 12.7 min, understanding-only 9.2, generation-only
  4.3 (≈ 26 min per architecture and seed without the control, ≈ 39 min with it: ≈ 2.6 h for 2 × 2; pass
  ``--config.seeds="(0,)"`` for ≈ 80 min) plus the stages when the cache is cold (VQ ≈ 2 min, SigLIP tower
  ≈ 2 min, judge ≈ 25 s, two pre-tokenised datasets ≈ 1 min). Fewer steps leave the corners unlearned in
  every arm.
- ``quick``: the ``smoke`` chain, 3 steps, 3 test images, one seed (tests; about a minute).
- ``smollm2``: VQ-VQ on SmolLM2-135M + LoRA (``configs/vqvq.py:smollm2``; SigLIP-VQ has no smollm2 preset):
  unified 300 steps at 8 × 192 (≈ 8.5 s/step on 2 cores: ≈ 45 min) + matched single-task arms, one seed,
  100 test images: ≈ 1.7 h.
- ``smollm2_gpu``: the same model on one NVIDIA GPU, long enough to learn the attributes: bf16 compute (fp32
  LoRA factors and Adam moments), cuDNN attention, batch 32 × 192, unified 2,000 steps (≈ 64k examples,
  4× the CPU preset's batch and 6.7× its steps) + matched single-task arms (1,341 / 656 steps) and the
  step control, 3 seeds, 200 test images. Measured on one H100: 85–105k tokens/s, ≈ 9 min per seed
  (unified 2.5–3.5 min, understanding-only 1.6, generation-only 0.9, control 2.3, evaluation included).
"""
from uvjax.experiments.arms import add_overrides, experiment_config


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    c = experiment_config("mutual_benefit", "smollm2" if preset == "smollm2_gpu" else preset)
    c.preset = preset
    c.architectures = ("vqvq", "siglipvq")
    c.arch_preset = "tiny_paper"  # the paper's recipe (alpha 0.2, its mix) on the first run's model
    # + understanding-only at the unified arm's steps: separates "generation data helps" from "more updates help"
    c.step_control = True
    if preset == "quick":
        c.arch_preset = "smoke"
    elif preset == "smollm2":
        c.architectures = ("vqvq",)
        c.arch_preset = "smollm2"
        c.seeds = (0,)
        c.eval.num_images, c.eval.batch_size = 100, 16
        add_overrides(c, ("train.steps", 300))
    elif preset == "smollm2_gpu":
        c.architectures = ("vqvq",)
        c.arch_preset = "smollm2"
        c.seeds = (0, 1, 2)
        c.eval.num_images, c.eval.batch_size = 200, 50
        add_overrides(c, ("train.steps", 2000), ("train.batch_size", 32), ("optim.warmup_steps", 100),
                      ("model.dtype", "bfloat16"), ("model.attention", "cudnn"), ("train.progress", False),
                      ("train.log_every", 50), ("train.checkpoint_every", 500))
    return c
