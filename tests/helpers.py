"""Small builders shared by tests."""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT, PAD, TEXT


def tiny_config(**over):
    from uvjax.config import base_config
    c = base_config()
    c.model.vocab_size = 96
    c.model.hidden = 32
    c.model.layers = 2
    c.model.heads = 4
    c.model.kv_heads = 2
    c.model.intermediate = 64
    c.model.image.num_codes = 24
    c.model.image.code_dim = 8
    c.train.batch_size = 8
    c.train.seq_len = 16
    c.train.steps = 10
    c.optim.warmup_steps = 2
    for k, v in over.items():
        node = c
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return c


def random_batch(rng: np.random.Generator, B: int, T: int, num_codes: int, vocab: int, *, packed=True):
    """Random but contract-conforming sequence arrays (segments, image spans, targets)."""
    tokens = np.zeros((B, T), np.int32)
    modality = np.zeros((B, T), np.int32)
    tt = np.zeros((B, T), np.int32)
    it = np.zeros((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        t, s = 0, 1
        while t < T - 2:
            n = int(rng.integers(3, T // 2 + 2)) if packed else T
            n = min(n, T - t)
            kinds = rng.integers(0, 4, n)
            for i in range(n):
                k = kinds[i]
                if k == 2:
                    modality[b, t + i] = IMAGE_IN
                    tokens[b, t + i] = rng.integers(0, num_codes)
                elif k == 3:
                    modality[b, t + i] = IMAGE_OUT
                    tokens[b, t + i] = rng.integers(0, num_codes)
                    it[b, t + i] = 1
                else:
                    modality[b, t + i] = TEXT
                    tokens[b, t + i] = rng.integers(0, vocab)
                    tt[b, t + i] = int(rng.random() < 0.6)
                seg[b, t + i] = s
                pos[b, t + i] = i
            t += n
            s += 1
            if not packed:
                break
        # leave any tail as padding
    modality[seg == 0] = PAD
    return {"tokens": tokens, "modality": modality, "text_target": tt, "image_target": it,
            "segment_ids": seg, "positions": pos}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_code_dataset(*a, **kw):
    """tests/datasets.py under its own name: importing it as ``datasets`` would hide HF ``datasets``."""
    spec = importlib.util.spec_from_file_location("uvjax_test_code_datasets", os.path.join(REPO, "tests", "datasets.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_code_dataset(*a, **kw)


def tiny_vq_run(root: str) -> str:
    """The smoke LM trained 2 steps on code records, with a random-init VQ (32 px, 4x4 = 16 codes of 64) in
    ``<run>/vq``: enough for ``run.generate`` to draw (badly) and decode pictures."""
    import jax

    from configs.vq_tokenizer import get_config as vq_config
    from configs.vqvq import get_config
    from uvjax.models import vq
    from uvjax.train import run
    from uvjax.training import vq_train
    from uvjax.weights.llamagen_vq import save_vq
    vc = vq_config("smoke")
    with vc.unlocked():
        vc.model.ch_mult = (1, 2, 2, 2)
    vcfg = vq_train.vq_config_from(vc)
    os.makedirs(os.path.join(root, "run", "vq"))
    save_vq(jax.device_get(vq.init_params(vcfg, jax.random.PRNGKey(0), 32)), vcfg,
            os.path.join(root, "run", "vq", vq_train.PARAMS_FILE))
    ds = _make_code_dataset(os.path.join(root, "data"), num_images=24, image_tokens=16, num_codes=64)
    cfg = get_config("smoke")
    with cfg.unlocked():
        cfg.stages.build = False  # stages.data.image_size (32) stays: the run's image size
        cfg.data.tokenizer = ds["tokenizer"]
        cfg.data.streams.understanding.paths = (ds["paths"]["understanding"],)
        cfg.data.streams.generation.paths = (ds["paths"]["generation"],)
        cfg.train.steps, cfg.train.progress, cfg.train.async_checkpoint = 2, False, False
    run(cfg, os.path.join(root, "run"))
    return os.path.join(root, "run")
