"""VQ tokenizer training config: ``get_config("tiny")`` (default, CPU minutes) or ``"smoke"`` (seconds, tests).

Usage: ``python -m uvjax.training.vq_train --config=configs/vq_tokenizer.py:tiny --config.train.steps=400``.
``model`` holds ``uvjax.models.vq.VQConfig`` fields; ``ch_mult`` length sets the downsample (2^(len-1)).

tiny: LlamaGen VQ layout at width 16 (16,16,32,64), downsample 8 -> 8x8 = 64 codes per 64 px image, 512 codes
x 8 dims (what configs/vqvq.py:tiny expects: num_codes 512, code_dim 8; seq_len 128 leaves no room for 256 image
tokens). One GroupNorm group (instance norm at width 16 erases flat colours), attention only in the mid block,
whole 64 px images. Why 64 px: the renderer keeps icons and battery text legible at every output size, so at
64 px a weather icon is 18 px (28% of the width) and spans 2x2 codes; at 128 px with downsample 16 (tiny128) the
same 64 codes reduce it to a blob (measured: PSNR 19.8 and icons unrecognisable after 1800 steps, vs PSNR 22.1
with sun / cloud / rain distinct after 1200 steps here, in 60% of the time; 900 steps, the default since, give
PSNR 21.6 in ~110 s; the first run still reaches VQA weather and corners >= 0.92). Hands (1 px) are lost in both.
tiny128: downsample 16 on 128 px renders (8x8 = 64 codes), trained on 64 px crops.
tiny_ds8: 128 px at downsample 8 (16x16 = 256 codes) for users who need hands/text detail.
"""
from ml_collections import ConfigDict

PRESETS = ("tiny", "tiny128", "tiny_ds8", "smoke")


def _model(**kw) -> ConfigDict:
    m = dict(ch=16, ch_mult=(1, 1, 2, 4, 4), enc_res_blocks=1, dec_res_blocks=1, z_channels=64,
             codebook_size=512, code_dim=8, attn_last_level=False, mid_attn=True, l2_norm=True,
             norm_groups=1, norm_eps=1e-6, dropout=0.0, beta=0.25, legacy_beta=False, precision="highest")
    m.update(kw)
    return ConfigDict(m)


def get_config(arg: str = "tiny") -> ConfigDict:
    arg = arg or "tiny"
    if arg not in PRESETS:
        raise ValueError(f"unknown vq_tokenizer preset {arg!r}; choose from {PRESETS}")
    c = ConfigDict()
    c.preset = arg
    c.model = _model(ch_mult=(1, 1, 2, 4))
    c.data = ConfigDict(dict(image_size=64, num_train=4000, num_eval=256, seed=0))
    c.train = ConfigDict(dict(
        steps=900, batch_size=16, crop_size=0, lr=2e-3, warmup_steps=50, final_lr_frac=0.05,
        b1=0.9, b2=0.99, grad_clip=1.0,
        l1_weight=1.0, l2_weight=1.0, edge_weight=0.5, vq_weight=1.0,
        restart_every=25, restart_until=0.8, restart_pool=256, restart_window=8, restart_noise=0.0,
        eval_batch=64, log_every=10, seed=0, time_budget_s=0.0))
    if arg in ("tiny128", "tiny_ds8"):
        c.data.image_size = 128
        c.train.update(steps=1800, crop_size=64)  # 64 px crops: 4x cheaper per step; the model is convolutional
        # tiny128: downsample 16 (8x8 = 64 codes); tiny_ds8: downsample 8 (16x16 = 256 codes, 4x longer LLM spans)
        c.model = _model(ch_mult=(1, 1, 2, 4, 4) if arg == "tiny128" else (1, 1, 2, 4))
    elif arg == "smoke":  # seconds on CPU: tests and CI
        c.model = _model(ch=8, ch_mult=(1, 2), z_channels=16, codebook_size=64, mid_attn=False)
        c.data = ConfigDict(dict(image_size=32, num_train=64, num_eval=16, seed=0))
        c.train.update(steps=20, batch_size=8, crop_size=0, warmup_steps=2, restart_every=5, log_every=5,
                       eval_batch=16)
    return c
