"""One layer's causal self-attention, forward + backward: uvjax's hand-written backward vs autodiff.

    python benchmarks/attention.py                       # M's shapes: batch 4, T 1024, 8 heads, D 64
    python benchmarks/attention.py --config=S --reps=9

Both sides compute the same forward (``uvjax.models.llama._blocked_forward``: query blocks of
``ATTN_BLOCK``, keys [0, end) per block, fp32 softmax); "autodiff" differentiates it with JAX, "custom" is
``_blocked_attention`` (the training path for fp32 models: flash-style recompute, dK/dV formed transposed).
The two are alternated in one process (A B A B …) and the medians reported, with the largest gradient
difference between them and XLA's temp-buffer size of each compiled function. Writes JSON + a Markdown table.

``--torch`` (torch extra) adds torch's fused ``scaled_dot_product_attention`` forward + backward at the same
shapes, as HF's Llama runs it (``sdpa``, one thread per CPU), in a worker process that takes its turn in the same
alternation: "torch_causal" with ``is_causal=True`` (what the HF benchmark side runs: no packing) and
"torch_mask" with the same boolean packed-segment mask as uvjax's (like for like). Its gradients are checked
against uvjax's before timing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import idle_check, machine, machine_line, write_json  # noqa: E402
from benchmarks.train_step import shape  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="M", help="benchmarks/train_step.py config whose attention shapes to use")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    ap.add_argument("--torch", action="store_true", help="also time torch's fused sdpa (worker process)")
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
    torch_side = _TorchWorker([np.asarray(x) for x in (q, k, v, d_out)], seg) if args.torch else None
    if torch_side:
        diff_torch = torch_side.max_grad_diff([np.asarray(g) for g in grads["custom"]])
    idle = idle_check()
    times = {n: [] for n in list(fns) + (list(_TORCH_SIDES) if torch_side else [])}
    for _ in range(args.reps):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            times[n].append(time.perf_counter() - t0)
        if torch_side:
            for n in _TORCH_SIDES:
                times[n].append(torch_side.time(n))
    if torch_side:
        torch_side.close()
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    res = dict(config=args.config, shape=dict(batch=B, seq=T, heads=H, kv_heads=K, head_dim=D, block=block),
               median_ms=med, times_ms={n: [x * 1e3 for x in t] for n, t in times.items()},
               speedup=med["autodiff"] / med["custom"], max_grad_diff=diff, temp_mb=temp,
               idle=idle, machine=machine())
    if torch_side:
        res["torch_max_grad_diff"] = diff_torch
        res["torch_over_custom"] = {n: med[n] / med["custom"] for n in _TORCH_SIDES}
    write_json(args.out, res)
    md = args.out.rsplit(".", 1)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"# Attention forward + backward, config {args.config} (B {B}, T {T}, H {H}/{K}, D {D}, block {block})\n\n"
                f"{machine_line(res['machine'])}\n\n"
                "| side | median ms | XLA temp MB |\n| --- | ---: | ---: |\n")
        for n in times:
            f.write(f"| {n} | {med[n]:.1f} | {f'{temp[n]:.0f}' if n in temp else '–'} |\n")
        f.write(f"\nautodiff / custom = ×{res['speedup']:.2f}; largest gradient difference {diff:.1e}; "
                f"idle check {idle['cpu_busy_percent']:.1f}% busy.\n")
        if torch_side:
            f.write("torch / custom: " + ", ".join(f"{n} ×{r:.2f}" for n, r in res["torch_over_custom"].items())
                    + f"; largest gradient difference torch_mask vs custom {diff_torch:.1e}.\n")
    print(open(md).read())
    return res


_TORCH_SIDES = ("torch_causal", "torch_mask")


class _TorchWorker:
    """torch's sdpa forward + backward in a process of its own (its thread pool and XLA's would otherwise
    share the cores in one process); one line of JSON per request on its stdin/stdout."""

    def __init__(self, arrays, seg):
        import subprocess
        import tempfile
        import numpy as np
        self.dir = tempfile.mkdtemp(prefix="attn_torch_")
        np.savez(os.path.join(self.dir, "in.npz"), q=arrays[0], k=arrays[1], v=arrays[2], d_out=arrays[3], seg=seg)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--torch_worker", self.dir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._ask({"op": "ready"})

    def _ask(self, req):
        import json
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch attention worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def time(self, side: str) -> float:
        return self._ask({"op": "time", "side": side})["seconds"]

    def max_grad_diff(self, grads) -> float:
        import numpy as np
        np.savez(os.path.join(self.dir, "ref.npz"), dq=grads[0], dk=grads[1], dv=grads[2])
        return self._ask({"op": "check"})["max_grad_diff"]

    def close(self):
        import shutil
        self.proc.stdin.close()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def torch_worker(dirname: str) -> None:
    """uvjax's head-major [B, K, G, T, D] q (pre-scaled by 1/√D) and [B, K, T, D] k/v become torch's
    [B, H, T, D] with k/v repeated per group and ``scale=1`` (q is already scaled), as HF's sdpa path runs."""
    import json
    import numpy as np
    proto = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol (as compare_torch's workers)
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # one thread per CPU, as XLA's pool
    a = np.load(os.path.join(dirname, "in.npz"))
    B, K, G, T, D = a["q"].shape
    q = torch.from_numpy(a["q"].reshape(B, K * G, T, D)).requires_grad_()
    k = torch.from_numpy(a["k"]).requires_grad_()
    v = torch.from_numpy(a["v"]).requires_grad_()
    d_out = torch.from_numpy(a["d_out"].reshape(B, K * G, T, D))
    seg = torch.from_numpy(a["seg"])
    idx = torch.arange(T)
    mask = ((idx[None, :, None] >= idx[None, None, :]) & (seg[:, :, None] == seg[:, None, :]))[:, None]

    def run(side):
        for t in (q, k, v):
            t.grad = None
        kr, vr = (x.repeat_interleave(G, dim=1) for x in (k, v))
        if side == "torch_causal":
            out = F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=1.0)
        else:
            out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=1.0)
        out.backward(d_out)

    for side in _TORCH_SIDES:  # warm-up
        run(side)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "time":
            t0 = time.perf_counter()
            run(req["side"])
            res = {"seconds": time.perf_counter() - t0}
        elif req["op"] == "check":
            run("torch_mask")
            ref = np.load(os.path.join(dirname, "ref.npz"))
            res = {"max_grad_diff": max(float(np.abs(t.grad.numpy().reshape(ref[n].shape) - ref[n]).max())
                                        for t, n in ((q, "dq"), (k, "dk"), (v, "dv")))}
        else:
            res = {"ok": True}
        proto.write(json.dumps(res) + "\n")
        proto.flush()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--torch_worker":
        torch_worker(sys.argv[2])
        sys.exit(0)
    from uvjax.runtime_env import reexec_with_malloc_hugetlb
    reexec_with_malloc_hugetlb()  # as `python -m uvjax.train` does (uvjax/runtime_env.py)
    main()
