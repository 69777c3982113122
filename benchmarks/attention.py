"""One layer's causal self-attention, forward + backward: uvjax's hand-written backward vs autodiff.

    python benchmarks/attention.py                       # M's shapes: batch 4, T 1024, 8 heads, D 64
    python benchmarks/attention.py --config=S --reps=9

Both sides compute the same forward (``uvjax.models.llama._blocked_forward``: query blocks of
``ATTN_BLOCK``, keys [0, end) per block, fp32 softmax); "autodiff" differentiates it with JAX, "custom" is
``_blocked_attention`` (the training path for fp32 models: flash-style recompute, dK/dV formed transposed).
The two are alternated in one process (A B A B …) and the medians reported, with the largest gradient
difference between them and XLA's temp-buffer size of each compiled function. Writes JSON + a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import idle_check, machine, write_json  # noqa: E402
from benchmarks.train_step import shape  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="M", help="benchmarks/train_step.py config whose attention shapes to use")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from uvjax.models import llama

    s = shape(args.config)
    B, T, H, K, D = s["batch"], s["seq"], s["heads"], s["kv_heads"], s["head_dim"]
    block = llama.ATTN_BLOCK if T >= 2 * llama.ATTN_BLOCK and T % llama.ATTN_BLOCK == 0 else T
    rng = np.random.default_rng(0)
    q, d_out = (jnp.asarray(rng.standard_normal((B, K, H // K, T, D)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, K, T, D)), jnp.float32) for _ in range(2))
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2:] = 2  # two packed documents per row
    idx = np.arange(T)
    mask = jnp.asarray((idx[None, None, :] <= idx[None, :, None]) & (seg[:, :, None] == seg[:, None, :]))
    sides = {
        "autodiff": lambda q, k, v: llama._blocked_forward(q, k, v, mask, block)[0],
        "custom": lambda q, k, v: llama._blocked_attention(q, k, v, mask, block),
    }
    fns = {n: jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * d_out), argnums=(0, 1, 2)))
           for n, f in sides.items()}
    temp = {n: f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2 ** 20 for n, f in fns.items()}
    grads = {n: jax.block_until_ready(f(q, k, v)) for n, f in fns.items()}
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(grads["autodiff"], grads["custom"]))
    idle = idle_check()
    times = {n: [] for n in fns}
    for _ in range(args.reps):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    res = dict(config=args.config, shape=dict(batch=B, seq=T, heads=H, kv_heads=K, head_dim=D, block=block),
               median_ms=med, times_ms={n: [x * 1e3 for x in t] for n, t in times.items()},
               speedup=med["autodiff"] / med["custom"], max_grad_diff=diff, temp_mb=temp,
               idle=idle, machine=machine())
    write_json(args.out, res)
    md = args.out.rsplit(".", 1)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"# Attention forward + backward, config {args.config} (B {B}, T {T}, H {H}/{K}, D {D}, block {block})\n\n"
                "| side | median ms | XLA temp MB |\n| --- | ---: | ---: |\n")
        for n in fns:
            f.write(f"| {n} | {med[n]:.1f} | {temp[n]:.0f} |\n")
        f.write(f"\nautodiff / custom = ×{res['speedup']:.2f}; largest gradient difference {diff:.1e}; "
                f"idle check {idle['cpu_busy_percent']:.1f}% busy.\n")
    print(open(md).read())
    return res


if __name__ == "__main__":
    from uvjax.runtime_env import reexec_with_malloc_hugetlb
    reexec_with_malloc_hugetlb()  # as `python -m uvjax.train` does (uvjax/runtime_env.py)
    main()
