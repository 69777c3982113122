"""SigLIP-SigLIP: SigLIP features in and out (separate mlp2x_gelu adapters, feature-regression head,
cosine loss, alpha 1.0).

Presets (``--config=configs/siglipsiglip.py:<preset>``), the decoder shapes of ``configs/vqvq.py``'s preset of the
same name (so the four architectures compare like for like and share cached stages):
- ``tiny`` (default): CPU; stages tokenizer → VQ (if codes are used) → SigLIP pretraining → pre-tokenised
  dataset → LM → evaluation (``uvjax/stages/features.py``).
- ``smoke``: seconds-long version of the same chain, for tests and CI.
- ``vicuna7b``: the paper's shapes (Vicuna-7B + LoRA r=128, SigLIP-B/16 196x768, VQ-16); weights come
  from ``towers.*.path`` and the base-model loader, data from ``data.streams.*.paths``.

Why these adapters, losses and alphas: ``uvjax.config.configure_architecture``.
"""
from uvjax.config import load_config_file
from uvjax.config import configure_architecture


def get_config(arg: str | None = None):
    preset = (arg or "tiny").strip()
    # tiny: the decoder and stages of vqvq.py's tiny with the paper's recipe (``tiny_paper``; issue #30's changes to
    # the first run's recipe are measured for VQ-VQ only)
    c = load_config_file("vqvq", "tiny_paper" if preset == "tiny" else preset) \
        if preset in ("tiny", "tiny_paper", "smoke", "vicuna7b") else None
    if c is None:
        raise ValueError(f"configs/siglipsiglip.py: unknown preset {preset!r}; expected one of tiny, tiny_paper, smoke, vicuna7b")
    return configure_architecture(c, preset, input_kind="features", output_kind="features", name="siglipsiglip")
