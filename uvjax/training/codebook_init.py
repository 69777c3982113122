"""Fresh runs start the model's code vectors from the VQ tokenizer's own codebook (the paper's VQ-features
-> adapter path)."""
from __future__ import annotations

import jax
import numpy as np

from uvjax.towers.vq_codec import VQCodec


def init_codebook_from_vq(state, trainer, cfg):
    """Fresh runs: the model's code vectors (``params/image_codebook``, what the adapters read) start
    as the VQ tokenizer's own l2-normalised codebook, as in the paper (VQ features → adapter), instead
    of random unit vectors; codes that look alike then start alike. Needs ``model.image.codebook_from``
    (set by the stages to the VQ directory)."""
    src = cfg.model.image.get("codebook_from", "") if hasattr(cfg.model.image, "get") else ""
    if not src:
        return state
    book = VQCodec(src).codebook().astype(np.float32)
    for part in ("trainable", "frozen"):
        tree = getattr(state, part)
        if "params" in tree and "image_codebook" in tree["params"]:
            old = tree["params"]["image_codebook"]
            if old.shape != book.shape:
                raise ValueError(f"model.image codebook {old.shape} != VQ codebook {book.shape} in {src}")
            new = jax.device_put(book.astype(old.dtype), old.sharding)
            tree = {**tree, "params": {**tree["params"], "image_codebook": new}}
            state = state.replace(**{part: tree})
    return state
