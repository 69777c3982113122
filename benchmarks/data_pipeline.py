"""Data pipeline throughput: ArrayRecord shards -> packed [batch, seq] batches.

Builds a Smart Watch split (128 px, images replaced by 64 stand-in codes as the pre-tokenisation pass
would), trains the BPE, then times ``make_train_iterator`` in one process and with ``mp_prefetch``
workers. Runs alternate between the two settings and medians are reported, because the machine is
shared; the load average before each run is recorded. The model's Config S consumes
8 x 512 tokens per step at about 2 steps/s (~8.2k tokens/s): the ``ratio`` column says how many times
faster than that the pipeline is.

    python benchmarks/data_pipeline.py [--out benchmarks/results/data_pipeline.json] [--images 600]
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uvjax.data import pipeline, smartwatch as sw  # noqa: E402
from uvjax.data.arrays import PAD  # noqa: E402
from uvjax.data.records import Record, Segment  # noqa: E402
from uvjax.data.tokenizer import template_texts, train_bpe  # noqa: E402

MODEL_TOKENS_PER_S = 8 * 512 * 2.0


def stand_in_codes(rec: Record, grid: int = 8, k: int = 4096) -> Record:
    """Patch-mean colours -> ``grid*grid`` codes (what a VQ pass would store), so the timing covers
    exactly the work the training pipeline does."""
    segs = []
    for s in rec.segments:
        if s.kind == "image":
            h = s.pixels.shape[0] // grid
            m = s.pixels.reshape(grid, h, grid, h, 3).mean((1, 3)).astype(np.int64) // 16
            s = Segment(s.role, "image", codes=((m[..., 0] * 256 + m[..., 1] * 16 + m[..., 2]) % k)
                        .astype(np.int32).reshape(-1))
        segs.append(s)
    return dataclasses.replace(rec, segments=segs)


def timed_run(cfg, tok, seq_len, batch, n_batches, warmup):
    gc.collect()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(cfg, tok, seq_len=seq_len, local_batch_size=batch)
    try:
        for _ in range(warmup):
            next(it)
        t1 = time.perf_counter()
        c0, tokens = dict(it.counts), 0
        for _ in range(n_batches):
            b = next(it)
            tokens += int((b["modality"] != PAD).sum())
        t2 = time.perf_counter()
        records = it.counts["records"] - c0["records"]
    finally:
        it.close()
    del it
    gc.collect()
    dt = t2 - t1
    return {"startup_s": t1 - t0, "seconds": dt, "examples_per_s": records / dt,
            "tokens_per_s": tokens / dt, "fill": tokens / (n_batches * batch * seq_len),
            "load_before": load}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/data_pipeline.json")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        spec = sw.SmartWatchSpec(seed=0, num_images=args.images, image_size=128)
        recs = [stand_in_codes(r) for r in sw.generate(spec)]
        paths = sw.write_split(spec, tmp, records_per_shard=500, records=recs)
        tok = train_bpe([s.text for r in recs for s in r.segments if s.kind == "text"] + template_texts(),
                        vocab_size=1024)
        prep_s = time.perf_counter() - t
        cfg = pipeline.default_data_config()
        cfg.streams.understanding.paths = paths["understanding"]
        cfg.streams.generation.paths = paths["generation"]
        settings = {"1 process": 0, f"{args.workers} workers": args.workers}
        runs = {k: [] for k in settings}
        for _ in range(args.repeats):  # alternate the settings: a noisy neighbour hits both
            for name, w in settings.items():
                cfg.workers = w
                runs[name].append(timed_run(cfg, tok, args.seq_len, args.batch, args.batches,
                                            warmup=3 if w else 1))
    result = {"config": {**vars(args), "records": len(recs), "image_tokens": 64,
                         "vocab": tok.vocab_size, "prep_s": round(prep_s, 2),
                         "python": platform.python_version(), "cpus": os.cpu_count(),
                         "model_tokens_per_s": MODEL_TOKENS_PER_S},
              "results": {}}
    from benchmarks.common import machine, machine_line
    result["machine"] = machine()
    print(machine_line(result["machine"]))
    print(f"{'setting':<12} {'examples/s':>11} {'tokens/s':>10} {'x model':>8} {'fill':>5} "
          f"{'startup s':>9} {'load':>5}")
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        med["ratio_to_model"] = med["tokens_per_s"] / MODEL_TOKENS_PER_S
        result["results"][name] = {"median": med, "runs": rs}
        print(f"{name:<12} {med['examples_per_s']:>11.0f} {med['tokens_per_s']:>10.0f} "
              f"{med['ratio_to_model']:>8.1f} {med['fill']:>5.2f} {med['startup_s']:>9.1f} "
              f"{max(r['load_before'] for r in rs):>5.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
