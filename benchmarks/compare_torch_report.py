"""benchmarks/compare_torch.py's report: the matmul floor of a train row and the Markdown tables of a run's
JSON payload (the payload itself is built by compare_torch.py's train_compare / decode_compare)."""
from __future__ import annotations

import statistics

from benchmarks.common import machine_line

TARGETS = {"S": dict(train=2.0, decode_b1=5.0, decode_b8=2.0), "M": dict(train=1.5, flop_fraction=0.5)}


def matmul_floor(flops_per_step: float, peak_gflops: float, hf_step_s: float) -> tuple[float, float]:
    """(floor seconds, ratio at the floor): the step's useful FLOPs at the in-run 2048² matmul rate — a
    uvjax step made of nothing but GEMMs at that rate — and HF's step time over it, the largest training
    ratio the machine's state allows (other GEMM shapes run a little faster or slower than the square one)."""
    floor = flops_per_step / (peak_gflops * 1e9)
    return floor, hf_step_s / floor


SIDE_NAMES = {"jax": "uvjax", "torch": "HF+peft", "torch_default_malloc": "HF+peft, default malloc",
              "jax_one_block": "uvjax, one block"}


def markdown(payload) -> str:
    m, idle = payload["machine"], payload["idle"]
    cpus = payload["args"].get("cpus")
    pinned = f" (every worker pinned to CPUs {cpus})" if cpus else ""
    lines = [f"# uvjax vs HF transformers + peft ({m['date']})", "", machine_line(m), "",
             f"Machine: {m['platform']}, {idle['cores']} cores{pinned}, jax {m['jax']}, torch {payload['torch_version']} "
             f"({payload['args']['torch_threads']} threads), transformers {payload['transformers_version']}, "
             f"peft {payload['peft_version']}. Idle check at start: {idle['cpu_busy_percent']}% busy, "
             f"load {idle['loadavg_1m']:.2f}. GLIBC_TUNABLES uvjax / HF workers: "
             f"`{payload.get('glibc_tunables', {}).get('jax') or '-'}` / "
             f"`{payload.get('glibc_tunables', {}).get('torch') or '-'}`.", "", f"Command: `{payload['command']}`", "",
             "## Train step (fp32, LoRA on 7 projections, AdamW on LoRA only)", "",
             "| config | uvjax tok/s | HF+peft tok/s | ratio | target | ratio at the matmul floor | max loss diff "
             "| uvjax GFLOP/s | % of matmul peak | RSS uvjax / HF (MB) | compile (s) "
             "| CPU busy before units (median/max %) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in payload["train"]:
        t = TARGETS.get(r["config"], {}).get("train")
        lines.append(
            f"| {r['config']} | {r['jax']['tokens_per_s']:.0f} | {r['torch']['tokens_per_s']:.0f} | "
            f"×{r['ratio_tokens_per_s']:.2f} | {'≥ ×%.1f' % t if t else '–'} | "
            f"{'×%.2f' % r['ratio_at_matmul_floor'] if 'ratio_at_matmul_floor' in r else '–'} | {r['loss_max_abs_diff']:.1e} | "
            f"{r['jax']['achieved_gflops']:.0f} | {100 * r['fraction_of_matmul_peak']:.0f}% of "
            f"{r['matmul_peak_gflops']:.0f} | {r['jax']['peak_rss_mb']:.0f} / {r['torch']['peak_rss_mb']:.0f} | "
            f"{r['compile_s']:.1f} | {r['jax']['idle']['cpu_busy_percent_median']:.0f}/"
            f"{max(r['jax']['idle']['cpu_busy_percent_max'], r['torch']['idle']['cpu_busy_percent_max']):.0f} |")
    dm = [r for r in payload["train"] if "torch_default_malloc" in r]
    if dm:
        lines += ["", "Same run, a third worker: HF+peft with glibc's default malloc (no GLIBC_TUNABLES):", "",
                  "| config | HF tok/s (uvjax's malloc) | HF tok/s (default malloc) | uvjax ratio vs default-malloc HF "
                  "| RSS (MB) |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in dm:
            lines.append(f"| {r['config']} | {r['torch']['tokens_per_s']:.0f} | "
                         f"{r['torch_default_malloc']['tokens_per_s']:.0f} | ×{r['ratio_vs_torch_default_malloc']:.2f} | "
                         f"{r['torch_default_malloc']['peak_rss_mb']:.0f} |")
    if payload["train"]:
        lines += ["", "*Ratio at the matmul floor*: HF's step time over the step's useful FLOPs at the in-run 2048² "
                      "matmul rate — the ratio a uvjax step made of nothing but GEMMs at that rate would reach; the "
                      "largest this machine state allows (GEMMs of other shapes can run a little faster or slower)."]
        sides = [k for k in ("jax", "torch", "torch_default_malloc", "jax_one_block") if k in payload["train"][0]]
        lines += ["", "CPU seconds per timed step, median user / system (the worker process, all threads; system "
                      "time is page faults and the kernel zeroing pages):", "",
                  "| config | " + " | ".join(SIDE_NAMES[k] for k in sides) + " |",
                  "| --- |" + " ---: |" * len(sides)]
        for r in payload["train"]:
            cells = [f"{statistics.median(r[k]['cpu_user_s_all']):.2f} / {statistics.median(r[k]['cpu_sys_s_all']):.2f}"
                     if r.get(k, {}).get("cpu_user_s_all") else "–" for k in sides]
            lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    abl = [r for r in payload["train"] if "jax_one_block" in r]
    if abl:
        lines += ["", "Ablation, same run: uvjax with its causal attention as one T×T block (no query blocks):", "",
                  "| config | uvjax tok/s (blocked) | one block tok/s | ratio vs HF (one block) | RSS one block (MB) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in abl:
            lines.append(f"| {r['config']} | {r['jax']['tokens_per_s']:.0f} | {r['jax_one_block']['tokens_per_s']:.0f} | "
                         f"×{r['ratio_one_block_vs_torch']:.2f} | {r['jax_one_block']['peak_rss_mb']:.0f} |")
    if payload["decode"]:
        lines += ["", f"## Greedy decode (prompt {payload['args']['prompt']}, {payload['args']['new_tokens']} new "
                      "tokens, KV cache, end-to-end wall time)", "",
                  "| config | batch | uvjax new tok/s | HF generate new tok/s | ratio | target | greedy agree (first 16) "
                  "| RSS uvjax / HF (MB) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in payload["decode"]:
            t = TARGETS.get(r["config"], {}).get(f"decode_b{r['batch']}")
            lines.append(
                f"| {r['config']} | {r['batch']} | {r['jax']['new_tokens_per_s']:.0f} | "
                f"{r['torch']['new_tokens_per_s']:.0f} | ×{r['ratio_new_tokens_per_s']:.2f} | "
                f"{'≥ ×%.0f' % t if t else '–'} | {100 * r['greedy_first16_agree']:.0f}% | "
                f"{r['jax']['peak_rss_mb']:.0f} / {r['torch']['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"
