"""Evaluation of a trained run (the library behind ``python -m uvjax.evaluate``).

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
uint8 [B,H,W,3]`` callables, by default the run's VQ tokenizer (:class:`~uvjax.towers.vq_codec.VQCodec`);
tests inject simple ones.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import numpy as np

from uvjax import storage_paths as sp
from uvjax.data import smartwatch as sw
from uvjax.data.tokenizer import get_template
from uvjax.evaluation import judge as judge_mod
from uvjax.evaluation import metrics
from uvjax.evaluation.images import grid_cell, grid_image, vq_reconstruction_rows, write_png
from uvjax.evaluation.inception import InceptionFID, fid_report, get_extractor
from uvjax.evaluation.report import flat_metrics, format_table, write_report
from uvjax.evaluation.vqa import attach_codes, build_items, run_items
from uvjax.inference.decode import DecodeSettings, Generator, SpecialIds, find_vq
from uvjax.inference.loading import load_trained
from uvjax.models.unified import sequence_feature_dim
from uvjax.towers.vq_codec import VQCodec
from uvjax.weights.llamagen_vq import read_vq_config

QUICK_IMAGES = 16




def t2i_text_budget(cfg) -> tuple[int, int]:
    """(force_image_within, text tokens before the image) of text-to-image decoding: a model trained to write
    its layout before the image (``stages.data.generation_plan``, ~20 tokens) gets room for it; the others
    keep 24 / 32 (their answers are ~6 tokens, the cap only stops a rambling row)."""
    sd = _stages_data(cfg)
    return (40, 48) if sd is not None and bool(sd.get("generation_plan", False)) else (24, 32)


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
            size = read_vq_config(p).get("data", {}).get("image_size")
            if size:
                return int(size)
    d = cfg.get("data", {})
    return int(d.get("image_size", 0) or 128) if hasattr(d, "get") else 128


def default_judge_dir(workdir: str, cfg, preset: str, image_size: int) -> str:
    """Where the judge is cached: next to the first-run stage cache (shared by every run of that cache,
    since the judge depends only on the renderer, its preset and the image size), else in the run."""
    st = cfg.get("stages") if hasattr(cfg, "get") else None
    cache = (st.get("cache_dir") if st is not None and hasattr(st, "get") else "") or ""
    if sp.is_remote(workdir) or sp.is_remote(cache):  # the judge trains and loads as local files
        return os.path.join(sp.cache_root(), f"judge-{preset}-{image_size}px")
    if st is not None and hasattr(st, "get") and st.get("build", False):
        cache = st.get("cache_dir") or os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache")
        return os.path.join(os.path.abspath(cache), f"judge-{preset}-{image_size}px")
    return os.path.join(workdir, "judge")


# What the training loop's quick evaluations reuse from one to the next (same process, same files): the VQ codec,
# the judge and the decoder's compiled programs, each compiled once instead of at every evaluation.
_QUICK_REUSE: dict = {}


def _reused(key: tuple, make: Callable, keep=None):
    """``make()`` once per key; ``keep`` is held with it, so an ``id()`` in the key cannot be reused by another
    object while the entry lives. The cache holds the last 8 entries."""
    hit = _QUICK_REUSE.get(key)
    if hit is None:
        if len(_QUICK_REUSE) >= 8:
            _QUICK_REUSE.pop(next(iter(_QUICK_REUSE)))
        hit = _QUICK_REUSE[key] = (make(), keep)
    return hit[0]


def ensure_judge(workdir: str, cfg, progress: bool = False) -> tuple[str, bool]:
    """Trains the run's attribute judge (``stages.evaluate.judge_preset``, at the run's image size) into its cache
    unless it is there; returns (its directory, whether it was there). The learning curves need it before the LM's
    first quick evaluation (which never trains one); the final evaluation then loads the same cache."""
    preset = str(cfg.stages.evaluate.get("judge_preset", "full"))
    if preset not in judge_mod.PRESETS:
        raise ValueError(f"stages.evaluate.judge_preset={preset!r}: expected one of {sorted(judge_mod.PRESETS)}")
    size = _image_size(workdir, cfg, None)
    jdir = default_judge_dir(workdir, cfg, preset, size)
    was_there = os.path.exists(os.path.join(jdir, judge_mod.PARAMS_FILE))
    judge_mod.load_or_train(jdir, dataclasses.replace(judge_mod.PRESETS[preset], image_size=size), progress=progress)
    return jdir, was_there


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
        codec = _reused(("codec", vq_path), lambda: VQCodec(vq_path)) if quick else VQCodec(vq_path)
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
    feature_dim = sequence_feature_dim(mc.image)
    template = get_template(cfg.data.get("template", "vicuna_v1"), cfg.data.get("system_prompt"))
    ids = SpecialIds.from_tokenizer(tok)
    if quick:  # the training loop's evaluations: one model object, new parameters each time (traced arguments)
        gen = _reused(("generator", id(run.model), ids), lambda: Generator(run.model, run.variables, ids),
                      keep=run.model)
        gen.set_variables(run.variables)
    else:
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
            force_within, text_budget = t2i_text_budget(cfg)
            settings = DecodeSettings(max_new_tokens=text_budget + n_codes + 2, image_tokens=n_codes, max_images=1,
                                      force_image_within=force_within, image_temperature=image_temperature,
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
                        jd = (_reused(("judge", jdir), lambda: judge_mod.Judge.load(jdir)) if quick
                              else judge_mod.Judge.load(jdir))
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
                t = time.time()
                gen_rep["fid_inception"] = fid_report(fid_net, gen_imgs, real)
                timing["fid_s"] = round(time.time() - t, 2)
            gen_rep["samples"] = [{"id": it.record_id, "prompt": it.truth, "text": res[i]["text"],
                                   "image": i in set(made)} for i, it in enumerate(sel[:10])]
            if sel and grid_rows > 0:
                pos = {i: k for k, i in enumerate(made)}
                # the prompt, then what the model wrote before its image (a layout plan, or a canned answer)
                rows = [(real[i], gen_imgs[pos[i]] if i in pos else None,
                         it.truth + (f"\nwrote: {res[i]['text'].strip()}" if res[i]["text"].strip() else ""))
                        for i, it in enumerate(sel[:grid_rows])]
                report.images["generations"] = grid_image(rows, grid_cell(size), text_w=520)
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
    if isinstance(source, InceptionFID):
        return source
    path = source if isinstance(source, (str, os.PathLike)) else inception_path(source)
    return get_extractor(os.fspath(path)) if path else None
