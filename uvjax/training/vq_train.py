"""Train a small VQ tokenizer offline (the embedded default's image tokenizer).

Losses: pixel L1 + L2, an optional edge term (L1 between horizontal/vertical finite differences, which
weights thin high-contrast structures such as watch hands more than their pixel area would), and the VQ
codebook + commitment losses (beta from the model config). Codebook usage is kept up by dead-code
restarts: every ``restart_every`` steps, codes that no training latent chose during the window are
re-seeded with recent encoder outputs (the standard fix for codebook collapse; without it a small
codebook trained for a few hundred steps uses a fraction of its rows).

``train_vq(images, cfg, workdir) -> (params, metrics)``; the workdir receives ``vq.safetensors``
(params + VQConfig metadata, see ``uvjax.weights.llamagen_vq.load_vq``), ``vq_metrics.json``,
``vq_config.json`` and ``vq_recon.png`` (held-out originals over reconstructions).

CLI: ``python -m uvjax.training.vq_train --config=configs/vq_tokenizer.py:tiny --workdir=runs/vq``
(optionally ``--images_dir=DIR`` of PNGs; otherwise the Smart Watch renderer).
"""
from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from PIL import Image
from tqdm.auto import tqdm

from uvjax import interrupt
from uvjax.data import smartwatch
from uvjax.models.vq import VQConfig, VQModel, from_uint8, image_grid, init_params, save_png, to_uint8
from uvjax.weights.llamagen_vq import VQ_CONFIG_FILE, VQ_FILE, load_vq, save_vq

PARAMS_FILE = VQ_FILE
METRICS_FILE = "vq_metrics.json"
CONFIG_FILE = VQ_CONFIG_FILE
RECON_FILE = "vq_recon.png"


def vq_config_from(cfg) -> VQConfig:
    """``cfg.model`` (ConfigDict or dict) -> validated VQConfig."""
    m = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    return VQConfig.from_dict(m)


# ---------------------------------------------------------------------------------------------- losses
def _edges(x):
    return x[:, 1:, :, :] - x[:, :-1, :, :], x[:, :, 1:, :] - x[:, :, :-1, :]


def recon_losses(recon, target):
    """Pixel losses on [-1,1] images: l1, l2 (mse) and edge (L1 of finite-difference mismatch)."""
    d = recon - target
    (ry, rx), (ty, tx) = _edges(recon), _edges(target)
    edge = 0.5 * (jnp.mean(jnp.abs(ry - ty)) + jnp.mean(jnp.abs(rx - tx)))
    return {"l1": jnp.mean(jnp.abs(d)), "l2": jnp.mean(d ** 2), "edge": edge}


def make_loss_fn(model: VQModel, tc):
    def loss_fn(params, images):
        recon, aux = model.apply({"params": params}, images)
        rl = recon_losses(recon, images)
        total = (tc.l1_weight * rl["l1"] + tc.l2_weight * rl["l2"] + tc.edge_weight * rl["edge"]
                 + tc.vq_weight * aux["vq"])
        metrics = dict(rl, loss=total, vq=aux["vq"], codebook=aux["codebook"], commit=aux["commit"],
                       psnr=10.0 * jnp.log10(4.0 / jnp.maximum(rl["l2"], 1e-10)))
        return total, (metrics, aux["indices"], aux["z"])

    return loss_fn


def make_optimizer(tc) -> optax.GradientTransformation:
    """Adam with linear warm-up then cosine decay to ``final_lr_frac`` of the peak."""
    sched = optax.warmup_cosine_decay_schedule(
        0.0, tc.lr, max(1, tc.warmup_steps), max(tc.steps, tc.warmup_steps + 1), tc.lr * tc.final_lr_frac)
    tx = optax.adam(sched, b1=tc.b1, b2=tc.b2)
    if tc.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip), tx)
    return tx


def make_train_step(model: VQModel, tx, tc):
    loss_fn = make_loss_fn(model, tc)

    @jax.jit
    def step(params, opt_state, images):
        (_, (metrics, idx, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics, idx, z

    return step


# ------------------------------------------------------------------------------------ dead-code restart
def restart_dead_codes(params, counts: np.ndarray, recent_z: np.ndarray, rng: np.random.Generator,
                       noise: float = 0.0, min_count: int = 1):
    """Re-seed codebook rows used fewer than ``min_count`` times with random recent latents.

    Returns (new params, number of codes restarted). ``recent_z`` is [M, D] in the space the lookup uses
    (unit vectors for l2 codebooks). Params are copied, not mutated.
    """
    dead = np.flatnonzero(counts < min_count)
    if dead.size == 0 or recent_z.shape[0] == 0:
        return params, 0
    emb = np.array(params["quantize"]["embedding"], np.float32)
    pick = rng.choice(recent_z.shape[0], size=dead.size, replace=recent_z.shape[0] < dead.size)
    new = recent_z[pick].astype(np.float32)
    if noise > 0:
        new = new + noise * rng.standard_normal(new.shape).astype(np.float32) * np.std(recent_z, axis=0)
    emb[dead] = new
    params = dict(params)
    params["quantize"] = dict(params["quantize"], embedding=jnp.asarray(emb))
    return params, int(dead.size)


def random_crops(batch: np.ndarray, size: int, align: int, rng: np.random.Generator) -> np.ndarray:
    """Random square crops (offsets on the code grid). The model is convolutional, so training on crops
    and encoding full images works, and a 64 px crop costs a quarter of a 128 px image: on 2 CPU cores
    that buys ~4x more optimiser steps, which matters more than context for local reconstruction."""
    h, w = batch.shape[1:3]
    if not size or size >= min(h, w):
        return batch
    if size % align:
        raise ValueError(f"crop_size {size} must be a multiple of the downsample factor {align}")
    ys = rng.integers(0, (h - size) // align + 1, batch.shape[0]) * align
    xs = rng.integers(0, (w - size) // align + 1, batch.shape[0]) * align
    return np.stack([im[y:y + size, x:x + size] for im, y, x in zip(batch, ys, xs)])


# ------------------------------------------------------------------------------------------- evaluation
def make_eval_fn(model: VQModel):
    @jax.jit
    def fn(params, images):
        idx = model.apply({"params": params}, images, method=VQModel.encode)
        recon = model.apply({"params": params}, idx, method=VQModel.decode_indices)
        return idx, recon

    return fn


def evaluate(model: VQModel, params, images_u8: np.ndarray, batch_size: int = 64, eval_fn=None) -> dict:
    """Held-out metrics through the inference path (encode -> ids -> decode -> uint8).

    psnr: mean over images of 10 log10(255^2 / MSE) on uint8 pixels (what a user sees);
    usage: fraction of codebook rows chosen at least once; perplexity: exp(entropy) of code frequencies.
    """
    eval_fn = eval_fn or make_eval_fn(model)
    k = model.cfg.codebook_size
    counts = np.zeros(k, np.int64)
    psnrs = []
    n = images_u8.shape[0]
    for s in range(0, n, batch_size):
        batch = images_u8[s:s + batch_size]
        pad = batch_size - batch.shape[0]  # keep one compiled shape
        x = np.concatenate([batch, np.repeat(batch[-1:], pad, 0)]) if pad else batch
        idx, recon = eval_fn(params, jnp.asarray(from_uint8(x)))
        idx, recon = np.asarray(idx)[:batch.shape[0]], to_uint8(np.asarray(recon)[:batch.shape[0]])
        counts += np.bincount(idx.ravel(), minlength=k)
        mse = np.mean((recon.astype(np.float64) - batch.astype(np.float64)) ** 2, axis=(1, 2, 3))
        psnrs.append(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))
    p = counts / max(counts.sum(), 1)
    ent = -np.sum(p[p > 0] * np.log(p[p > 0]))
    return {"psnr": float(np.mean(np.concatenate(psnrs))), "usage": float(np.mean(counts > 0)),
            "codes_used": int(np.sum(counts > 0)), "perplexity": float(np.exp(ent)), "num_images": int(n)}


def recon_grid(model: VQModel, params, images_u8: np.ndarray, n: int = 8, eval_fn=None,
               batch_size: int | None = None) -> np.ndarray:
    """uint8 grid: originals (top row) over reconstructions (bottom row). Pads to ``batch_size`` so the
    evaluation function compiled by :func:`evaluate` is reused."""
    eval_fn = eval_fn or make_eval_fn(model)
    x = images_u8[:n]
    pad = max(0, (batch_size or 0) - x.shape[0])
    xp = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
    _, recon = eval_fn(params, jnp.asarray(from_uint8(xp)))
    return image_grid([x, to_uint8(np.asarray(recon)[:x.shape[0]])])


# ----------------------------------------------------------------------------------------------- train
def _machine_load() -> dict:
    try:
        la = os.getloadavg()
    except OSError:
        la = (float("nan"),) * 3
    return {"loadavg_1m": la[0], "loadavg_5m": la[1], "cpus": os.cpu_count()}


def train_vq(images: np.ndarray, cfg, workdir: str | None = None, progress: bool = True) -> tuple[Any, dict]:
    """Train ``VQModel(cfg.model)`` on uint8 images [N,H,W,3]; the last ``cfg.data.num_eval`` are held out.

    Returns (params, metrics). With ``workdir`` writes params (safetensors), metrics JSON, config JSON and
    a reconstruction grid PNG there.
    """
    tc = cfg.train
    vcfg = vq_config_from(cfg)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
    vcfg.grid(images.shape[1:3])  # fails early on sizes the downsample factor does not divide
    n_eval = int(cfg.data.num_eval)
    if images.shape[0] <= n_eval + tc.batch_size // 2:
        raise ValueError(f"{images.shape[0]} images is too few for {n_eval} held-out + batch {tc.batch_size}")
    train_u8, eval_u8 = images[:-n_eval] if n_eval else images, images[-n_eval:] if n_eval else images[:0]

    model = VQModel(vcfg)
    params = init_params(vcfg, jax.random.PRNGKey(tc.seed), images.shape[1])
    tx = make_optimizer(tc)
    opt_state = tx.init(params)
    step_fn = make_train_step(model, tx, tc)
    eval_fn = make_eval_fn(model)
    rng = np.random.default_rng(tc.seed)
    k = vcfg.codebook_size

    counts = np.zeros(k, np.int64)  # code choices since the last restart
    recent_z: list[np.ndarray] = []
    history: list[dict] = []
    restarts_total = 0
    restart_stop = int(tc.restart_until * tc.steps)
    order = rng.permutation(train_u8.shape[0])
    pos = 0
    load_before = _machine_load()
    t0, cpu0 = time.time(), time.process_time()
    compile_s = None

    bar = None
    if progress:

        bar = tqdm(total=tc.steps, desc="vq", unit="step", dynamic_ncols=True)
    ema = {}
    for step in range(1, tc.steps + 1):
        interrupt.check()  # SIGTERM during the VQ stage (uvjax.interrupt): stop between steps
        if pos + tc.batch_size > order.size:
            order, pos = rng.permutation(train_u8.shape[0]), 0
        batch = random_crops(train_u8[order[pos:pos + tc.batch_size]], tc.crop_size, vcfg.downsample, rng)
        pos += tc.batch_size
        params, opt_state, m, idx, z = step_fn(params, opt_state, jnp.asarray(from_uint8(batch)))
        if restarts_active := (tc.restart_every > 0 and step <= restart_stop):
            idx_np = np.asarray(idx)
            counts += np.bincount(idx_np.ravel(), minlength=k)
            z_np = np.asarray(z).reshape(-1, vcfg.code_dim)
            recent_z.append(z_np[rng.choice(z_np.shape[0], min(z_np.shape[0], tc.restart_pool), replace=False)])
            recent_z = recent_z[-tc.restart_window:]
        if compile_s is None:
            jax.block_until_ready(params)
            compile_s = time.time() - t0
        if restarts_active and step % tc.restart_every == 0:
            params, nr = restart_dead_codes(params, counts, np.concatenate(recent_z), rng, tc.restart_noise)
            restarts_total += nr
            history.append({"step": step, "restarted": nr, "train_usage_window": float(np.mean(counts > 0))})
            counts[:] = 0
        if step % tc.log_every == 0 or step == tc.steps:
            m = {key: float(v) for key, v in m.items()}
            ema = {key: (0.9 * ema.get(key, v) + 0.1 * v) for key, v in m.items()}
            history.append({"step": step, "time_s": round(time.time() - t0, 2), **m})
            if bar is not None:
                bar.set_postfix(loss=f"{ema['loss']:.4f}", psnr=f"{ema['psnr']:.1f}")
        if bar is not None:
            bar.update(1)
        if tc.time_budget_s and time.time() - t0 > tc.time_budget_s:
            history.append({"step": step, "stopped": "time_budget_s"})
            break
    jax.block_until_ready(params)
    train_s, train_cpu_s = time.time() - t0, time.process_time() - cpu0
    if bar is not None:
        bar.close()

    t1 = time.time()
    ev = evaluate(model, params, eval_u8, tc.eval_batch, eval_fn) if n_eval else {}
    eval_s = time.time() - t1
    metrics = {
        "eval": ev,
        "steps": step,
        "train_images": int(train_u8.shape[0]),
        "images_seen": int(step * tc.batch_size),
        "train_time_s": round(train_s, 2),
        # CPU seconds of this process (all threads): on a shared machine, cpu_s / cores estimates idle wall time.
        "train_cpu_s": round(train_cpu_s, 2),
        "compile_and_first_step_s": round(compile_s or 0.0, 2),
        "eval_time_s": round(eval_s, 2),
        "codes_restarted": restarts_total,
        "grid": list(vcfg.grid(images.shape[1:3])),
        "num_params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params))),
        "load_before": load_before,
        "load_after": _machine_load(),
        "final_train": history[-1] if history else {},
        "history": history,
    }
    params = jax.device_get(params)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        save_vq(params, vcfg, os.path.join(workdir, PARAMS_FILE))
        with open(os.path.join(workdir, METRICS_FILE), "w") as f:
            json.dump(metrics, f, indent=1)
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(cfg.to_json_best_effort(indent=1) if hasattr(cfg, "to_json_best_effort") else json.dumps(cfg))
        if n_eval:
            grid = recon_grid(model, params, eval_u8, 8, eval_fn, tc.eval_batch)
            save_png(grid, os.path.join(workdir, RECON_FILE))
    return params, metrics


def load_trained_vq(workdir: str) -> tuple[VQConfig, Any]:
    """(VQConfig, params) written by :func:`train_vq` into ``workdir``."""
    return load_vq(os.path.join(workdir, PARAMS_FILE))


# ------------------------------------------------------------------------------------------------ data
def load_png_folder(folder: str, size: int | None = None, limit: int | None = None) -> np.ndarray:
    """Sorted ``*.png`` in a folder -> uint8 [N,H,W,3] (RGBA blended onto white, optional square resize)."""

    paths = sorted(glob.glob(os.path.join(folder, "*.png")))[:limit]
    if not paths:
        raise FileNotFoundError(f"no *.png in {folder}")
    out = []
    for p in paths:
        im = Image.open(p)
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        if size and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(np.asarray(im, np.uint8))
    return np.stack(out)


def smartwatch_images(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` Smart Watch images from ``uvjax.data.smartwatch`` (public ``sample_attributes`` + ``render``),
    attributes drawn from a generator seeded by ``seed`` (the VQ needs the distribution, not the split)."""

    rng = np.random.default_rng([int(seed), 0x5A9])
    return np.stack([smartwatch.render(smartwatch.sample_attributes(rng), size) for _ in range(n)])


def images_for(cfg, images_dir: str | None = None) -> np.ndarray:
    d = cfg.data
    n = d.num_train + d.num_eval
    if images_dir:
        return load_png_folder(images_dir, d.image_size, n)
    return smartwatch_images(n, d.image_size, d.seed)


def main(argv: Iterable[str]) -> None:
    del argv

    FLAGS = flags.FLAGS
    cfg = FLAGS.config
    images = images_for(cfg, FLAGS.images_dir)
    print(f"training VQ on {images.shape[0]} images {images.shape[1:]}, grid {vq_config_from(cfg).grid(images.shape[1:3])}")
    _, metrics = train_vq(images, cfg, FLAGS.workdir)
    ev = metrics["eval"]
    print(json.dumps({k: ev.get(k) for k in ("psnr", "usage", "codes_used", "perplexity")}
                     | {"train_time_s": metrics["train_time_s"], "steps": metrics["steps"]}))
    print(f"wrote {FLAGS.workdir}/{{{PARAMS_FILE},{METRICS_FILE},{CONFIG_FILE},{RECON_FILE}}}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/vq_tokenizer.py", "VQ tokenizer config (preset after ':')")
    flags.DEFINE_string("workdir", "runs/vq", "output directory")
    flags.DEFINE_string("images_dir", None, "folder of PNGs instead of the Smart Watch renderer")
    app.run(main)
