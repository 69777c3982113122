"""``python -m uvjax.evaluate --workdir=RUN [--quick] [--num_images=N] [--judge_dir=DIR]``

Evaluates a trained run on the Smart Watch test split (``SmartWatchSpec`` test, images from
``start_index`` 10**9, never seen in training) and writes ``<out>/report.json``, ``<out>/table.txt``,
``<out>/generations.png`` and ``<out>/vq_reconstructions.png`` (default out: ``<workdir>/eval/step_<step>``);
given a metric writer it also logs the scalars, the table and both grids (TensorBoard, W&B):

- **VQA** per attribute over every VQA turn: strict / tolerant / coarse matching
  (``uvjax/evaluation/metrics.py`` documents each rule) and the reference repo's partial-credit score;
- **captions**: recall of the ground-truth caption's attribute values in the generated caption;
- **generation**: each generation prompt's image is decoded to pixels (the run's VQ) and read by the
  attribute judge (``uvjax/evaluation/judge.py``); accuracy per attribute the prompt mentioned, next
  to the judge's accuracy on the *real* renders of the same prompts (the ceiling the judge allows);
- **Fréchet distance** between judge features of generated and real test images, with the real-vs-
  real distance at the same sample size as the noise floor;
- **standard FID** (``gen.fid_inception``) when the user supplies the FID Inception weights
  (``--inception_weights=PATH`` or the config key ``stages.evaluate.inception_path``; docs/WEIGHTS.md):
  pytorch-fid's network (``uvjax/evaluation/inception.py``) on generated vs real test images upsampled
  to 299 px, with the FID between the two halves of the real images as a floor. Without weights the
  report says so (nothing is downloaded).

:func:`evaluate_run` is the library entry (the train loop calls it with ``quick=True``: a small
subset, and no judge training: generation scores need a cached judge there). Images are encoded and
decoded through ``encode_images(uint8 [B,H,W,3]) -> codes [B,N]`` and ``decode_codes(codes) ->
uint8 [B,H,W,3]`` callables, by default the run's VQ tokenizer (:class:`~uvjax.inference.decode.VQCodec`);
tests inject simple ones.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Sequence

import numpy as np

from uvjax.data import smartwatch as sw
from uvjax.evaluation import metrics
from uvjax.evaluation.vqa import Item, attach_codes, build_items, run_items

QUICK_IMAGES = 16
GEN_ATTRS = ("time_hour", "time_quarter", "time_5min", "weather", "battery", "weather_pos", "battery_pos")


def _stages_data(cfg):
    st = cfg.get("stages") if hasattr(cfg, "get") else None
    return st.get("data") if st is not None and hasattr(st, "get") else None


def test_spec(cfg, num_images: int | None, image_size: int) -> sw.SmartWatchSpec:
    """The run's test split: ``data.smartwatch.test`` when the config has it, else the split the
    first-run stages use (``stages.data``: seed, num_test, time_seconds), else the default split
    (seed 0, 500 images from index 10**9), at the run's image size."""
    sect = None
    for node in (cfg.get("data", {}), cfg):
        if hasattr(node, "get") and node.get("smartwatch") is not None and node["smartwatch"].get("test") is not None:
            sect = node["smartwatch"]["test"]
            break
    sd = _stages_data(cfg)
    if sect is not None:
        spec = sw.spec_from_config(sect, "test")
    elif sd is not None:
        spec = sw.SmartWatchSpec("test", int(sd.get("seed", 0)), int(sd.get("num_test", 500)), 10**9,
                                 image_size, bool(sd.get("time_seconds", False)))
    else:
        spec = sw.default_splits(image_size=image_size)["test"]
    spec = dataclasses.replace(spec, image_size=image_size)
    if num_images:
        spec = dataclasses.replace(spec, num_images=min(int(num_images), spec.num_images))
    return spec


def _image_size(workdir: str, cfg, vq_path: str | None) -> int:
    sd = _stages_data(cfg)
    if sd is not None and sd.get("image_size"):
        return int(sd["image_size"])
    if vq_path:
        p = os.path.join(os.path.dirname(vq_path), "vq_config.json")
        if os.path.exists(p):
            size = _read_vq_config(p).get("data", {}).get("image_size")
            if size:
                return int(size)
    d = cfg.get("data", {})
    return int(d.get("image_size", 0) or 128) if hasattr(d, "get") else 128


def _read_vq_config(path: str) -> dict:
    """``vq_config.json`` beside a VQ tokenizer; a damaged one raises ``DamagedFile`` naming it."""
    from uvjax.integrity_files import read_json
    return read_json(path, "VQ tokenizer config", VQ_CONFIG_TODO)


VQ_CONFIG_TODO = ("It is written with the VQ tokenizer: when the VQ is a stage of the cache, move its directory "
                  "aside (mv DIR DIR.damaged) and rerun training to rebuild it; else restore the file from a copy, "
                  "or delete it (the image size is then taken from the run's config)")


def default_judge_dir(workdir: str, cfg, preset: str, image_size: int) -> str:
    """Where the judge is cached: next to the first-run stage cache (shared by every run of that cache,
    since the judge depends only on the renderer, its preset and the image size), else in the run."""
    from uvjax import storage_paths as sp
    st = cfg.get("stages") if hasattr(cfg, "get") else None
    cache = (st.get("cache_dir") if st is not None and hasattr(st, "get") else "") or ""
    if sp.is_remote(workdir) or sp.is_remote(cache):  # the judge trains and loads as local files
        return os.path.join(sp.cache_root(), f"judge-{preset}-{image_size}px")
    if st is not None and hasattr(st, "get") and st.get("build", False):
        cache = st.get("cache_dir") or os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache")
        return os.path.join(os.path.abspath(cache), f"judge-{preset}-{image_size}px")
    return os.path.join(workdir, "judge")


def _judge_scores(pred: dict, labels: dict, mentioned: Sequence[str]) -> dict[str, float]:
    out = {}
    for a in mentioned:
        if a == "time":
            hour = float(pred["hour"] == labels["hour"])
            out["time_hour"] = hour
            out["time_quarter"] = float(hour and pred["minute_q"] == labels["minute_q"])
            out["time_5min"] = float(hour and pred["minute_5"] == labels["minute_5"])
        else:
            out[a] = float(pred[a] == labels[a])
    return out


def _row(d: dict, i: int) -> dict:
    return {k: int(v[i]) for k, v in d.items()}


def grid_image(rows: list[tuple[np.ndarray, np.ndarray | None, str]], cell: int = 128,
               text_w: int = 360) -> np.ndarray:
    """uint8 [H, W, 3]: one row per entry: image | image (None: a red "no image" box) | text. Height
    ``rows * (cell + 4) + 4``, width ``2 * (cell + 4) + text_w + 4`` (4 px padding)."""
    from PIL import Image, ImageDraw, ImageFont
    import textwrap
    pad = 4
    H = len(rows) * (cell + pad) + pad
    W = 2 * (cell + pad) + text_w + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    for r, (real, gen, text) in enumerate(rows):
        y = pad + r * (cell + pad)
        for c, img in enumerate((real, gen)):
            x = pad + c * (cell + pad)
            if img is None:
                d.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(200, 0, 0))
                d.text((x + 8, y + cell // 2), "no image", fill=(200, 0, 0), font=font)
            else:
                canvas.paste(Image.fromarray(img).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        d.multiline_text((2 * (cell + pad) + pad, y + 4), "\n".join(textwrap.wrap(text, 52)[:8]),
                         fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _grid(rows: list[tuple[np.ndarray, np.ndarray | None, str]], path: str, cell: int = 128) -> np.ndarray:
    """PNG: one row per prompt: real render | generated image | prompt text. Returns its pixels."""
    img = grid_image(rows, cell)
    write_png(img, path)
    return img


def grid_cell(image_size: int) -> int:
    """The grids' cell size: the test image size, clamped to [64, 128] px."""
    return max(64, min(128, int(image_size)))


def vq_reconstruction_rows(records, encode_images: Callable, decode_codes: Callable, n: int) -> list | None:
    """(real, reconstructed, "<index>: PSNR x dB") for the first ``n`` distinct test images, through the run's
    VQ (encode, decode): how much of a generated image's blur the tokenizer alone explains. None when the
    encoder gives features (no pixel decoder)."""
    pix, ids, seen = [], [], set()
    for r in records:
        for s in r.images():
            if s.pixels is not None and id(s.pixels) not in seen and len(pix) < n:
                seen.add(id(s.pixels))
                pix.append(s.pixels)
                ids.append(r.id.rsplit("/", 2)[-2] if r.id.count("/") >= 2 else r.id)  # .../<index>/<task>
    if not pix:
        return []
    codes = np.asarray(encode_images(np.stack(pix)))
    if codes.dtype.kind not in "iu":
        return None
    recon = np.asarray(decode_codes(codes.reshape(len(pix), -1)))
    rows = []
    for real, rec, rid in zip(pix, recon, ids):
        text = rid
        if rec.shape == real.shape:
            mse = float(np.mean((real.astype(np.float64) - rec.astype(np.float64)) ** 2))
            text += f": PSNR {10 * np.log10(255.0 ** 2 / mse):.1f} dB" if mse > 0 else ": exact"
        rows.append((real, rec.astype(np.uint8), text))
    return rows


class EvalReport(dict):
    """``evaluate_run``'s report (a plain JSON-able dict) plus ``images``: name → uint8 [H, W, 3] grid
    (``generations``: real | generated | prompt; ``vq_reconstructions``: real | through the VQ), kept in
    memory for metric writers whether or not the PNGs are written."""

    images: dict


def log_evaluation(writer, report: dict, step: int | None = None) -> None:
    """An evaluation into a metric writer at ``step`` (default: the report's): the scalars of
    :func:`flat_metrics`, the table as text (``eval/table``) and the grids as images (``eval/<name>``)."""
    step = int(report["step"] if step is None else step)
    writer.write(step, flat_metrics(report))
    writer.write_text(step, {"eval/table": format_table(report)})
    writer.write_images(step, {f"eval/{k}": v for k, v in (getattr(report, "images", None) or {}).items()})


def write_png(image, path: str) -> None:
    """A PIL image or uint8 [H, W, 3] array as a PNG at a local path or a gs:// URL (one atomic write)."""
    import io
    from PIL import Image
    from uvjax import storage_paths as sp
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    sp.atomic_write_bytes(path, buf.getvalue())


def evaluate_run(workdir: str, *, quick: bool = False, num_images: int | None = None, loaded=None,
                 encode_images: Callable | None = None, decode_codes: Callable | None = None,
                 judge=None, judge_dir: str | None = None, judge_preset: str = "full",
                 image_size: int | None = None, batch_size: int = 32, cfg_scale: float = 0.0,
                 image_temperature: float = 1.0, image_top_k: int = 0, seed: int = 0,
                 tasks: Sequence[str] = ("vqa", "caption", "generation"), out_dir: str | None = None,
                 write: bool = True, grid_rows: int = 8, progress: bool = False, inception=None,
                 recon_images: int = 4, writer=None) -> EvalReport:
    """Evaluates a run directory; returns the report dict (also written as JSON + table + grids unless
    ``write=False``) with the grids' pixels in ``.images`` (:class:`EvalReport`).

    ``inception``: the FID Inception weight file (or a loaded ``InceptionFID``); None reads the run
    config's ``stages.evaluate.inception_path`` ("" = no standard FID). ``recon_images``: test images
    shown through the VQ (0: none). ``writer``: a ``MetricWriter``; the evaluation is logged into it at the
    run's step (:func:`log_evaluation`)."""
    from uvjax.data.tokenizer import get_template
    from uvjax.evaluation import judge as judge_mod
    from uvjax.inference.decode import DecodeSettings, Generator, SpecialIds, VQCodec, find_vq
    from uvjax.inference.loading import load_trained

    bad = [t for t in tasks if t not in ("vqa", "caption", "generation")]
    if bad:
        raise ValueError(f"evaluation tasks {bad}: expected any of vqa, caption, generation")
    t_start = time.time()
    run = loaded if loaded is not None else load_trained(workdir)
    cfg, tok = run.cfg, run.tokenizer
    vq_path, looked = find_vq(run.workdir, cfg)
    if encode_images is None or decode_codes is None:
        if vq_path is None:
            raise FileNotFoundError("evaluation needs the run's VQ tokenizer to encode test images (and decode "
                                    f"generated ones); looked at {looked}. Train one with uvjax.training.vq_train "
                                    "into <workdir>/vq, or pass encode_images/decode_codes")
        codec = VQCodec(vq_path)
        encode_images = encode_images or codec.encode
        decode_codes = decode_codes or codec.decode
    fid_net = None
    if "generation" in tasks:  # load (and check) the weights before minutes of decoding
        fid_net = inception_extractor(cfg if inception is None else inception)
    size = int(image_size or _image_size(run.workdir, cfg, vq_path))
    spec = test_spec(cfg, QUICK_IMAGES if quick and not num_images else num_images, size)
    records = [r for r in sw.generate(spec) if r.task in tasks]
    recon_rows = vq_reconstruction_rows(records, encode_images, decode_codes, recon_images) if recon_images > 0 else []
    records = attach_codes(records, encode_images)
    items = build_items(records)
    sample = next((s for r in records for s in r.images() if s.codes is not None or s.features is not None), None)
    n_codes = 0 if sample is None else int(len(sample.codes) if sample.codes is not None else len(sample.features))

    mc = run.model.cfg
    feature_dim = mc.image.feature_dim if mc.image.input_kind == "features" or mc.image.output_kind == "features" else 0
    template = get_template(cfg.data.get("template", "vicuna_v1"), cfg.data.get("system_prompt"))
    ids = SpecialIds.from_tokenizer(tok)
    gen = Generator(run.model, run.variables, ids)
    report = EvalReport({"workdir": run.workdir, "step": run.step, "quick": quick,
                         "split": dataclasses.asdict(spec), "image_tokens": n_codes, "tasks": list(tasks)})
    report.images = {}
    timing = {}

    def decode(kind: str, settings: DecodeSettings, **kw):
        sel = [it for it in items if it.kind == kind]
        t = time.time()
        res = run_items(gen, tok, template, sel, settings, batch_size=batch_size, seed=seed,
                        feature_dim=feature_dim, progress=f"eval {kind}" if progress else None, **kw) if sel else []
        timing[kind + "_s"] = round(time.time() - t, 2)
        return sel, res

    # ---------------------------------------------------------------- VQA
    if "vqa" in tasks:
        sel, res = decode("vqa", DecodeSettings(max_new_tokens=16))
        acc = metrics.Accumulator()
        samples = []
        for it, r in zip(sel, res):
            sc = metrics.score_answer(it.attribute, r["text"], it.truth)
            acc.add(it.attribute, sc)
            if len(samples) < 25:
                samples.append({"id": it.prompt.id, "attribute": it.attribute, "truth": it.truth,
                                "answer": r["text"], **sc})
        report["vqa"] = acc.result()
        report["vqa_samples"] = samples

    # ---------------------------------------------------------------- captions
    if "caption" in tasks:
        sel, res = decode("caption", DecodeSettings(max_new_tokens=96))
        acc = metrics.Accumulator()
        samples = []
        for it, r in zip(sel, res):
            sc = metrics.caption_scores(r["text"], it.attrs, it.mentioned, bool(it.attrs.get("time_seconds")))
            for a, v in sc.items():
                acc.add(a, {"recall": v})
            if len(samples) < 10:
                samples.append({"id": it.record_id, "truth": it.truth, "caption": r["text"], "recall": sc})
        report["caption"] = acc.result()
        report["caption_samples"] = samples

    # ---------------------------------------------------------------- generation
    out_dir = out_dir or os.path.join(run.workdir, "eval", f"step_{run.step}")
    files = {}
    if "generation" in tasks:
        gen_rep: dict = {}
        if mc.image.output_kind != "codes":
            gen_rep["skipped"] = ("continuous (feature) outputs have no pixel decoder; judge scores and "
                                  "Fréchet distance need pixels")
        elif n_codes == 0:
            gen_rep["skipped"] = "no image token count known (no encoded test image)"
        else:
            settings = DecodeSettings(max_new_tokens=32 + n_codes + 2, image_tokens=n_codes, max_images=1,
                                      force_image_within=24, image_temperature=image_temperature,
                                      image_top_k=image_top_k)
            sel, res = decode("generation", settings, cfg_scale=cfg_scale)
            made = [i for i, r in enumerate(res) if r["images"] and len(r["images"][0]) == n_codes]
            gen_imgs = (np.asarray(decode_codes(np.stack([res[i]["images"][0] for i in made])))
                        if made else np.zeros((0, size, size, 3), np.uint8))
            real = np.stack([sw.render(it.attrs, size) for it in sel]) if sel else np.zeros((0, size, size, 3), np.uint8)
            gen_rep.update(n=len(sel), images_generated=len(made) / max(1, len(sel)),
                           settings=dataclasses.asdict(settings), cfg_scale=cfg_scale)
            jd = judge
            if jd is None:
                jdir = judge_dir or default_judge_dir(run.workdir, cfg, judge_preset, size)
                damaged = None
                if os.path.exists(os.path.join(jdir, judge_mod.PARAMS_FILE)):
                    try:
                        jd = judge_mod.Judge.load(jdir)
                    except judge_mod.JudgeCacheDamaged as e:  # a cache: retrained below (said), or skipped
                        damaged = str(e)
                        print(f"WARNING: the cached judge is damaged: {e}", flush=True)
                if jd is None and not quick:  # load_or_train retrains a damaged cache (and says so)
                    jd = judge_mod.load_or_train(jdir, dataclasses.replace(judge_mod.PRESETS[judge_preset], image_size=size),
                                                 progress=progress)
                elif jd is None:
                    gen_rep["judge_skipped"] = (f"the cached judge in {jdir} is damaged ({damaged}); quick evaluation "
                                                "never trains one" if damaged else
                                                f"no cached judge in {jdir} (quick evaluation never trains one)")
            if jd is not None and sel:
                t = time.time()
                labels = judge_mod.labels_array([it.attrs for it in sel])
                pred_real = jd.predict(real)
                acc_gen, acc_real = metrics.Accumulator(), metrics.Accumulator()
                pred_gen = jd.predict(gen_imgs) if made else {}
                pos = {i: k for k, i in enumerate(made)}
                for i, it in enumerate(sel):
                    lab = _row(labels, i)
                    for a, v in _judge_scores(_row(pred_real, i), lab, it.mentioned).items():
                        acc_real.add(a, {"accuracy": v})
                    if i in pos:
                        sc = _judge_scores(_row(pred_gen, pos[i]), lab, it.mentioned)
                    else:  # no image: every mentioned attribute is wrong
                        sc = {a: 0.0 for a in _judge_scores(_row(pred_real, i), lab, it.mentioned)}
                    for a, v in sc.items():
                        acc_gen.add(a, {"accuracy": v})
                gen_rep["judge_accuracy"] = acc_gen.result()
                gen_rep["judge_accuracy_on_real"] = acc_real.result()
                gen_rep["judge"] = {"config": dataclasses.asdict(jd.cfg),
                                    "heldout_accuracy": jd.report.get("heldout_accuracy")}
                if len(made) >= 2:
                    f_gen, f_real = jd.features(gen_imgs), jd.features(real)
                    rng = np.random.default_rng([seed, 7])
                    ref = np.stack([sw.render(sw.sample_attributes(rng), size) for _ in range(len(real))])
                    gen_rep["frechet_judge"] = {
                        "generated_vs_real": metrics.frechet_distance(f_gen, f_real),
                        "real_vs_real": metrics.frechet_distance(jd.features(ref), f_real),
                        "n_generated": len(made), "n_real": len(real), "feature_dim": int(f_gen.shape[1])}
                timing["judge_s"] = round(time.time() - t, 2)
            if fid_net is None:
                gen_rep["fid_inception"] = FID_OFF
            elif len(made) < 2:
                gen_rep["fid_inception"] = f"skipped: {len(made)} generated images (FID needs at least 2)"
            else:
                from uvjax.evaluation.inception import fid_report
                t = time.time()
                gen_rep["fid_inception"] = fid_report(fid_net, gen_imgs, real)
                timing["fid_s"] = round(time.time() - t, 2)
            gen_rep["samples"] = [{"id": it.record_id, "prompt": it.truth, "text": res[i]["text"],
                                   "image": i in set(made)} for i, it in enumerate(sel[:10])]
            if sel and grid_rows > 0:
                pos = {i: k for k, i in enumerate(made)}
                rows = [(real[i], gen_imgs[pos[i]] if i in pos else None, it.truth)
                        for i, it in enumerate(sel[:grid_rows])]
                report.images["generations"] = grid_image(rows, grid_cell(size))
                if write:
                    files["grid"] = os.path.join(out_dir, "generations.png")
                    write_png(report.images["generations"], files["grid"])
        report["generation"] = gen_rep
    if recon_rows:
        report.images["vq_reconstructions"] = grid_image(recon_rows, grid_cell(size), text_w=200)
        if write:
            files["vq_reconstructions"] = os.path.join(out_dir, "vq_reconstructions.png")
            write_png(report.images["vq_reconstructions"], files["vq_reconstructions"])

    timing["total_s"] = round(time.time() - t_start, 2)
    report["timing"] = timing
    if write:
        write_report(report, out_dir, files, format_table)
    if writer is not None:
        log_evaluation(writer, report)
    return report


def write_report(report: dict, out_dir: str, files: dict, table) -> None:
    """``report.json`` and ``table.txt`` (``table(report)``) in ``out_dir`` (local or gs://); ``files`` (grid
    paths so far) gains both and is stored in the report."""
    from uvjax import storage_paths as sp
    files["report"] = os.path.join(out_dir, "report.json")
    files["table"] = os.path.join(out_dir, "table.txt")
    report["files"] = files
    sp.atomic_write_text(files["report"], json.dumps(report, indent=1, default=_json_default))
    sp.atomic_write_text(files["table"], table(report) + "\n")


FID_OFF = ("off: standard FID is not supported without the user's Inception weights (--inception_weights=PATH "
           "or stages.evaluate.inception_path; docs/WEIGHTS.md)")


def inception_path(cfg) -> str:
    """The config's ``stages.evaluate.inception_path`` ("" when absent: runs saved before the key)."""
    st = cfg.get("stages") if hasattr(cfg, "get") else None
    ev = st.get("evaluate") if st is not None and hasattr(st, "get") else None
    return str(ev.get("inception_path", "") or "") if ev is not None and hasattr(ev, "get") else ""


def inception_extractor(source):
    """None (no standard FID), or the FID Inception feature extractor for ``source``: a weight file
    path, a run config (its ``stages.evaluate.inception_path``) or an ``InceptionFID``."""
    from uvjax.evaluation.inception import InceptionFID, get_extractor
    if isinstance(source, InceptionFID):
        return source
    path = source if isinstance(source, (str, os.PathLike)) else inception_path(source)
    return get_extractor(os.fspath(path)) if path else None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def flat_metrics(report: dict) -> dict[str, float]:
    """Scalars for a metric writer: ``eval/vqa/<attr>/<score>``, ``eval/caption/...``, ``eval/gen/...``."""
    out = {}
    for sect in ("vqa", "caption"):
        for attr, d in report.get(sect, {}).items():
            out.update({f"eval/{sect}/{attr}/{k}": float(v) for k, v in d.items() if k != "n"})
    g = report.get("generation", {})
    for attr, d in g.get("judge_accuracy", {}).items():
        out[f"eval/gen/{attr}/accuracy"] = float(d["accuracy"])
    if "frechet_judge" in g:
        out["eval/gen/frechet_judge"] = float(g["frechet_judge"]["generated_vs_real"])
    fid = g.get("fid_inception")
    if isinstance(fid, dict):
        out["eval/gen/fid_inception"] = float(fid["generated_vs_real"])
        if fid.get("real_vs_real") is not None:
            out["eval/gen/fid_inception_floor"] = float(fid["real_vs_real"])
    if "images_generated" in g:
        out["eval/gen/images_generated"] = float(g["images_generated"])
    return out


def format_table(report: dict) -> str:
    """A fixed-width text table of the report's headline numbers."""
    lines = [f"uvjax evaluation: {report['workdir']} step {report['step']}"
             f" ({report['split']['num_images']} test images{', quick' if report.get('quick') else ''})"]
    if "vqa" in report:
        lines += ["", f"{'VQA':14s} {'n':>5s} {'strict':>7s} {'toler.':>7s} {'coarse':>7s} {'hour':>6s} {'ref':>6s}"]
        for a in list(sw.VQA_ATTRIBUTES) + ["all"]:
            d = report["vqa"].get(a)
            if d:
                hour = f"{d['hour']:6.3f}" if "hour" in d else f"{'':6s}"
                lines.append(f"{a:14s} {d['n']:5d} {d['strict']:7.3f} {d['tolerant']:7.3f} {d['coarse']:7.3f} "
                             f"{hour} {d['reference']:6.3f}")
    if "caption" in report:
        lines += ["", f"{'caption recall':14s} {'n':>5s} {'recall':>7s}"]
        for a in list(sw.FRAGMENT_ORDER) + ["all"]:
            d = report["caption"].get(a)
            if d:
                lines.append(f"{a:14s} {d['n']:5d} {d['recall']:7.3f}")
    g = report.get("generation")
    if g:
        lines.append("")
        if "skipped" in g:
            lines.append(f"generation: skipped ({g['skipped']})")
        else:
            lines.append(f"generation: {g['n']} prompts, images produced {g['images_generated']:.3f}")
            if "judge_accuracy" in g:
                lines.append(f"{'judge reads':14s} {'n':>5s} {'gen':>7s} {'real':>7s}")
                for a in list(GEN_ATTRS) + ["all"]:
                    d, r = g["judge_accuracy"].get(a), g["judge_accuracy_on_real"].get(a)
                    if d:
                        lines.append(f"{a:14s} {d['n']:5d} {d['accuracy']:7.3f} {r['accuracy']:7.3f}")
            elif "judge_skipped" in g:
                lines.append(f"judge: {g['judge_skipped']}")
            if "frechet_judge" in g:
                fj = g["frechet_judge"]
                lines.append(f"Fréchet (judge features): generated-real {fj['generated_vs_real']:.3f}, "
                             f"real-real floor {fj['real_vs_real']:.3f} (n={fj['n_generated']})")
            fid = g.get("fid_inception")
            if isinstance(fid, dict):
                floor = "n/a" if fid.get("real_vs_real") is None else f"{fid['real_vs_real']:.2f}"
                lines.append(f"FID (Inception pool3, 299 px): generated-real {fid['generated_vs_real']:.2f}, "
                             f"real-real floor {floor} (halves of {fid['n_real']}) (n={fid['n']})")
            elif fid is not None:
                lines.append(f"FID (Inception): {fid}")
    lines.append(f"\ntime: {report['timing']}")
    return "\n".join(lines)


def main(argv):
    from absl import flags
    F = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    from uvjax.inference.loading import load_config
    from uvjax.stages_features import evaluation_kwargs
    run_cfg = load_config(F.workdir)
    from uvjax.evaluation.heldout import evaluate_imported_run, format_table as heldout_table, is_imported_run
    if is_imported_run(run_cfg):  # the run's own held-out split (no Smart Watch judge)
        report = evaluate_imported_run(F.workdir, out_dir=F.out, num_records=F.num_images or None,
                                       batch_size=F.batch_size, cfg_scale=F.cfg_scale,
                                       image_temperature=F.image_temperature, image_top_k=F.image_top_k,
                                       seed=F.seed, progress=True)
        print(heldout_table(report))
        print(f"\nwrote {report['files']['report']}")
        return
    extra = evaluation_kwargs(F.workdir, run_cfg)  # SigLIP inputs: the run's own tower
    weights = F.inception_weights or inception_path(run_cfg)
    if weights:
        try:  # a bad file fails here, before any decoding, with the file and key named
            extra["inception"] = inception_extractor(weights)
        except (FileNotFoundError, ValueError, ImportError) as e:
            where = "--inception_weights" if F.inception_weights else "config stages.evaluate.inception_path"
            raise SystemExit(f"{where}: {e}")
    report = evaluate_run(F.workdir, quick=F.quick, num_images=F.num_images or None, judge_dir=F.judge_dir,
                          batch_size=F.batch_size, cfg_scale=F.cfg_scale, image_temperature=F.image_temperature,
                          image_top_k=F.image_top_k, seed=F.seed, tasks=tuple(F.tasks), out_dir=F.out,
                          image_size=F.image_size or None, progress=True, **extra)
    print(format_table(report))
    print(f"\nwrote {report['files']['report']}")


def _define_flags():
    from absl import app, flags
    import uvjax.train  # noqa: F401  (load_trained imports it; it owns the --workdir flag we share)
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_bool("quick", False, f"evaluate {QUICK_IMAGES} test images (never trains a judge)")
    flags.DEFINE_integer("num_images", 0, "test images to evaluate (0: the whole test split)")
    flags.DEFINE_string("judge_dir", None, "cached judge directory (default <workdir>/judge; trained if absent)")
    flags.DEFINE_string("out", None, "output directory (default <workdir>/eval/step_<step>)")
    flags.DEFINE_integer("batch_size", 32, "prompts per decoding batch")
    flags.DEFINE_float("cfg_scale", 0.0, "classifier-free guidance scale s (logits = c + s (c - u))")
    flags.DEFINE_float("image_temperature", 1.0, "image code temperature (0 = greedy)")
    flags.DEFINE_integer("image_top_k", 0, "image code top-k (0 = off)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_integer("image_size", 0, "test image size (default: the VQ tokenizer's training size)")
    flags.DEFINE_list("tasks", ["vqa", "caption", "generation"], "tasks to evaluate")
    flags.DEFINE_string("inception_weights", None, "FID Inception weights (pytorch-fid's "
                        "pt_inception-2015-12-05-6726825d.pth, or its .safetensors/.npz conversion) for standard "
                        "FID; default: the run config's stages.evaluate.inception_path (docs/WEIGHTS.md)")
    flags.DEFINE_alias("inception", "inception_weights")


def console_main():
    """``uvjax-evaluate`` (the console script) and ``python -m uvjax.evaluate``."""
    from absl import app
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    console_main()
