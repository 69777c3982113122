"""UnifiedVisual (arXiv 2509.14738) as a config: the Anole/Chameleon shared-vocabulary model trained on
interleaved reasoning + generation data with the per-modality loss.

The layout (``model.image.layout="shared_vocab"``): VQ codes are rows of the one text vocabulary, named
``IMGIMG…Z``; an image enters through the text embedding and is predicted by the LM head; ``<boi>``/``<eoi>``
are the model's own tokens. Text CE over text targets and image CE over image targets, each normalised by
its global count, ``loss.w_image`` = the weight of the image term (UnifiedVisual does not publish its λ:
reference §A.3). ``model.image.image_ce`` says what the image CE normalises over: ``image_rows`` (the code
distribution the decoder samples from) or ``full_vocab`` (the whole vocabulary, what a Chameleon full
fine-tune computes).

Presets (``--config=configs/unifiedvisual.py:<preset>``):
- ``tiny`` (default, CPU): the first run's Smart Watch stages (the VQ and the rendered data are the cached
  stages of ``configs/vqvq.py``; the tokenizer also learns the reasoning phrasings) plus the procedural
  UnifiedVisual-style subsets of ``uvjax/data/reasoning.py`` (indirect generation prompts with rationales,
  edits, corrections, images inside reasoning answers) in the interleaved stream; a 3-layer
  Chameleon-architecture decoder (per-head q/k norm) from scratch over 1,024 text + 512 image tokens;
  1,500 steps of 16 × 256 tokens, α = 1. Measured on 2 cores shared with other jobs: 38 min with a cold
  cache (LM 30 min); VQA weather 0.95, corners 0.48 / 0.41, generation at chance, as the two-head first
  run at this budget (docs/RESULTS.md, "The first run").
- ``smoke``: seconds, for tests.
- ``anole7b``: Anole-7B (or Chameleon-7B) from a local HF ``ChameleonForConditionalGeneration`` directory
  (``--config.model.pretrained.path=``; its tokenizer comes with it; its VQGAN converted once by
  ``python -m uvjax.weights.hf_chameleon DIR --vq_out=VQ``, ``--config.stages.source.vq=VQ``),
  UnifiedVisual-240K parquet through the imported-data stages (``--config.stages.source.train=`` the parquet,
  ``.image_dir=`` the extracted image tarballs), 512 px images -> 1,024 codes (1,026 tokens per image span),
  sequences of 4,096, global batch 64, bf16 compute, full remat, FSDP over every device, LoRA r=16 on all
  projections. ``uvjax.plan`` (deviceless TPU AOT, libtpu 0.0.42): ``--topology=v5p-128`` (64 chips) fits at
  36.1 GiB per chip (95 GiB HBM); ``--topology=v5e-64`` does not (the step's temporaries need 35.1 GiB of a
  v5e's 16): a v5e slice needs shorter sequences per chip (docs/PERFORMANCE.md). 8×H100: add
  ``--config.train.grad_accum=8`` (one sequence per GPU per microbatch); ``--topology=h100-8`` (CPU backend,
  approximate) gives 14.4 GiB per GPU.
"""
from uvjax.config import base_config, shared_vocab_layout


def _vqvq(preset: str):
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "uvjax_configs_vqvq_for_unifiedvisual", os.path.join(os.path.dirname(os.path.abspath(__file__)), "vqvq.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(preset)


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    if preset not in ("tiny", "smoke", "anole7b"):
        raise ValueError(f"configs/unifiedvisual.py: unknown preset {preset!r}; expected tiny, smoke, anole7b")
    if preset == "anole7b":
        return _anole7b()
    c = _vqvq(preset)  # the Smart Watch stages and the tiny model's shapes
    c.name = f"unifiedvisual-{preset}"
    # UnifiedVisual's subsets, procedurally: every task of data/reasoning.py in the interleaved stream
    c.stages.reasoning.tasks = ("gen_reasoning", "edit", "correct", "mm_reasoning")
    c.data.streams.understanding.weight = c.data.streams.generation.weight = 1.0
    c.data.streams.interleaved.weight = 1.0
    c.loss.w_image = 1.0
    shared_vocab_layout(c)
    if preset == "tiny":
        c.stages.reasoning.num_scenes = 2000
        c.train.seq_len, c.train.batch_size, c.train.steps = 256, 16, 1500
    else:
        c.stages.reasoning.num_scenes = 24
    return c


def _anole7b():
    from uvjax.weights.pretrained import chameleon_preset
    c = base_config()
    c.name = "unifiedvisual-anole7b"
    # shapes, image-code map and codebook from the directory's config.json when it is there (Chameleon-7B's
    # otherwise, so that uvjax.plan can size it before the weights are on the machine); LoRA only
    chameleon_preset(c, "/path/to/Anole-7b-hf", rank=16, alpha=32.0)
    c.optim.lr = 1e-4
    c.model.remat = "full"
    c.data.system_prompt = ""
    c.data.image_tokens = 1024
    c.data.streams.understanding.weight = c.data.streams.generation.weight = c.data.streams.interleaved.weight = 1.0
    c.loss.w_image = 1.0
    c.loss.text_target_capacity = c.loss.image_target_capacity = 0.5
    c.train.batch_size, c.train.seq_len, c.train.steps = 64, 4096, 3750  # ≈ 1 epoch of 240K at 64/step
    c.optim.warmup_steps, c.optim.min_lr_ratio = 100, 0.0
    c.mesh.shape = (1, -1, 1)  # FSDP over every device
    c.stages.build = True
    c.stages.source.kind = "imported"
    c.stages.source.format = "unifiedvisual"
    # the checkpoint's VQGAN as a uvjax VQ file: python -m uvjax.weights.hf_chameleon DIR --vq_out VQ
    c.stages.source.vq = "/path/to/anole_vqgan.safetensors"
    c.stages.data.image_size = 512  # Chameleon VQGAN: 512 px -> 32x32 = 1,024 codes
    return c
