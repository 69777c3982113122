"""VQ tokenizer throughput: encode / decode images per second and train steps per second, JSON out.

Pre-tokenisation runs the frozen VQ once over the data set, so encode images/s sizes that stage; the train
step rate sizes ``configs/vq_tokenizer.py`` schedules. The machine is shared: the 1-minute load average
before and after is recorded, and each number is the median of ``--repeats`` timed calls.

``python benchmarks/vq.py --preset tiny --batch 16 [--llamagen]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from uvjax.models.vq import VQModel, init_params, llamagen_vq16  # noqa: E402
from uvjax.training import vq_train  # noqa: E402


def _time(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench_model(vcfg, size, batch, repeats):
    model = VQModel(vcfg)
    params = init_params(vcfg, jax.random.PRNGKey(0), size)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQModel.encode))
    dec = jax.jit(lambda p, i: model.apply({"params": p}, i, method=VQModel.decode_indices))
    ids = enc(params, x)
    te = _time(lambda: enc(params, x), repeats)
    td = _time(lambda: dec(params, ids), repeats)
    return {"image_size": size, "batch": batch, "codes_per_image": int(ids.shape[1]),
            "encode_images_per_s": batch / te, "decode_images_per_s": batch / td}


def bench_train(cfg, batch, repeats):
    tc = cfg.train
    vcfg = vq_train.vq_config_from(cfg)
    model = VQModel(vcfg)
    params = init_params(vcfg, jax.random.PRNGKey(0), cfg.data.image_size)
    tx = vq_train.make_optimizer(tc)
    state = [params, tx.init(params)]
    step = vq_train.make_train_step(model, tx, tc)
    size = tc.crop_size or cfg.data.image_size
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))

    def run():
        state[0], state[1], m, _, _ = step(state[0], state[1], x)
        return m["loss"]

    t = _time(run, repeats)
    return {"train_input_size": size, "batch": batch, "train_steps_per_s": 1.0 / t, "train_images_per_s": batch / t}


def main():
    import vq_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--llamagen", action="store_true", help="also time full-size VQ-16 at 256 px (batch 1)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cfg = vq_tokenizer.get_config(a.preset)
    from benchmarks.common import machine, machine_line
    res = {"preset": a.preset, "backend": jax.default_backend(), "machine": machine(), "load_before": os.getloadavg()[0]}
    print(machine_line(res["machine"]))
    res["tiny_model"] = bench_model(vq_train.vq_config_from(cfg), cfg.data.image_size, a.batch, a.repeats)
    res["tiny_train"] = bench_train(cfg, cfg.train.batch_size, a.repeats)
    if a.llamagen:
        res["llamagen_vq16"] = bench_model(llamagen_vq16(), 256, 1, max(2, a.repeats // 2))
    res["load_after"] = os.getloadavg()[0]
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
