"""Evaluation on a run's own held-out split (imported data), where no attribute judge exists.

Three measures, all from the pre-tokenised test records the stages wrote (``dataset/test``):

- **held-out loss**: the training objective, teacher forced, summed per modality over every test record
  and divided by the global target counts (``training/loss.py``): text CE / accuracy, image CE / accuracy;
- **answers**: every test record whose first assistant turn is text (VQA, captions, conversations) is
  prompted with what precedes that turn and decoded greedily; *exact* = the normalised answer equals the
  normalised reference (``evaluation.metrics.normalize``: lower case, whitespace collapsed, trailing .!,
  dropped); *tolerant* =
  either contains the other (e.g. "Yes" vs "Yes, it is.");
- **generation**: every test record whose first assistant turn contains an image is prompted with what
  precedes it and decoded (exactly N codes after ``<boi>``, as in training); a PNG grid shows the
  reference image (its VQ reconstruction) | the generated image | the prompt.
"""
from __future__ import annotations

import glob
import os
import time
from typing import Sequence

import jax
import numpy as np

from uvjax.data import sequence as sq
from uvjax.data.records import Record
from uvjax.data.storage import RecordReader
from uvjax.data.tokenizer import get_template
from uvjax.evaluation.images import _grid
from uvjax.evaluation.metrics import normalize
from uvjax.evaluation.report import write_report
from uvjax.evaluation.vqa import Item, run_items
from uvjax.inference.decode import DecodeSettings, Generator, SpecialIds, find_vq
from uvjax.inference.loading import load_trained
from uvjax.models.unified import sequence_feature_dim
from uvjax.stages.features import find_stage_dir
from uvjax.towers.vq_codec import VQCodec
from uvjax.training import loss as L
from uvjax.training.step import make_loss_fn

_MAX_PROMPT_TEXT = 300


def answer_scores(prediction: str, truth: str) -> dict[str, float]:
    p, t = normalize(prediction), normalize(truth)
    return {"exact": float(p == t), "tolerant": float(bool(p) and bool(t) and (t in p or p in t))}


def split_first_answer(rec: Record) -> tuple[Record, list] | None:
    """(prompt record = everything before the first assistant segment, that assistant turn's segments)."""
    first = next((i for i, s in enumerate(rec.segments) if s.role == "assistant"), None)
    if first is None or first == 0:
        return None
    turn = []
    for s in rec.segments[first:]:
        if s.role != "assistant":
            break
        turn.append(s)
    return Record(rec.id, rec.task, list(rec.segments[:first]), dict(rec.attributes)), turn


def test_records(test_dir: str, limit: int | None = None) -> list[Record]:
    shards = sorted(glob.glob(os.path.join(test_dir, "*.array_record")))
    if not shards:
        return []
    out = []
    for r in RecordReader(shards):
        out.append(r)
        if limit and len(out) >= limit:
            break
    return out


def heldout_loss(run, records: Sequence[Record], batch_size: int = 16) -> dict:
    """Teacher-forced per-modality loss of ``records`` (each its own row, padded to the longest)."""
    cfg, tok = run.cfg, run.tokenizer
    template = get_template(cfg.data.get("template", "vicuna_v1"), cfg.data.get("system_prompt"))
    mc = run.model.cfg
    fdim = sequence_feature_dim(mc.image)
    seq_len = int(cfg.train.seq_len)
    scfg = sq.SequenceConfig(seq_len=seq_len, feature_dim=fdim, codebook_size=int(mc.image.num_codes))
    rows, status = [], {"ok": 0, "truncated": 0, "dropped": 0}
    for r in records:
        e = sq.encode_record(r, tok, template, scfg)
        status[e.status] += 1
        if e.arrays is not None:
            rows.append(e.arrays)
    if not rows:
        return {"records": len(records), **status}
    loss_fn = jax.jit(make_loss_fn(run.model, cfg))
    tot: dict[str, float] = {}
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        part = part + [{k: np.zeros_like(v) for k, v in part[0].items()}] * (batch_size - len(part))
        batch = {k: np.stack([p[k] for p in part]) for k in part[0]}
        _, sums = loss_fn(run.variables, {}, batch, L.global_counts(batch), jax.random.key(0))
        for k, v in jax.device_get(sums).items():
            tot[k] = tot.get(k, 0.0) + float(np.asarray(v, np.float64))
    m = {k: float(v) for k, v in L.metrics_from_sums(tot, w_text=float(cfg.loss.w_text),
                                                      w_image=float(cfg.loss.w_image)).items()}
    return {"records": len(records), **status, **m}


def evaluate_heldout(run, test_dir: str, *, vq_path: str | None, out_dir: str, num_records: int | None = None,
                     batch_size: int = 16, grid_rows: int = 8, cfg_scale: float = 0.0,
                     image_temperature: float = 1.0, image_top_k: int = 0, seed: int = 0,
                     write: bool = True, progress: bool = False) -> dict:
    t0 = time.time()
    records = test_records(test_dir, num_records)
    if not records:
        raise FileNotFoundError(f"no pre-tokenised test records in {test_dir}")
    cfg, tok = run.cfg, run.tokenizer
    template = get_template(cfg.data.get("template", "vicuna_v1"), cfg.data.get("system_prompt"))
    mc = run.model.cfg
    fdim = sequence_feature_dim(mc.image)
    report: dict = {"workdir": run.workdir, "step": run.step, "split": "heldout", "test_dir": test_dir,
                    "records": len(records)}
    timing: dict = {}
    t = time.time()
    report["heldout_loss"] = heldout_loss(run, records, batch_size=batch_size)
    timing["loss_s"] = round(time.time() - t, 2)

    qa, gen_items = [], []
    for r in records:
        sp = split_first_answer(r)
        if sp is None:
            continue
        prompt, turn = sp
        if any(s.kind == "image" for s in turn):
            if mc.image.output_kind == "codes" and r.images("assistant")[0].codes is not None:
                text = " ".join(s.text for s in prompt.segments if s.kind == "text" and s.text)
                gen_items.append((Item("generation", r.id, prompt, r.attributes, truth=text),
                                  np.asarray(r.images("assistant")[0].codes)))
        else:
            truth = " ".join(s.text for s in turn if s.kind == "text" and s.text)
            if truth:
                qa.append(Item("qa", r.id, prompt, r.attributes, truth=truth))
    gen = Generator(run.model, run.variables, SpecialIds.from_tokenizer(tok))
    if qa:
        t = time.time()
        longest = max(len(tok.encode(it.truth)) for it in qa)
        res = run_items(gen, tok, template, qa, DecodeSettings(max_new_tokens=min(256, longest + 8)),
                        batch_size=batch_size, seed=seed, feature_dim=fdim,
                        progress="eval answers" if progress else None)
        sums = {"exact": 0.0, "tolerant": 0.0}
        samples = []
        for it, r in zip(qa, res):
            sc = answer_scores(r["text"], it.truth)
            for k in sums:
                sums[k] += sc[k]
            if len(samples) < 25:
                samples.append({"id": it.record_id, "truth": it.truth, "answer": r["text"], **sc})
        report["answers"] = {"n": len(qa), **{k: v / len(qa) for k, v in sums.items()}, "samples": samples}
        timing["answers_s"] = round(time.time() - t, 2)
    files = {}
    if gen_items:
        t = time.time()
        n_codes = int(len(gen_items[0][1]))
        settings = DecodeSettings(max_new_tokens=64 + n_codes + 2, image_tokens=n_codes, max_images=1,
                                  force_image_within=48, image_temperature=image_temperature,
                                  image_top_k=image_top_k)
        sel = gen_items[:max(grid_rows, 0)] if grid_rows else gen_items
        res = run_items(gen, tok, template, [it for it, _ in sel], settings, batch_size=batch_size,
                        cfg_scale=cfg_scale, seed=seed, feature_dim=fdim,
                        progress="eval generation" if progress else None)
        made = [i for i, r in enumerate(res) if r["images"] and len(r["images"][0]) == n_codes]
        report["generation"] = {"n": len(sel), "images_generated": len(made) / max(1, len(sel)),
                                "samples": [{"id": it.record_id, "prompt": it.truth[:_MAX_PROMPT_TEXT],
                                             "text": r["text"], "image": i in made}
                                            for i, ((it, _), r) in enumerate(zip(sel, res))]}
        if write and vq_path:
            codec = VQCodec(vq_path)
            real = codec.decode(np.stack([c for _, c in sel]))
            gen_imgs = codec.decode(np.stack([res[i]["images"][0] for i in made])) if made else None
            pos = {i: k for k, i in enumerate(made)}
            rows = [(real[i], gen_imgs[pos[i]] if i in pos else None, it.truth[:_MAX_PROMPT_TEXT])
                    for i, (it, _) in enumerate(sel)]
            files["grid"] = os.path.join(out_dir, "generations.png")
            _grid(rows, files["grid"], cell=max(64, min(128, int(real.shape[1]))))
        elif not vq_path:
            report["generation"]["grid_skipped"] = "no VQ tokenizer found to decode codes to pixels"
        timing["generation_s"] = round(time.time() - t, 2)
    timing["total_s"] = round(time.time() - t0, 2)
    report["timing"] = timing
    if write:
        write_report(report, out_dir, files, format_table)
    return report


def format_table(report: dict) -> str:
    lines = [f"held-out evaluation of {report.get('workdir')} at step {report.get('step')} "
             f"({report.get('records')} test records)"]
    hl = report.get("heldout_loss") or {}
    if "loss" in hl:
        lines.append(f"  held-out loss {hl['loss']:.4f}: text {hl['loss/text']:.4f} (accuracy "
                     f"{hl['accuracy/text']:.3f}, {int(hl['tokens/text_targets'])} targets), image "
                     f"{hl['loss/image']:.4f} (accuracy {hl['accuracy/image']:.3f}, "
                     f"{int(hl['tokens/image_targets'])} targets)")
        if hl.get("truncated") or hl.get("dropped"):
            lines.append(f"  at seq_len: {hl['truncated']} test records truncated, {hl['dropped']} dropped")
    a = report.get("answers")
    if a:
        lines.append(f"  answers ({a['n']}): exact {a['exact']:.3f}, tolerant {a['tolerant']:.3f}")
    g = report.get("generation")
    if g:
        lines.append(f"  generation ({g['n']} prompts): images produced {g['images_generated']:.2f}"
                     + (f"; grid {report.get('files', {}).get('grid')}" if report.get("files", {}).get("grid") else ""))
    return "\n".join(lines)


def is_imported_run(cfg) -> bool:
    src = (cfg.get("stages") or {}).get("source") if hasattr(cfg, "get") else None
    return bool(src) and str(src.get("kind", "smartwatch")) == "imported"


def evaluate_imported_run(workdir: str, *, loaded=None, out_dir: str | None = None, **kw) -> dict:
    """``evaluate_heldout`` of a run built from imported data: its test split is the ``test`` folder of the
    last ``dataset`` stage in ``<workdir>/stages.jsonl``; its VQ the last ``vq`` stage."""
    run = loaded if loaded is not None else load_trained(workdir)
    ds = find_stage_dir(run.workdir, "dataset")
    if ds is None or not os.path.isdir(os.path.join(ds, "test")):
        raise FileNotFoundError(f"no held-out split recorded for {run.workdir}: set stages.source.test "
                                "(a held-out JSON/parquet) so the stages pre-tokenise one")
    vq_path, _ = find_vq(run.workdir, run.cfg)
    out_dir = out_dir or os.path.join(run.workdir, "eval", f"step_{run.step}")
    return evaluate_heldout(run, os.path.join(ds, "test"), vq_path=vq_path, out_dir=out_dir, **kw)
