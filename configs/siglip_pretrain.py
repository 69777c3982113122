"""SigLIP pretraining of the small image tower (``uvjax.training.siglip_pretrain``).

Presets: ``tiny`` (default; the embedded default's tower, a few CPU minutes) and ``smoke`` (seconds, tests).
``vit`` holds ``uvjax.models.siglip.ViTConfig`` fields (``preset`` + overrides); its ``image_size`` should
equal the data's (the Smart Watch renders), and ``image_size / patch_size`` squared is the number of
tokens per image the LM sees (tiny: 64 px renders in 8 px patches, 8x8 = 64, the same as the tiny VQ's codes).

Usage: ``python -m uvjax.training.siglip_pretrain --config=configs/siglip_pretrain.py:tiny --workdir=runs/siglip``
"""
from ml_collections import ConfigDict

PRESETS = ("tiny", "smoke")


def get_config(arg: str | None = None) -> ConfigDict:
    arg = (arg or "tiny").strip()
    if arg not in PRESETS:
        raise ValueError(f"unknown siglip_pretrain preset {arg!r}; choose from {PRESETS}")
    c = ConfigDict()
    c.preset = arg
    c.vit = ConfigDict(dict(preset="siglip_small", image_size=64, patch_size=8, width=128, depth=4, heads=4,
                            mlp=512, select_layer=-2, feature_post_norm=False))
    c.text = ConfigDict(dict(width=128, depth=2, heads=4, mlp=512, max_len=128))
    c.embed_dim = 128
    c.data = ConfigDict(dict(image_size=64, num_train=3000, num_eval=256, seed=0, full_caption_prob=0.5))
    c.train = ConfigDict(dict(steps=300, batch_size=64, lr=1e-3, warmup_steps=30, final_lr_frac=0.05,
                              weight_decay=1e-4, grad_clip=1.0, log_every=10, eval_batch=128, seed=0,
                              time_budget_s=0.0))
    if arg == "smoke":
        c.vit.update(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp=64)
        c.text.update(width=32, depth=1, heads=2, mlp=64, max_len=96)
        c.embed_dim = 32
        c.data.update(image_size=32, num_train=64, num_eval=16)
        c.train.update(steps=12, batch_size=16, warmup_steps=2, log_every=4, eval_batch=16)
    return c
