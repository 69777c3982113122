"""Weight import cost: wall time and peak host RSS for the SmolLM2 GGUF and a ~1B HF checkpoint.

Why: the HF importer promises streaming (peak ≈ one copy of the model + one tensor); this measures it.
Each import runs in a fresh subprocess and reads its own high-water mark (VmHWM); the report gives
peak RSS above the post-import-of-libraries baseline next to the bytes of the params produced. RSS
includes file-backed pages of the memory-mapped shard being read (reclaimable page cache), so the
HF excess over one copy is about one shard.
The HF checkpoint (TinyLlama-1.1B shapes, random bf16, sharded like HF) is written to a temporary
directory by this script and deleted afterwards. Cases alternate across repeats; medians are reported.

``python benchmarks/weights_import.py [--repeats 3] [--skip_hf] [--out benchmarks/results/weights_import.json]``
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# TinyLlama-1.1B shapes: 1.10e9 params
HF_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM from /proc: VmHWM belongs to this exec'd image, whereas ``ru_maxrss`` of a
    subprocess starts at the parent's RSS at fork time (which would mask the child's own peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def child(kind: str, path: str, dtype: str) -> dict:
    """One import in this (fresh) process; prints a JSON line."""

    import jax  # noqa: F401  (library imports happen before the baseline)
    import ml_dtypes  # noqa: F401
    import numpy as np
    import safetensors  # noqa: F401
    import tokenizers  # noqa: F401
    import gguf as _g  # noqa: F401
    from uvjax.weights import gguf, hf_llama  # noqa: F401
    base = _rss_mb()
    t = time.perf_counter()
    if kind == "gguf":
        params, m = gguf.load_gguf_llama(path, dtype)
        t_w = time.perf_counter() - t
        tok = gguf.load_gguf_tokenizer(path)
        extra = {"tokenizer_s": time.perf_counter() - t - t_w, "vocab": tok.vocab_size}
    else:
        params, m = hf_llama.load_hf_llama(path, dtype)
        t_w = time.perf_counter() - t
        extra = {}
    nbytes = sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(params))
    peak = _status_mb("VmHWM")
    out = {"kind": kind, "dtype": dtype, "seconds": t_w, "baseline_rss_mb": base, "peak_rss_mb": peak,
           "peak_above_baseline_mb": peak - base, "params_mb": nbytes / 2 ** 20,
           "n_params": int(sum(np.asarray(x).size for x in jax.tree_util.tree_leaves(params))), **extra}
    print("RESULT " + json.dumps(out), flush=True)
    return out


def write_random_hf(path: str, shard: str = "1GB") -> dict:
    """A random bf16 Llama checkpoint in HF layout (config.json, shards + index), tensor by tensor."""
    import ml_dtypes
    import numpy as np

    from uvjax.weights.export import parse_size, write_safetensors_sharded
    from uvjax.weights.hf_llama import hf_config_from_model, hf_shapes, model_dict_from_hf
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **HF_1B}
    m = model_dict_from_hf(cfg)
    shapes = hf_shapes(m)
    rng = np.random.default_rng(0)

    def tensors():
        def rand(shape):
            return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        yield "model.embed_tokens.weight", rand(shapes["embed"])
        from uvjax.weights.hf_llama import LAYER_ROLES
        for i in range(m["layers"]):
            for role, (_, hf, linear) in LAYER_ROLES.items():
                yield f"model.layers.{i}.{hf}", rand(shapes[role]) if linear else \
                    np.ones(shapes[role], ml_dtypes.bfloat16)
        yield "model.norm.weight", np.ones(shapes["final_norm"], ml_dtypes.bfloat16)
        yield "lm_head.weight", rand(shapes["lm_head"])

    os.makedirs(path, exist_ok=True)
    files = write_safetensors_sharded(tensors(), path, dtype="bfloat16", max_shard_bytes=parse_size(shard))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_from_model(m, dtype="bfloat16"), f)
    size = sum(os.path.getsize(os.path.join(path, fn)) for fn in files)
    return {"files": len(files), "disk_mb": size / 2 ** 20}


def run_child(kind, path, dtype) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--path", path,
                        "--dtype", dtype], capture_output=True, text=True, env=env, cwd=ROOT)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"child {kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--path", default="")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip_hf", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "weights_import.json"))
    a = ap.parse_args()
    if a.child:
        child(a.child, a.path, a.dtype)
        return
    from benchmarks.common import idle_check, machine, machine_line, write_json
    from uvjax.weights.gguf import smollm2_path
    print(machine_line())
    idle_before = idle_check()
    cases = [("gguf", smollm2_path(), "float32"), ("gguf", smollm2_path(), "bfloat16")]
    tmp = None
    written = {}
    try:
        if not a.skip_hf:
            tmp = tempfile.mkdtemp(prefix="uvjax_bench_hf1b_")
            t = time.perf_counter()
            written = write_random_hf(tmp)
            written["write_s"] = time.perf_counter() - t
            print(f"[hf] wrote random 1.1B checkpoint: {written}")
            cases += [("hf", tmp, "float32"), ("hf", tmp, "bfloat16")]
        runs = {c: [] for c in cases}
        for r in range(a.repeats):  # alternate cases within each repeat
            for c in cases:
                res = run_child(*c)
                runs[c].append(res)
                print(f"  repeat {r} {c[0]:4s} {c[2]:8s} {res['seconds']:6.2f}s  "
                      f"peak+{res['peak_above_baseline_mb']:8.0f} MB  (params {res['params_mb']:.0f} MB)", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    idle_after = idle_check()
    rows = []
    for (kind, _, dtype), rs in runs.items():
        med = lambda k: statistics.median(x[k] for x in rs)
        row = {"case": f"{kind}:{'smollm2-135M' if kind == 'gguf' else 'random-1.1B'}", "dtype": dtype,
               "seconds_median": med("seconds"), "seconds_all": [x["seconds"] for x in rs],
               "peak_above_baseline_mb": med("peak_above_baseline_mb"), "params_mb": rs[0]["params_mb"],
               "peak_over_params": med("peak_above_baseline_mb") / rs[0]["params_mb"],
               "n_params": rs[0]["n_params"]}
        if kind == "gguf":
            row["tokenizer_s_median"] = med("tokenizer_s")
        rows.append(row)
    print(f"\n{'case':22s} {'dtype':9s} {'time s':>8s} {'peak+ MB':>9s} {'params MB':>10s} {'peak/params':>11s}")
    for r in rows:
        print(f"{r['case']:22s} {r['dtype']:9s} {r['seconds_median']:8.2f} {r['peak_above_baseline_mb']:9.0f} "
              f"{r['params_mb']:10.0f} {r['peak_over_params']:11.2f}")
    write_json(a.out, {"benchmark": "weights_import", "machine": machine(), "idle_before": idle_before,
                       "idle_after": idle_after, "repeats": a.repeats, "hf_checkpoint": written, "results": rows})


if __name__ == "__main__":
    main()
