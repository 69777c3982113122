"""VQ tokenizer training config: ``get_config("tiny")`` (default, CPU minutes) or ``"smoke"`` (seconds, tests).

Usage: ``python -m uvjax.training.vq_train --config=configs/vq_tokenizer.py:tiny --config.train.steps=400``.
``model`` holds ``uvjax.models.vq.VQConfig`` fields; ``ch_mult`` length sets the downsample (2^(len-1)).

tiny: LlamaGen VQ layout at width 16 (16,16,32,64,64), downsample 16 -> 8x8 = 64 codes per 128 px image,
512 codes x 8 dims (what configs/vqvq.py:tiny expects: num_codes 512, code_dim 8, seq_len 128 leaves no room
for 256 image tokens). One GroupNorm group (instance norm at width 16 erases flat colours), attention only in
the mid block, trained on 64 px crops (4x cheaper per step than 128 px; the model is convolutional).
tiny_ds8: the same at downsample 8 (16x16 = 256 codes) for users who need hands/text detail.
"""
from ml_collections import ConfigDict

PRESETS = ("tiny", "tiny_ds8", "smoke")


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
    c.model = _model()
    c.data = ConfigDict(dict(image_size=128, num_train=4000, num_eval=256, seed=0))
    c.train = ConfigDict(dict(
        steps=1800, batch_size=16, crop_size=64, lr=2e-3, warmup_steps=50, final_lr_frac=0.05,
        b1=0.9, b2=0.99, grad_clip=1.0,
        l1_weight=1.0, l2_weight=1.0, edge_weight=0.5, vq_weight=1.0,
        restart_every=25, restart_until=0.8, restart_pool=256, restart_window=8, restart_noise=0.0,
        eval_batch=64, log_every=10, seed=0, time_budget_s=0.0))
    if arg == "tiny_ds8":  # 16x16 = 256 codes per 128 px image: more detail, 4x longer LLM image spans
        c.model = _model(ch_mult=(1, 1, 2, 4))
    elif arg == "smoke":  # seconds on CPU: tests and CI
        c.model = _model(ch=8, ch_mult=(1, 2), z_channels=16, codebook_size=64, mid_attn=False)
        c.data = ConfigDict(dict(image_size=32, num_train=64, num_eval=16, seed=0))
        c.train.update(steps=20, batch_size=8, crop_size=0, warmup_steps=2, restart_every=5, log_every=5,
                       eval_batch=16)
    return c
