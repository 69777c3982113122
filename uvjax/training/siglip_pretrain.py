"""Offline SigLIP pretraining of the small image tower on Smart Watch image–caption pairs.

Why: the SigLIP variants need an understanding/generation feature tower, and the embedded default must run
with no downloads, so uvjax pretrains a small one (``configs/siglip_pretrain.py``) the way SigLIP was
trained: two towers and the pairwise **sigmoid loss** (Zhai et al. 2023),

    loss = −(1/B) Σ_ij log σ(z_ij · (t·<img_i, txt_j> + b)),   z_ij = +1 if i = j else −1,

with learnable log-temperature (init log 10) and bias (init −10), as in big_vision. Only the image tower
is kept afterwards; the LM reads its layer −2 patch features (``ViT.features``).

- Image tower: ``uvjax.models.siglip.ViT`` (preset ``siglip_small``); embedding = mean over the final
  (post-LN) tokens, then a linear map (big_vision's ``pool_type='gap'``; the MAP head of SigLIP-B/16 is
  7M params of machinery a tiny tower does not need and the LM never reads).
- Text tower (ours, small): UTF-8 bytes (+1; 0 = padding) -> byte embedding + learned positions -> pre-LN
  blocks (the same ``Block`` as the image tower) -> final LN -> masked mean -> linear map. Bytes rather
  than the uvjax BPE so the tower does not depend on the tokenizer stage (and its cache key).
- Captions: each step draws, per image, either the dataset's own caption (random attribute fragments,
  ``smartwatch.records_for_image``) or a caption naming every attribute (``full_caption_prob``), so the
  tower is pushed to encode all of weather, time, battery and both corners.
- Evaluation: image→text and text→image retrieval (top-1, top-5) among ``num_eval`` held-out test-split
  pairs (indices from 10**9, never seen in training), with their dataset captions (``eval``: partial,
  colour never named, so many are near-duplicates) and with full captions (``eval_full_captions``);
  chance = 1/num_eval.

Outputs in the work dir: ``siglip.safetensors`` (the image tower, ViTConfig in the metadata, read by
``uvjax.weights.hf_siglip.load_vit``), ``siglip_two_tower.safetensors`` (both towers + t, b),
``siglip_metrics.json``, ``siglip_config.json``.

CLI: ``python -m uvjax.training.siglip_pretrain --config=configs/siglip_pretrain.py:tiny --workdir=runs/siglip``
"""
from __future__ import annotations

import colorsys
import json
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from tqdm.auto import tqdm

from uvjax import interrupt
from uvjax.data import smartwatch as sw
from uvjax.models.siglip import Block, ViT, ViTConfig, num_params, preprocess, vit_config
from uvjax.weights.hf_siglip import SIGLIP_CONFIG_FILE, SIGLIP_FILE, save_vit
from uvjax.weights.llamagen_vq import save_params

PARAMS_FILE = SIGLIP_FILE
TWO_TOWER_FILE = "siglip_two_tower.safetensors"
METRICS_FILE = "siglip_metrics.json"
CONFIG_FILE = SIGLIP_CONFIG_FILE


# ------------------------------------------------------------------------------------------------ model
class TextTower(nn.Module):
    width: int
    depth: int
    heads: int
    mlp: int
    max_len: int
    embed_dim: int

    @nn.compact
    def __call__(self, ids):
        mask = ids > 0
        x = nn.Embed(257, self.width, embedding_init=nn.initializers.normal(0.02), name="embed")(ids)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, self.max_len, self.width))
        for i in range(self.depth):
            x = Block(self.width, self.heads, self.mlp, "gelu_tanh", 1e-6, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(1e-6, name="final_norm")(x)
        m = mask[..., None].astype(x.dtype)
        pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return nn.Dense(self.embed_dim, name="proj")(pooled)


class TwoTower(nn.Module):
    vit: ViTConfig
    text: dict
    embed_dim: int

    def setup(self):
        self.img = ViT(self.vit)
        self.img_proj = nn.Dense(self.embed_dim)
        self.txt = TextTower(**self.text, embed_dim=self.embed_dim)
        self.t = self.param("t", nn.initializers.constant(math.log(10.0)), ())
        self.b = self.param("b", nn.initializers.constant(-10.0), ())

    def embed_images(self, images):
        return _l2n(self.img_proj(self.img(images)["last"].mean(1)))

    def embed_texts(self, ids):
        return _l2n(self.txt(ids))

    def __call__(self, images, ids):
        zi, zt = self.embed_images(images), self.embed_texts(ids)
        return zi @ zt.T * jnp.exp(self.t) + self.b


def _l2n(x):
    return x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def sigmoid_loss(logits):
    """SigLIP pairwise loss: positives on the diagonal, every other pair a negative; mean over images."""
    n = logits.shape[0]
    z = 2.0 * jnp.eye(n) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n


# ------------------------------------------------------------------------------------------------- data
def encode_bytes(texts, max_len: int) -> np.ndarray:
    out = np.zeros((len(texts), max_len), np.int32)
    for i, t in enumerate(texts):
        b = np.frombuffer(t.encode("utf-8")[:max_len], np.uint8).astype(np.int32) + 1
        out[i, :len(b)] = b
    return out


def colour_name(rgb) -> str:
    """Coarse name of a face colour (lightness + hue sector): the captions' easiest fact to ground."""
    r, g, b = (float(x) / 255.0 for x in rgb)
    h, l, s = colorsys.rgb_to_hls(r, g, b)
    if s < 0.2 or l < 0.12 or l > 0.9:
        return "black" if l < 0.25 else "white" if l > 0.75 else "gray"
    hues = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
    name = hues[int(((h * 360 + 15) % 360) // 45)]
    return ("dark " if l < 0.35 else "light " if l > 0.65 else "") + name


def full_caption(attrs: dict) -> str:
    """Every attribute, fixed order, plus the face colour (which the dataset's captions never name, yet it
    dominates the pixels: without it in some captions a small tower sits at the trivial solution, since
    the image embedding's largest variation is unexplained by any text)."""
    a = lambda k: sw.answer(k, attrs)
    return (f"{colour_name(attrs['face_color'])} face, {a('weather')} weather, time {a('time')}, battery "
            f"{a('battery')}, weather icon {a('weather_pos')}, battery {a('battery_pos')}.")


def pairs(num: int, image_size: int, seed: int, start_index: int = 0, name: str = "train"):
    """(uint8 images [N,S,S,3], dataset captions [N], full captions [N]) of Smart Watch images."""
    spec = sw.SmartWatchSpec(name, int(seed), int(num), int(start_index), int(image_size), tasks=("caption",))
    imgs, caps, fulls = [], [], []
    for i in range(int(num)):
        attrs, recs = sw.records_for_image(spec.start_index + i, spec)
        rec = recs[0]
        imgs.append(rec.images()[0].pixels)
        caps.append(next(s.text for s in rec.segments if s.role == "assistant"))
        fulls.append(full_caption(attrs))
    return np.stack(imgs), caps, fulls


# ---------------------------------------------------------------------------------------------- training
def _model(cfg) -> TwoTower:
    t = cfg.text
    text = dict(width=int(t.width), depth=int(t.depth), heads=int(t.heads), mlp=int(t.mlp), max_len=int(t.max_len))
    return TwoTower(vit_config(cfg.vit), text, int(cfg.embed_dim))


def retrieval(model: TwoTower, params, images: np.ndarray, texts: list[str], max_len: int, batch: int = 128) -> dict:
    """Top-1/top-5 image→text and text→image accuracy among the given pairs (row i matches text i)."""
    ei = jax.jit(lambda p, x: model.apply({"params": p}, x, method=TwoTower.embed_images))
    et = jax.jit(lambda p, x: model.apply({"params": p}, x, method=TwoTower.embed_texts))
    zi = np.concatenate([np.asarray(ei(params, preprocess(images[i:i + batch], model.vit)))
                         for i in range(0, len(images), batch)])
    ids = encode_bytes(texts, max_len)
    zt = np.concatenate([np.asarray(et(params, ids[i:i + batch])) for i in range(0, len(ids), batch)])
    sim = zi @ zt.T
    n = len(texts)
    truth = np.arange(n)

    def topk(s, k):
        return float(np.mean([t in np.argsort(-row)[:k] for row, t in zip(s, truth)]))
    return {"n": n, "chance_top1": 1.0 / n, "i2t_top1": topk(sim, 1), "i2t_top5": topk(sim, 5),
            "t2i_top1": topk(sim.T, 1), "t2i_top5": topk(sim.T, 5)}


def train_siglip(cfg, workdir: str | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Pretrains the two towers; returns (image-tower params, metrics) and writes the work dir files."""
    tc, dc = cfg.train, cfg.data
    model = _model(cfg)
    vcfg = model.vit
    t_data = time.time()
    train_u8, train_caps, train_full = pairs(dc.num_train, dc.image_size, dc.seed)
    eval_u8, eval_caps, eval_full = pairs(dc.num_eval, dc.image_size, dc.seed, 10 ** 9, "test")
    data_s = time.time() - t_data
    max_len = int(cfg.text.max_len)
    rng = np.random.default_rng(int(tc.seed))
    params = model.init(jax.random.PRNGKey(int(tc.seed)), jnp.zeros((2, vcfg.image_size, vcfg.image_size, 3)),
                        jnp.ones((2, max_len), jnp.int32))["params"]
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, max(1, tc.warmup_steps), max(tc.steps, tc.warmup_steps + 1),
                                               tc.lr * tc.final_lr_frac)
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip), optax.adamw(sched, weight_decay=tc.weight_decay))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, ids):
        def loss_fn(p):
            return sigmoid_loss(model.apply({"params": p}, images, ids))
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    bar = None
    if progress:
        bar = tqdm(total=int(tc.steps), desc="siglip", unit="step", dynamic_ncols=True)
    history, ema = [], None
    t0, cpu0 = time.time(), time.process_time()
    compile_s = None
    n = train_u8.shape[0]
    done = 0
    for s in range(1, int(tc.steps) + 1):
        interrupt.check()  # SIGTERM during the SigLIP stage (uvjax.interrupt): stop between steps
        idx = rng.choice(n, size=min(int(tc.batch_size), n), replace=False)
        use_full = rng.random(len(idx)) < float(dc.full_caption_prob)
        texts = [train_full[i] if f else train_caps[i] for i, f in zip(idx, use_full)]
        params, opt_state, loss = step(params, opt_state, jnp.asarray(preprocess(train_u8[idx], vcfg)),
                                       jnp.asarray(encode_bytes(texts, max_len)))
        if compile_s is None:
            jax.block_until_ready(loss)
            compile_s = time.time() - t0
        done = s
        if s % int(tc.log_every) == 0 or s == int(tc.steps):
            lv = float(loss)
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            history.append({"step": s, "loss": lv, "time_s": round(time.time() - t0, 2)})
            if bar is not None:
                bar.set_postfix(loss=f"{ema:.3f}")
        if bar is not None:
            bar.update(1)
        if tc.time_budget_s and time.time() - t0 > tc.time_budget_s:
            history.append({"step": s, "stopped": "time_budget_s"})
            break
    jax.block_until_ready(params)
    train_s, cpu_s = time.time() - t0, time.process_time() - cpu0
    if bar is not None:
        bar.close()
    t1 = time.time()
    ev = retrieval(model, params, eval_u8, eval_caps, max_len, int(tc.eval_batch))
    ev_full = retrieval(model, params, eval_u8, eval_full, max_len, int(tc.eval_batch))
    metrics = {"eval": ev, "eval_full_captions": ev_full, "steps": done, "train_time_s": round(train_s, 2),
               "train_cpu_s": round(cpu_s, 2),
               "compile_and_first_step_s": round(compile_s or 0.0, 2), "data_time_s": round(data_s, 2),
               "eval_time_s": round(time.time() - t1, 2), "final_loss": history[-1].get("loss") if history else None,
               "image_tower_params": num_params(params["img"]), "total_params": num_params(params),
               "feature_tokens": vcfg.feature_tokens, "feature_dim": vcfg.width, "history": history}
    params = jax.device_get(params)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        save_vit(params["img"], vcfg, os.path.join(workdir, PARAMS_FILE), {"trained_by": "uvjax.siglip_pretrain"})
        save_params(params, os.path.join(workdir, TWO_TOWER_FILE), {"format": "uvjax-siglip-two-tower"})
        with open(os.path.join(workdir, METRICS_FILE), "w") as f:
            json.dump(metrics, f, indent=1)
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(cfg.to_json_best_effort(indent=1) if hasattr(cfg, "to_json_best_effort") else json.dumps(cfg))
    return params["img"], metrics


def main(argv) -> None:
    del argv
    FLAGS = flags.FLAGS
    _, metrics = train_siglip(FLAGS.config, FLAGS.workdir)
    print(json.dumps({"eval": metrics["eval"], "eval_full_captions": metrics["eval_full_captions"],
                      "train_time_s": metrics["train_time_s"], "steps": metrics["steps"]}))
    print(f"wrote {FLAGS.workdir}/{{{PARAMS_FILE},{TWO_TOWER_FILE},{METRICS_FILE},{CONFIG_FILE}}}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/siglip_pretrain.py", "SigLIP pretraining config")
    flags.DEFINE_string("workdir", "runs/siglip", "output directory")
    app.run(main)
