"""KV-cache decoding speed of the unified model on config S (issue 6).

    python benchmarks/decode.py --out=benchmarks/results/decode.json

Config S as in benchmarks/train_step.py (hidden 256, 4 layers, 8 heads, MLP 688, vocab 32000 + 1024
codes, LoRA r=16, fp32), random weights (speed does not depend on them). Measured:

- text: new tokens/s at batch 1 and 8, prompt 64, exactly 256 new tokens (no stop id, images off),
  loop time only (prefill reported separately);
- image: latency of one image of 64 and of 256 codes at batch 1 (prompt 64 ending in ``<boi>``,
  N codes + ``<eoi>``), prefill + loop, without and with classifier-free guidance (2 streams).

Median of ``--reps`` timed runs after a compile/warm-up run; compile time reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_model():
    import flax.linen as nn
    import jax
    from benchmarks.train_step import build
    from uvjax.config import model_config
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.step import dummy_batch
    cfg, _, _ = build("S")
    model = UnifiedModel(model_config(cfg).validate())
    v = nn.unbox(model.init({"params": jax.random.key(0)}, dummy_batch(0), method=UnifiedModel.init_all))
    return model, v


def timed(gen, prompts, settings, reps, nulls=None, cfg_scale=0.0):
    import jax
    import jax.numpy as jnp
    batch, lens, mode0, R, B = gen.prepare(prompts, settings, nulls)
    prefill, loop = gen.compiled(R, B, batch["tokens"].shape[1], settings)
    args = {k: jnp.asarray(v) for k, v in batch.items()}
    knobs = gen.knobs(settings)

    def once():
        t0 = time.perf_counter()
        h, cache = prefill(gen.variables, args)
        jax.block_until_ready(h)
        t1 = time.perf_counter()
        res = loop(gen.variables, cache, h, jnp.asarray(lens), jnp.asarray(mode0), jax.random.key(0),
                   jnp.float32(cfg_scale), knobs)
        jax.block_until_ready(res)
        return t1 - t0, time.perf_counter() - t1, res

    t = time.perf_counter()
    _, _, res = once()
    compile_s = time.perf_counter() - t
    pre, lp = [], []
    for _ in range(reps):
        a, b, res = once()
        pre.append(a)
        lp.append(b)
    return {"compile_and_first_run_s": compile_s, "prefill_s": statistics.median(pre),
            "loop_s": statistics.median(lp), "loop_s_all": lp, "steps": int(res["t"]),
            "emitted": [int(x) for x in res["length"]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--image_codes", default="64,256")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    args = ap.parse_args()
    import numpy as np
    from benchmarks.common import idle_check, machine, machine_line, peak_rss_mb, write_json
    from uvjax.data.arrays import TEXT
    from uvjax.inference.decode import DecodeSettings, Generator, SpecialIds

    print(machine_line())
    idle = idle_check()
    model, v = build_model()
    ids = SpecialIds(boi=5, eoi=6, stop=())  # no stop: every row runs the full budget
    gen = Generator(model, v, ids, bucket=16)
    rng = np.random.default_rng(0)

    def prompt(open_image=False):
        t = rng.integers(10, 32000, args.prompt).astype(np.int32)
        if open_image:
            t[-1] = ids.boi
        return {"tokens": t, "modality": np.full(args.prompt, TEXT, np.int32)}

    text_rows = []
    for B in [int(x) for x in args.batches.split(",")]:
        s = DecodeSettings(max_new_tokens=args.new_tokens, image_tokens=0)
        r = timed(gen, [prompt() for _ in range(B)], s, args.reps)
        assert r["steps"] == args.new_tokens and min(r["emitted"]) == args.new_tokens
        r.update(batch=B, prompt=args.prompt, new_tokens=args.new_tokens,
                 new_tokens_per_s=B * args.new_tokens / r["loop_s"],
                 ms_per_step=1e3 * r["loop_s"] / args.new_tokens)
        text_rows.append(r)
        print(f"text  batch {B}: {r['new_tokens_per_s']:8.0f} new tok/s | {r['ms_per_step']:.2f} ms/step | "
              f"prefill {1e3 * r['prefill_s']:.1f} ms | compile+first {r['compile_and_first_run_s']:.1f} s")
    image_rows = []
    for n in [int(x) for x in args.image_codes.split(",")]:
        for guided in (False, True):
            s = DecodeSettings(max_new_tokens=n + 1, image_tokens=n, image_temperature=1.0)
            p = [prompt(open_image=True)]
            nulls = [prompt(open_image=True)] if guided else None
            r = timed(gen, p, s, args.reps, nulls, 1.5 if guided else 0.0)
            assert r["emitted"] == [n + 1]
            r.update(codes=n, cfg=guided, latency_s=r["prefill_s"] + r["loop_s"])
            image_rows.append(r)
            print(f"image {n:4d} codes{' +CFG' if guided else '     '}: {1e3 * r['latency_s']:8.1f} ms "
                  f"({1e3 * r['loop_s'] / (n + 1):.2f} ms/code) | compile+first {r['compile_and_first_run_s']:.1f} s")
    write_json(args.out, {"machine": machine(), "idle": idle, "config": "S (benchmarks/train_step.py)",
                          "dtype": "float32", "text": text_rows, "image": image_rows,
                          "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    from uvjax.runtime_env import reexec_with_malloc_hugetlb
    reexec_with_malloc_hugetlb()  # as `python -m uvjax.train` does (uvjax/runtime_env.py)
    main()
