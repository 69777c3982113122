"""Train-step throughput of the unified model on configs S and M (issue: foundation benchmark).

    python benchmarks/train_step.py --configs=S,M --out=benchmarks/results/train_step.json
    python benchmarks/train_step.py --configs=tiny --scan-unroll=0   # the first run's model, as it trains

Each sequence: 25% prompt text (no targets), 37.5% assistant text targets, 37.5% image targets
(generation). LoRA on all 7 projections (``tiny``: every weight trains, no LoRA), fp32, logits only at
target positions. Reports tokens/s
(median of timed steps after warm-up), compile time, analytic useful FLOPs/token
(uvjax/training/flops.py), achieved GFLOP/s vs a JAX fp32 matmul peak measured in the same run, peak RSS.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    # the first run's model (configs/vqvq.py:tiny): trained from scratch, every weight trainable (rank 0: no LoRA)
    "tiny": dict(hidden=256, layers=3, heads=8, intermediate=688, vocab=1024, codes=512, seq=128, batch=32, rank=0),
    "S": dict(hidden=256, layers=4, heads=8, intermediate=688, vocab=32000, codes=1024, seq=512, batch=8, rank=16),
    "M": dict(hidden=512, layers=8, heads=8, intermediate=1376, vocab=32000, codes=16384, seq=1024, batch=4, rank=64),
    # GPU configs (issue #9 item 3): the smollm2 preset's model (SmolLM2-135M shapes, LoRA r=16, the tiny
    # VQ's 512 codes) at a GPU batch, and a ~1B Llama (Llama-3.2-1B shapes, Vicuna's vocab, VQ-16's codes).
    "smollm2": dict(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49154,
                    codes=512, seq=1024, batch=16, rank=16, tie=True),
    "1B": dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=32004,
               codes=16384, seq=2048, batch=8, rank=64),
}


def shape(name: str, batch: int = 0, seq: int = 0) -> dict:
    s = dict(CONFIGS[name])
    s.setdefault("kv_heads", s["heads"])
    s.setdefault("head_dim", s["hidden"] // s["heads"])
    s.setdefault("tie", False)
    s["batch"], s["seq"] = batch or s["batch"], seq or s["seq"]
    return s


def build(name: str, dtype: str = "float32", remat: str = "none", attention: str = "xla", batch: int = 0,
          seq: int = 0, scan_unroll: int = 1):
    import numpy as np
    from uvjax.config import base_config, lora_preset
    from uvjax.data.arrays import IMAGE_OUT, TEXT
    s = shape(name, batch, seq)
    c = base_config()
    c.name = f"bench-{name}"
    m = c.model
    m.vocab_size, m.hidden, m.layers, m.heads, m.kv_heads = s["vocab"], s["hidden"], s["layers"], s["heads"], s["kv_heads"]
    m.head_dim, m.tie_embeddings, m.attention = s["head_dim"], s["tie"], attention
    m.intermediate, m.image.num_codes, m.dtype, m.remat = s["intermediate"], s["codes"], dtype, remat
    m.scan_unroll = scan_unroll
    if s["rank"]:
        lora_preset(c, s["rank"], 2.0 * s["rank"])
    T, B = s["seq"], s["batch"]
    c.train.batch_size, c.train.seq_len, c.train.steps = B, T, 1000
    n_prompt, n_text = T // 4, (3 * T) // 8
    n_img = T - n_prompt - n_text
    frac = lambda n: (n + 1) / (T - 1)  # capacity just above the exact target count
    c.loss.text_target_capacity, c.loss.image_target_capacity = frac(n_text), frac(n_img)
    rng = np.random.default_rng(0)
    modality = np.array([TEXT] * (n_prompt + n_text) + [IMAGE_OUT] * n_img, np.int32)
    tokens = np.concatenate([rng.integers(0, s["vocab"], n_prompt + n_text), rng.integers(0, s["codes"], n_img)])
    tt = np.zeros(T, np.int32)
    tt[n_prompt:n_prompt + n_text] = 1
    it = (modality == IMAGE_OUT).astype(np.int32)
    row = dict(tokens=tokens.astype(np.int32), modality=modality, text_target=tt, image_target=it,
               segment_ids=np.ones(T, np.int32), positions=np.arange(T, dtype=np.int32))
    batch = {k: np.stack([v] * B) for k, v in row.items()}
    return c, batch, dict(n_text=n_text, n_img=n_img, shape=s)


def setup(name: str, dtype: str = "float32", mesh_shape=(1, -1, 1), remat: str = "none", attention: str = "xla",
          batch: int = 0, seq: int = 0, scan_unroll: int = 1):
    """The config's jitted train step, its initial state and the global batch (also used by step_profile.py)."""
    from uvjax.config import model_config
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.sharding import global_batch_from_local, make_mesh
    from uvjax.training.step import create_trainer, make_train_step

    cfg, batch, counts = build(name, dtype, remat, attention, batch, seq, scan_unroll)
    mesh = make_mesh(list(mesh_shape))
    model = UnifiedModel(model_config(cfg).validate())
    trainer, state = create_trainer(model, cfg, mesh, cfg.sharding.rules)
    return make_train_step(trainer, batch), state, global_batch_from_local(batch, mesh), counts, mesh


def bench(name: str, steps: int, dtype: str, mesh_shape, remat: str, attention: str = "xla", batch: int = 0,
          seq: int = 0, scan_unroll: int = 1) -> dict:
    import jax
    from benchmarks.common import peak_rss_mb
    from uvjax.training.flops import train_flops_per_step

    step, state, gb, counts, mesh = setup(name, dtype, mesh_shape, remat, attention, batch, seq, scan_unroll)
    t = time.perf_counter()
    compiled = step.lower(state, gb).compile()
    compile_s = time.perf_counter() - t
    state, m = step(state, gb)  # warm-up (also checks the loss is finite)
    jax.block_until_ready(m)
    loss0 = float(m["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, gb)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    s = counts["shape"]
    fl = train_flops_per_step(batch=s["batch"], seq=s["seq"], hidden=s["hidden"], layers=s["layers"],
                              heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                              intermediate=s["intermediate"], vocab=s["vocab"], num_codes=s["codes"],
                              text_targets=counts["n_text"], image_targets=counts["n_img"], lora_rank=s["rank"],
                              base_trainable=not s["rank"], lm_head_trainable=not s["rank"])
    tokens = s["batch"] * s["seq"]
    del compiled
    return {"config": name, **s, "dtype": dtype, "remat": remat, "attention": attention, "scan_unroll": scan_unroll,
            "mesh": list(mesh_shape),
            "step_s_median": med, "step_s_all": times, "tokens_per_s": tokens / med,
            "compile_s": compile_s, "useful_flops_per_token": fl["per_token"], "useful_flops_per_step": fl["total"],
            "achieved_gflops": fl["total"] / med / 1e9, "loss_first_step": loss0,
            "loss_last_step": float(m["loss"]), "peak_rss_mb": peak_rss_mb(), **device_memory()}


def device_memory() -> dict:
    """Peak accelerator memory (GPU/TPU; the CPU backend reports none)."""
    import jax
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"device_peak_gib": peak / 2 ** 30} if peak else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="S,M")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mesh", default="1,-1,1")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--attention", default="xla", help="xla | cudnn (GPU, bf16)")
    ap.add_argument("--batch", type=int, default=0, help="override the config's batch")
    ap.add_argument("--seq", type=int, default=0, help="override the config's sequence length")
    ap.add_argument("--scan-unroll", type=int, default=1, help="layers per loop iteration (0: no loop)")
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size of the peak measurement (8192 on GPUs)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args()
    from benchmarks.common import idle_check, machine, machine_line, matmul_peak_gflops, write_json
    print(machine_line())
    idle = idle_check()
    peak = matmul_peak_gflops(n=args.peak_n, dtype=args.dtype)
    print(f"[peak] jitted {args.dtype} matmul {args.peak_n}²: {peak:.1f} GFLOP/s")
    rows = []
    for name in args.configs.split(","):
        r = bench(name, args.steps, args.dtype, [int(x) for x in args.mesh.split(",")], args.remat, args.attention,
                  args.batch, args.seq, args.scan_unroll)
        r["fraction_of_matmul_peak"] = r["achieved_gflops"] / peak
        rows.append(r)
        print(f"{name}: {r['tokens_per_s']:.0f} tok/s | step {r['step_s_median'] * 1e3:.0f} ms | compile "
              f"{r['compile_s']:.1f} s | {r['useful_flops_per_token'] / 1e6:.1f} MFLOP/tok | "
              f"{r['achieved_gflops']:.1f} GFLOP/s = {100 * r['fraction_of_matmul_peak']:.0f}% of peak | "
              f"RSS {r['peak_rss_mb']:.0f} MB" + (f" | device peak {r['device_peak_gib']:.1f} GiB"
                                                  if "device_peak_gib" in r else ""))
    write_json(args.out, {"machine": machine(), "idle": idle, "matmul_peak_gflops": peak, "results": rows})


if __name__ == "__main__":
    from uvjax.runtime_env import reexec_with_malloc_hugetlb
    reexec_with_malloc_hugetlb()  # as `python -m uvjax.train` does (uvjax/runtime_env.py)
    main()
