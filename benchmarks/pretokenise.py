"""Pre-tokenisation throughput of imported data, and the training pipeline fed from its output (issue #28).

A LLaVA-format dataset is written from the format's spec (``tests/llava_fixture.py``: JPEG/PNG files of
200-320 px, each image used by a VQA, a caption and a generation record, plus one text-only record) and
imported with ``uvjax.data.formats.convert``. The frozen VQ encoder then runs over it through the
pass itself (``uvjax.pretokenise.pretokenise_shards``) for two architectures, with random weights
saved as ``vq.safetensors`` and loaded by ``VQCodec`` as a real run would (speed does not depend on
the weights):

- ``tiny``: ``configs/vq_tokenizer.py:tiny``, 64 px -> 8x8 = 64 codes (the first run's tokenizer);
- ``vq16``: LlamaGen VQ-16 (``uvjax.models.vq.llamagen_vq16``), 256 px -> 16x16 = 256 codes.

Two rates per architecture: *encoder* images/s (the pass report's ``images_per_second``: only the
encoder calls, preprocessing of the batch included) and *whole pass* images/s and records/s (reading
shards, decoding JPEG/PNG, resizing, encoding, writing the output shards, from the caller's clock).
The encoder is compiled before the timed passes (its compile time is reported on its own); every
pass writes to a fresh folder, so each one encodes every distinct image once.

Then ``uvjax.data.pipeline.make_train_iterator`` (one process, as ``benchmarks/data_pipeline.py``) is
timed on each architecture's pre-tokenised shards: examples/s and tokens/s of packed batches.

The machine is shared: an idle check runs first, the 1-minute load average is recorded before each
timed unit, the architectures alternate within each repeat (a noisy neighbour hits both) and medians
of ``--repeats`` are reported. ``--quick``: ~30 s, ``tiny`` only (smoke test); the default takes ~3-4 min
on 2 cores, most of it VQ-16 (compiling it alone takes ~45 s).

    python benchmarks/pretokenise.py [--out benchmarks/results/pretokenise.json] [--quick]
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "configs"))
sys.path.insert(0, os.path.join(REPO, "tests"))  # llava_fixture: the format written without uvjax

ARCHS = ("tiny", "vq16")
# sizes: distinct images per architecture (records = 3 * images + 1; multiples of VQCodec's chunk of 16, which
# pads a short last chunk), timed repeats, timed pipeline batches per run. VQ-16 at 256 px costs ~30-50 s per
# 16-image chunk on 2 shared cores plus ~45 s to compile, so --quick leaves it out (ask with --archs).
DEFAULTS = {"archs": "tiny,vq16", "tiny_images": 384, "vq16_images": 16, "repeats": 3, "batches": 100}
QUICK = {"archs": "tiny", "tiny_images": 16, "vq16_images": 16, "repeats": 1, "batches": 8}
def vq_model(arch: str, out_dir: str) -> tuple[str, int, dict]:
    """Random-initialised VQ of ``arch`` saved as ``out_dir/vq.safetensors`` (what ``VQCodec`` loads);
    returns the path, the input size and a description."""
    import jax
    import vq_tokenizer
    from uvjax.models.vq import init_params, llamagen_vq16
    from uvjax.training.vq_train import PARAMS_FILE, vq_config_from
    from uvjax.weights.llamagen_vq import save_vq
    if arch == "tiny":
        c = vq_tokenizer.get_config("tiny")
        cfg, size = vq_config_from(c), int(c.data.image_size)
    elif arch == "vq16":
        cfg, size = llamagen_vq16(), 256
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
    params = init_params(cfg, 0, size)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, PARAMS_FILE)
    save_vq(params, cfg, path)
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    h, w = cfg.grid(size)
    return path, size, {"image_size": size, "grid": f"{h}x{w}", "codes_per_image": h * w,
                        "codebook_size": int(cfg.codebook_size), "params_m": round(n_params / 1e6, 2)}


def llava_import(root: str, n_images: int, seed: int) -> dict:
    """The fixture's JSON + images under ``root/src``, imported into ``root/shards``."""
    from llava_fixture import write_llava
    from uvjax.data.importers.convert import convert
    data = write_llava(os.path.join(root, "src"), n_images=n_images, seed=seed)
    res = convert(data["json"], os.path.join(root, "shards"), format="llava", image_dir=data["images"])
    shards = sorted(p for ps in res["paths"].values() for p in ps)
    return {"shards": shards, "records": len(data["items"])}


def timed_pass(shards, enc, out_dir: str, batch: int) -> dict:
    from uvjax import pretokenise as pt
    from uvjax.towers import encoders
    shutil.rmtree(out_dir, ignore_errors=True)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    rep = pt.pretokenise_shards(shards, {"user": enc, "assistant": enc}, out_dir, batch=batch)
    wall = time.perf_counter() - t
    if rep["skipped_total"]:
        raise RuntimeError(f"the pass skipped records: {rep['messages']}")
    # the report's images_per_second, unrounded (it rounds to 0.01: 2% of VQ-16's rate on 2 cores)
    enc_rate = rep["images_encoded"] / rep["encode_seconds"] if rep["encode_seconds"] else float("nan")
    return {"encoder_images_per_s": enc_rate, "report_images_per_second": rep["images_per_second"],
            "pass_images_per_s": rep["images_encoded"] / wall,
            "pass_records_per_s": rep["records_read"] / wall, "pass_seconds": wall,
            "encode_seconds": rep["encode_seconds"], "images_encoded": rep["images_encoded"],
            "image_refs": rep["image_refs"], "records": rep["records_read"],
            "records_written": rep["records_written"], "load_before": load}


def train_tokenizer(shards):
    from uvjax.data.storage import RecordReader
    from uvjax.data.tokenizer import template_texts, train_bpe
    texts = [s.text for r in RecordReader(shards) for s in r.segments if s.kind == "text"]
    return train_bpe(texts + template_texts(), vocab_size=1024)


def pipeline_config(pre_dir: str, info: dict):
    from uvjax.data import pipeline
    cfg = pipeline.default_data_config()
    for stream in ("understanding", "generation", "interleaved"):
        paths = sorted(glob.glob(os.path.join(pre_dir, f"train-{stream}-*.array_record")))
        cfg.streams[stream].paths = tuple(paths)
        if not paths:
            cfg.streams[stream].weight = 0.0
    cfg.image_tokens = info["codes_per_image"]
    cfg.codebook_size = info["codebook_size"]
    cfg.workers = 0
    return cfg


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]
            if isinstance(runs[0][k], (int, float))}


def table(result: dict) -> str:
    """The run's JSON as a short text table (``python -c`` on a saved JSON prints it again)."""
    mach, idle, c = result["machine"], result["idle"], result["config"]
    g = lambda x: f"{x:.3g}" if x < 100 else f"{x:.0f}"  # noqa: E731
    from benchmarks.common import machine_line
    lines = [machine_line(mach), f"idle check: {idle['cpu_busy_percent']:.0f}% busy, load1 {idle['loadavg_1m']:.2f}",
             f"{'VQ':<5} {'px':>4} {'codes':>6} {'images':>6} {'records':>7} {'enc img/s':>10} {'pass img/s':>10} "
             f"{'pass rec/s':>10} {'compile s':>9} {'load':>5}"]
    for a, r in result["pretokenise"].items():
        m, s = r["median"], result["setup"][a]
        lines.append(f"{a:<5} {s['image_size']:>4} {s['grid']:>6} {s['images']:>6} {s['records']:>7} "
                     f"{g(m['encoder_images_per_s']):>10} {g(m['pass_images_per_s']):>10} "
                     f"{g(m['pass_records_per_s']):>10} {s['load_compile_s']:>9.1f} "
                     f"{max(x['load_before'] for x in r['runs']):>5.1f}")
    lines += ["", f"{'pipeline':<9} {'seq':>4} {'batch':>5} {'examples/s':>11} {'tokens/s':>10} {'fill':>5} "
                  f"{'startup s':>9} {'load':>5}"]
    for a, r in result["pipeline"].items():
        m = r["median"]
        lines.append(f"{a:<9} {c['seq_len']:>4} {c['batch']:>5} {g(m['examples_per_s']):>11} "
                     f"{g(m['tokens_per_s']):>10} {m['fill']:>5.2f} {m['startup_s']:>9.2f} "
                     f"{max(x['load_before'] for x in r['runs']):>5.1f}")
    lines.append(f"(medians of {c['repeats']}; enc = the pass report's images_per_second (encoder calls only), "
                 "pass = whole pass incl. reading, decoding, resizing, writing shards)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/pretokenise.json")
    ap.add_argument("--quick", action="store_true", help="~30 s smoke run (sizes below default to tiny ones)")
    ap.add_argument("--archs", default="", help="comma-separated subset of tiny,vq16 (default both; "
                                                "--quick: tiny)")
    ap.add_argument("--tiny-images", type=int, default=0, help=f"distinct images for tiny "
                                                                f"(default {DEFAULTS['tiny_images']})")
    ap.add_argument("--vq16-images", type=int, default=0, help=f"distinct images for vq16 "
                                                                f"(default {DEFAULTS['vq16_images']})")
    ap.add_argument("--repeats", type=int, default=0, help=f"timed passes per architecture "
                                                           f"(default {DEFAULTS['repeats']})")
    ap.add_argument("--encode-batch", type=int, default=64, help="the pass's --batch")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="pipeline local batch size")
    ap.add_argument("--batches", type=int, default=0, help=f"timed pipeline batches per run "
                                                           f"(default {DEFAULTS['batches']})")
    ap.add_argument("--no-idle-check", action="store_true")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULTS
    for k, v in sizes.items():
        if not getattr(args, k):
            setattr(args, k, v)
    archs = [a for a in args.archs.split(",") if a]
    for a in archs:
        if a not in ARCHS:
            ap.error(f"unknown architecture {a!r}; expected some of {ARCHS}")

    import numpy as np
    from benchmarks.common import cpu_snapshot, idle_check, machine, peak_rss_mb, write_json
    from benchmarks.data_pipeline import timed_run
    from uvjax import pretokenise as pt
    from uvjax.towers import encoders

    idle = idle_check(1.0 if args.quick else 2.0) if not args.no_idle_check else cpu_snapshot()
    mach = machine()
    result = {"machine": mach, "idle": idle, "config": {**vars(args), "archs": archs}, "setup": {},
              "pretokenise": {}, "pipeline": {}}
    with tempfile.TemporaryDirectory(prefix="uvjax-bench-pretok-") as tmp:
        enc, data, info = {}, {}, {}
        for a in archs:
            t = time.perf_counter()
            n = getattr(args, f"{a}_images")
            data[a] = llava_import(os.path.join(tmp, a), n, seed=0)
            t_import = time.perf_counter() - t
            t = time.perf_counter()
            path, size, info[a] = vq_model(a, os.path.join(tmp, a, "vq"))
            t_model = time.perf_counter() - t
            t = time.perf_counter()
            enc[a] = encoders.vq_encoder(path, size)
            enc[a].encode(np.zeros((1, size, size, 3), np.uint8))  # compile (VQCodec pads to its chunk)
            t_compile = time.perf_counter() - t
            result["setup"][a] = {**info[a], "images": n, "records": data[a]["records"],
                                  "import_s": round(t_import, 2), "init_save_s": round(t_model, 2),
                                  "load_compile_s": round(t_compile, 2), "codec_chunk": enc[a].tower.chunk}
            print(f"[setup] {a}: {n} images / {data[a]['records']} records imported in {t_import:.1f} s; "
                  f"{info[a]['params_m']} M params; load + compile {t_compile:.1f} s")
            if n % enc[a].tower.chunk:
                print(f"[setup] note: {n} images is not a multiple of VQCodec's chunk ({enc[a].tower.chunk}); "
                      "the padded last chunk lowers the encoder rate")
        runs = {a: [] for a in archs}
        for _ in range(args.repeats):  # alternate the architectures: a noisy neighbour hits both
            for a in archs:
                runs[a].append(timed_pass(data[a]["shards"], enc[a], os.path.join(tmp, a, "pre"),
                                          args.encode_batch))
        for a in archs:
            result["pretokenise"][a] = {"median": median_of(runs[a]), "runs": runs[a]}

        # the training pipeline on the (last) pre-tokenised shards of each architecture
        prs = {a: [] for a in archs}
        for a in archs:
            tok = train_tokenizer(data[a]["shards"])
            cfg = pipeline_config(os.path.join(tmp, a, "pre"), info[a])
            result["setup"][a]["vocab"] = tok.vocab_size
            for _ in range(args.repeats):
                prs[a].append(timed_run(cfg, tok, args.seq_len, args.batch, args.batches, warmup=1))
            result["pipeline"][a] = {"median": median_of(prs[a]), "runs": prs[a]}
    result["peak_rss_mb"] = peak_rss_mb()
    result["load_after"] = os.getloadavg()[0]

    print("\n" + table(result))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
