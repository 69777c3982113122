"""bf16 train-step throughput and MFU on a GPU (issue #9 item 3): the ``smollm2`` preset's model and a ~1B
Llama, XLA attention vs cuDNN fused attention, with and without remat.

    python benchmarks/gpu_train.py --out=benchmarks/results/gpu_train.json

Each variant runs ``benchmarks/train_step.py`` in its own process (a variant that runs out of memory
is recorded as such and the others still run; each process measures the bf16 8192³ matmul rate on the
same GPU just before its steps, which is what MFU divides by). Writes the JSON of every variant and a
Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

# (config, attention, remat, batch, seq); batch/seq 0 = the config's own (smollm2 16 x 1024, 1B 8 x 2048)
VARIANTS = (
    ("smollm2", "xla", "none", 0, 0),
    ("smollm2", "cudnn", "none", 0, 0),
    ("1B", "xla", "none", 0, 0),
    ("1B", "xla", "dots", 0, 0),
    ("1B", "cudnn", "none", 0, 0),
    ("1B", "cudnn", "dots", 0, 0),
)


def run_variant(v, steps: int, timeout: int) -> dict:
    name, attention, remat, batch, seq = v
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        cmd = [sys.executable, os.path.join(HERE, "train_step.py"), f"--configs={name}", "--dtype=bfloat16",
               f"--attention={attention}", f"--remat={remat}", f"--batch={batch}", f"--seq={seq}",
               f"--steps={steps}", "--peak-n=8192", "--mesh=1,-1,1", f"--out={out}"]
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"config": name, "attention": attention, "remat": remat, "error": f"timeout after {timeout} s"}
        sys.stdout.write(p.stdout)
        if p.returncode != 0 or not os.path.exists(out):
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            oom = "RESOURCE_EXHAUSTED" in p.stderr or "out of memory" in p.stderr.lower()
            return {"config": name, "attention": attention, "remat": remat,
                    "error": "out of memory" if oom else " | ".join(tail)}
        with open(out) as f:
            payload = json.load(f)
    r = payload["results"][0]
    r["matmul_peak_gflops"] = payload["matmul_peak_gflops"]
    r["machine"] = payload["machine"]
    return r


def table(rows) -> str:
    from benchmarks.common import machine_line
    machines = [r["machine"] for r in rows if "machine" in r]
    head = ("config", "attention", "remat", "batch x seq", "tok/s", "step ms", "compile s", "MFU vs matmul",
            "TFLOP/s", "matmul TFLOP/s", "GPU peak GiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['attention']} | {r['remat']} | | {r['error']} |" + " |" * 6)
            continue
        lines.append("| " + " | ".join([
            r["config"], r["attention"], r["remat"], f"{r['batch']} x {r['seq']}", f"{r['tokens_per_s']:,.0f}",
            f"{r['step_s_median'] * 1e3:.1f}", f"{r['compile_s']:.1f}", f"{100 * r['fraction_of_matmul_peak']:.1f}%",
            f"{r['achieved_gflops'] / 1e3:.1f}", f"{r['matmul_peak_gflops'] / 1e3:.0f}",
            f"{r.get('device_peak_gib', float('nan')):.1f}"]) + " |")
    return "\n".join(([machine_line(machines[0]), ""] if machines else []) + lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated config names to run (default: all)")
    ap.add_argument("--variants", default="", help="config:attention:remat:batch:seq,... instead of the default set")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    ap.add_argument("--out", default="benchmarks/results/gpu_train.json")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    rows = []
    variants = VARIANTS
    if args.variants:
        variants = [(n, a, r, int(b), int(t)) for n, a, r, b, t in (x.split(":") for x in args.variants.split(","))]
    for v in variants:
        if only and v[0] not in only:
            continue
        rows.append(run_variant(v, args.steps, args.timeout))
        print(table(rows[-1:]).splitlines()[-1], flush=True)  # the row (the machine line heads the full table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"results": rows}, f, indent=2)
    md = table(rows)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
