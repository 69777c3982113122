"""CLIP-CLIP on real data (LLaVA-1.5 + ShareGPT4V with generation records, seed §5.2): CLIP ViT-L/14-336
layer −2 patch features (576 x 1024, CLS dropped) in through an mlp2x_gelu understanding adapter and out
through a regression head (cosine loss, alpha 1.0), Vicuna-7B shapes, full fine-tuning (no LoRA).

Presets (``--config=configs/clipclip.py:<preset>``):
- ``finetune`` (default): stage 2 — decoder, adapters and head trainable at 2e-5, 128 per step, 6761 steps.
- ``pretrain``: stage 1 — adapters and head only at 1e-3, 256 per step, 2767 steps.

Paths come from the config (nothing is downloaded): ``towers.clip.path`` (HF CLIPVisionModel dir, converted
by ``uvjax.weights.hf_siglip``), ``data.streams.{understanding,generation}.paths`` (ArrayRecord shards of
records whose images are pre-computed CLIP features), ``data.tokenizer`` (the base model's tokenizer).
Adapters are separate (the reference's ``--detach_mm_projector`` was a no-op, so it shared them: set
``model.image.share_adapters=True`` to reproduce).
"""
from ml_collections import ConfigDict

from uvjax.config import ADAPTER_PATTERN, base_config

PRESETS = ("finetune", "pretrain")


def real_data_config(preset: str, name: str, output_kind: str) -> ConfigDict:
    """Shared by clipclip and clipvq: Vicuna-7B shapes, CLIP-L/336 input, the §5.2 schedules."""
    if preset not in PRESETS:
        raise ValueError(f"configs/{name}.py: unknown preset {preset!r}; expected one of {PRESETS}")
    c = base_config()
    c.name = f"{name}-{preset}"
    m = c.model
    m.vocab_size, m.hidden, m.layers, m.heads, m.kv_heads, m.intermediate = 32064, 4096, 32, 32, 32, 11008
    m.rope_base, m.norm_eps, m.dtype, m.remat = 10000.0, 1e-5, "bfloat16", "full"
    im = m.image
    im.input_kind, im.output_kind, im.feature_dim = "features", output_kind, 1024
    im.und_adapter = "mlp2x_gelu"
    im.gen_adapter = "mlp2x_gelu"  # CLIP-VQ used mlp 8->4096->4096 too (seed §2.4)
    im.num_codes, im.code_dim = 16384, 8
    im.share_adapters = False
    if output_kind == "features":
        c.loss.image_loss, c.loss.w_image = "cosine", 1.0
    else:
        c.loss.image_loss, c.loss.w_image = "ce", 0.2
    c.towers = ConfigDict(dict(
        clip=ConfigDict(dict(preset="clip_l14_336", path="", select_layer=-2, feature_post_norm=False)),
        vq=ConfigDict(dict(path=""))))
    c.data.template, c.data.system_prompt = "vicuna_v1", None
    c.data.feature_dim = 1024
    c.data.image_tokens = 576 if output_kind == "features" else 0  # CLIP 576 vs VQ 256 in clipvq
    c.train.seq_len = 2048
    c.optim.schedule, c.optim.min_lr_ratio, c.optim.weight_decay = "cosine", 0.0, 0.0
    c.loss.text_target_capacity = c.loss.image_target_capacity = 0.5
    if preset == "pretrain":
        c.train.trainable = (ADAPTER_PATTERN,)
        c.optim.lr, c.train.batch_size, c.train.steps = 1e-3, 256, 2767
    else:
        c.train.trainable = (r"params/(?!image_codebook/).*",)  # codebook rows stay the frozen VQ's
        c.optim.lr, c.train.batch_size, c.train.steps = 2e-5, 128, 6761
    c.optim.warmup_steps = -(-3 * c.train.steps // 100)  # warmup_ratio 0.03, rounded up like HF
    c.stages.build = False
    return c


def get_config(arg: str | None = None):
    return real_data_config((arg or "finetune").strip(), "clipclip", "features")
