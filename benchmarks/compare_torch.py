"""uvjax vs HF transformers + peft on the same model, the same weights and the same batch (issue 9).

    python benchmarks/compare_torch.py                       # S and M training, decode on S, all reps
    python benchmarks/compare_torch.py --configs=S --steps=2 --decode_batches=1 --new_tokens=16   # quick

Needs the torch extra (torch, transformers, peft). One config spec (benchmarks/train_step.py S / M) builds
both models: HF ``LlamaForCausalLM`` (fp32, ``attn_implementation="sdpa"``) wrapped by peft LoRA on all
seven projections (q,k,v,o,gate,up,down; same rank, alpha = 2·rank), and the uvjax ``UnifiedModel`` whose
decoder is the same Llama. One set of numpy weights (base, LoRA A *and a non-zero B*) is written once and
loaded by both sides, so their losses must agree.

Each side runs in its own subprocess (a "worker"), so peak RSS is per side; the parent tells them, in
turn, to run one timed unit (A B A B …, the idle one blocks on its pipe and uses no CPU) and takes a CPU
snapshot (psutil busy % + load average) before every unit. Reported: medians, ratios uvjax / HF.

- **train**: a text-only LM batch laid out like benchmarks/train_step.py (first 25% of each sequence a
  prompt without targets, the rest text targets). AdamW (constant lr, no weight decay, no clipping) on
  the LoRA factors only, on both sides. uvjax computes LM-head logits only at target positions (its
  design); HF is given the tightest logits it supports, ``logits_to_keep`` = the suffix that holds every
  target (``--hf_full_logits`` for all positions). The torch loss is computed from its logits with the
  same target masks as uvjax's text loss; both sides report the loss of every step (they start equal and
  must stay equal, which also checks the optimizers match).
- **decode**: greedy, KV cache, prompt 64, exactly ``--new_tokens`` new tokens (no stop id): HF
  ``generate`` vs uvjax ``Generator.generate`` (prefill + compiled while loop), wall time end to end.
- useful-FLOP rate (uvjax/training/flops.py, text targets only) vs a JAX fp32 matmul peak measured by the
  uvjax worker in the same run; peak RSS per side; uvjax train-step compile time (lower + compile).

The code, by job: compare_torch_common.py (the spec, weights, batch and target masks both sides share),
compare_torch_hf.py and compare_torch_uvjax.py (the two sides, with their workers' timed units),
compare_torch_worker.py (the worker processes and the parent's handle on them), compare_torch_report.py
(the Markdown tables); this file: the command line and the comparison runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from importlib.metadata import version

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a worker runs this file too (--worker): nothing imported here may load numpy, jax or torch (see worker_main)
from benchmarks.common import idle_check, machine, write_json  # noqa: E402
from benchmarks.compare_torch_report import markdown, matmul_floor  # noqa: E402
from benchmarks.compare_torch_worker import Worker, alternate, parse_cpus, snap_summary, worker_main  # noqa: E402
from uvjax.training.flops import train_flops_per_step  # noqa: E402


# ============================================================================ the comparison runs
def hf_malloc(args) -> str:
    return "default" if args.hf_malloc == "default" else "uvjax"


TUNABLES: dict = {}  # side → the GLIBC_TUNABLES its workers ran with (reported in the payload)


def train_compare(name, s, weights, args):
    ws = {"jax": Worker("jax", "train", name, weights, args),
          "torch": Worker("torch", "train", name, weights, args, malloc=hf_malloc(args))}
    if args.hf_malloc == "both":  # a third worker: HF in glibc's default malloc (its own defaults)
        ws["torch_default_malloc"] = Worker("torch", "train", name, weights, args, malloc="default")
    TUNABLES.update({k: w.ready["glibc_tunables"] for k, w in ws.items()})
    if args.ablate_attn_block:  # the same uvjax step with the attention as one T×T block (before issue 9)
        ws["jax_one_block"] = Worker("jax", "train", name, weights, args, attn_block=0)
    # warm-up (first steps: compile on the JAX side, allocator warm-up on both) — losses kept for the check
    warm = {k: w.run(args.warmup) for k, w in ws.items()}
    res = alternate(ws, 1, args.steps, args.snapshot_s)
    bye = {k: w.close() for k, w in ws.items()}
    row = {"config": name, "spec": s, "tokens_per_step": s["batch"] * s["seq"]}
    for k in ws:
        times = [t for r in res[k]["runs"] for t in r["times"]]
        losses = warm[k]["losses"] + [l for r in res[k]["runs"] for l in r["losses"]]
        cpu = [c for r in res[k]["runs"] for c in r["cpu"]]
        med = statistics.median(times)
        row[k] = {"step_s_median": med, "step_s_all": times, "tokens_per_s": row["tokens_per_step"] / med,
                  "cpu_user_s_all": [u for u, _ in cpu], "cpu_sys_s_all": [y for _, y in cpu],
                  "losses": losses, "peak_rss_mb": bye[k]["rss_mb"], "setup": ws[k].ready,
                  "idle": snap_summary(res[k]["snapshots"]), "warmup_s": warm[k]["times"]}
    row["ratio_tokens_per_s"] = row["jax"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
    lj, lt = row["jax"]["losses"], row["torch"]["losses"]
    row["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(lj, lt))
    row["loss_first_step"] = {"jax": lj[0], "torch": lt[0]}
    info = ws["jax"].ready["info"]
    fl = train_flops_per_step(batch=s["batch"], seq=s["seq"], hidden=s["hidden"], layers=s["layers"],
                              heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["hidden"] // s["heads"],
                              intermediate=s["intermediate"], vocab=s["vocab"], num_codes=s.get("codes", 16),
                              text_targets=info["text_targets_per_row"], image_targets=0, lora_rank=s["rank"])
    row["useful_flops_per_token"] = fl["per_token"]
    # peak: median of the measurements taken right after each timed uvjax step (same load), the one at
    # start-up reported too
    row["matmul_peak_gflops_start"] = info["matmul_peak_gflops"]
    row["matmul_peak_gflops_all"] = [r["matmul_peak_gflops"] for r in res["jax"]["runs"]]
    row["matmul_peak_gflops"] = statistics.median(row["matmul_peak_gflops_all"])
    row["compile_s"] = info["compile_s"]
    for k in ws:
        row[k]["achieved_gflops"] = fl["total"] / row[k]["step_s_median"] / 1e9
    row["fraction_of_matmul_peak"] = row["jax"]["achieved_gflops"] / row["matmul_peak_gflops"]
    row["matmul_floor_s"], row["ratio_at_matmul_floor"] = matmul_floor(
        fl["total"], row["matmul_peak_gflops"], row["torch"]["step_s_median"])
    row["rss_ratio"] = row["jax"]["peak_rss_mb"] / row["torch"]["peak_rss_mb"]
    if "torch_default_malloc" in ws:
        row["ratio_vs_torch_default_malloc"] = row["jax"]["tokens_per_s"] / row["torch_default_malloc"]["tokens_per_s"]
        print(f"  HF+peft with glibc's default malloc: {row['torch_default_malloc']['tokens_per_s']:.0f} tok/s "
              f"(uvjax ×{row['ratio_vs_torch_default_malloc']:.2f}), RSS "
              f"{row['torch_default_malloc']['peak_rss_mb']:.0f} MB")
    if "jax_one_block" in ws:
        row["jax_one_block"]["compile_s"] = ws["jax_one_block"].ready["info"]["compile_s"]
        row["ratio_one_block_vs_torch"] = row["jax_one_block"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
        print(f"  ablation (attention as one T×T block): {row['jax_one_block']['tokens_per_s']:.0f} tok/s "
              f"(×{row['ratio_one_block_vs_torch']:.2f} HF), RSS {row['jax_one_block']['peak_rss_mb']:.0f} MB")
    print(f"train {name}: uvjax {row['jax']['tokens_per_s']:.0f} tok/s vs HF+peft {row['torch']['tokens_per_s']:.0f}"
          f" → ×{row['ratio_tokens_per_s']:.2f} | loss diff {row['loss_max_abs_diff']:.2e} | uvjax "
          f"{row['jax']['achieved_gflops']:.0f} GFLOP/s = {100 * row['fraction_of_matmul_peak']:.0f}% of "
          f"{row['matmul_peak_gflops']:.0f} | RSS {row['jax']['peak_rss_mb']:.0f} vs "
          f"{row['torch']['peak_rss_mb']:.0f} MB | compile {row['compile_s']:.1f} s | at the matmul floor "
          f"({row['matmul_floor_s']:.2f} s) the ratio would be ×{row['ratio_at_matmul_floor']:.2f}", flush=True)
    return row


def decode_compare(name, weights, args):
    ws = {"jax": Worker("jax", "decode", name, weights, args),
          "torch": Worker("torch", "decode", name, weights, args, malloc=hf_malloc(args))}
    TUNABLES.update({k: w.ready["glibc_tunables"] for k, w in ws.items()})
    rows = []
    for B in [int(x) for x in args.decode_batches.split(",")]:
        warm = {k: w.run(B) for k, w in ws.items()}  # compile on the JAX side
        res = alternate(ws, B, args.decode_reps, args.snapshot_s)
        row = {"config": name, "batch": B, "prompt": args.prompt, "new_tokens": args.new_tokens}
        for k in ws:
            times = [t for r in res[k]["runs"] for t in r["times"]]
            med = statistics.median(times)
            row[k] = {"s_median": med, "s_all": times, "first_run_s": warm[k]["times"][0],
                      "new_tokens_per_s": B * args.new_tokens / med, "idle": snap_summary(res[k]["snapshots"])}
        row["ratio_new_tokens_per_s"] = row["jax"]["new_tokens_per_s"] / row["torch"]["new_tokens_per_s"]
        a, b = res["jax"]["runs"][-1]["tokens"], res["torch"]["runs"][-1]["tokens"]
        row["greedy_first16_agree"] = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))
        rows.append(row)
        print(f"decode {name} batch {B}: uvjax {row['jax']['new_tokens_per_s']:.0f} new tok/s vs HF "
              f"{row['torch']['new_tokens_per_s']:.0f} → ×{row['ratio_new_tokens_per_s']:.2f} | greedy first 16 "
              f"agree {100 * row['greedy_first16_agree']:.0f}%", flush=True)
    bye = {k: w.close() for k, w in ws.items()}
    for r in rows:
        for k in ws:
            r[k]["peak_rss_mb"] = bye[k]["rss_mb"]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="S,M", help="train configs")
    ap.add_argument("--steps", type=int, default=6, help="timed train steps per side (alternated)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--decode_config", default="S")
    ap.add_argument("--decode_batches", default="1,8", help="empty: skip decoding")
    ap.add_argument("--decode_reps", type=int, default=3)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch_threads", type=int, default=0, help="torch's threads (0: one per CPU the workers run on)")
    ap.add_argument("--cpus", default="", help="pin every worker to these CPU ids (e.g. 0: both sides on one core; "
                                               "XLA's pool sizes itself to them, torch gets one thread each)")
    ap.add_argument("--hf_full_logits", action="store_true", help="HF computes logits at every position")
    ap.add_argument("--hf_malloc", default="uvjax", choices=["uvjax", "default", "both"],
                    help="glibc malloc settings of the HF workers: uvjax's (uvjax/runtime_env.py, as the uvjax workers "
                         "and `python -m uvjax.*` have them), glibc's defaults, or both (a third, default-malloc HF "
                         "worker in training; decoding uses uvjax's)"),
    ap.add_argument("--ablate_attn_block", action="store_true",
                    help="also time uvjax with its causal attention as one T×T block (a third worker)")
    ap.add_argument("--attn_block", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--scan_unroll", type=int, default=0,
                    help="uvjax training: layers per loop iteration (0: no loop; the setting for these 4-8 layers)")
    ap.add_argument("--decode_scan_unroll", type=int, default=0, help="uvjax decoding: the same, for the decode loop")
    ap.add_argument("--snapshot_s", type=float, default=0.5, help="CPU snapshot before each timed unit")
    ap.add_argument("--out", default="benchmarks/results/compare_torch.json")
    ap.add_argument("--md", default="", help="Markdown table path (default: --out with .md)")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--side")
    ap.add_argument("--task")
    ap.add_argument("--config")
    ap.add_argument("--weights")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    args.torch_threads = args.torch_threads or len(parse_cpus(args.cpus) if args.cpus else os.sched_getaffinity(0))

    # reason: parent only; a worker runs this file too, and numpy must load after it pins its CPUs (worker_main)
    import numpy as np
    from benchmarks.compare_torch_common import make_weights, spec_of
    idle = idle_check()
    payload = {"machine": machine(), "idle": idle, "args": vars(args), "command": " ".join(sys.argv),
               "train": [], "decode": []}
    for p in ("torch", "transformers", "peft"):
        payload[f"{p}_version"] = version(p)
    with tempfile.TemporaryDirectory() as tmp:
        names = [c for c in args.configs.split(",") if c]
        if args.decode_batches and args.decode_config not in names:
            names.append(args.decode_config)
        paths = {}
        for name in names:
            paths[name] = os.path.join(tmp, f"{name}.npz")
            np.savez(paths[name], **make_weights(spec_of(name), args.seed))
        for name in [c for c in args.configs.split(",") if c]:
            payload["train"].append(train_compare(name, spec_of(name), paths[name], args))
        if args.decode_batches:
            payload["decode"] = decode_compare(args.decode_config, paths[args.decode_config], args)
    payload["glibc_tunables"] = dict(TUNABLES)
    write_json(args.out, payload)
    md = args.md or os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(payload))
    print(f"wrote {md}")
    print(markdown(payload))


if __name__ == "__main__":
    main()
