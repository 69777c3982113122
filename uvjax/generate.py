"""``python -m uvjax.generate --workdir=RUN (--prompt=TEXT | --image=PNG --question=TEXT | --batch=FILE.jsonl) --out=PATH``

Generates with a trained run or an export directory (``python -m uvjax.weights.export``), through the
Python API (``uvjax/api.py``): text-to-image (``--prompt``), image question answering (``--image`` +
``--question``) or a JSONL batch (one ``{"prompt": ...}`` or ``{"image": ..., "question": ...}`` per
line, optional ``"id"``). Images go through the run's VQ tokenizer (``<workdir>/vq/vq.safetensors`` or
a config path, see :func:`~uvjax.inference.decode.find_vq`): input PNGs are resized to its training
size and encoded to codes; generated codes are decoded to PNGs. Without a VQ tokenizer, requests that
need images fail with a clear message (``--no_force_image`` text-only prompts still work).

``--out``: a ``.png`` path (first image there, further ones ``<stem>_<k>.png``, JSON ``<stem>.json``)
or a directory (``<i>.png`` per request image, ``generations.json``). The JSON lists per request the
prompt, the generated text, the PNG paths and the codes.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from absl import app, flags

from uvjax import cli
from uvjax import storage_paths as sp
from uvjax.api import load
from uvjax.data.records import Record, Segment
from uvjax.evaluation.images import write_png
from uvjax.inference.decode import DecodeSettings, find_vq

F = flags.FLAGS
cli.define_workdir_flag()
flags.DEFINE_string("prompt", None, "text-to-image prompt")
flags.DEFINE_string("image", None, "input PNG (with --question)")
flags.DEFINE_string("question", None, "question about --image")
flags.DEFINE_string("batch", None, "JSONL file of requests")
flags.DEFINE_string("out", None, "output .png path or directory")
flags.DEFINE_integer("max_new_tokens", 0, "decoding budget (0: 64 text tokens + one image)")
flags.DEFINE_float("temperature", 0.0, "text temperature (0 = greedy)")
flags.DEFINE_integer("top_k", 0, "text top-k (0 = off)")
flags.DEFINE_float("top_p", 1.0, "text nucleus mass (1 = off)")
flags.DEFINE_float("image_temperature", 1.0, "image code temperature (0 = greedy)")
flags.DEFINE_integer("image_top_k", 0, "image code top-k (0 = off)")
flags.DEFINE_float("cfg_scale", 0.0, "classifier-free guidance s: logits = cond + s (cond - uncond)")
flags.DEFINE_integer("max_images", 1, "images per answer")
flags.DEFINE_bool("force_image", True, "text-to-image prompts: force <boi> if the model has not opened "
                  "an image after 32 text tokens")
flags.DEFINE_integer("image_tokens", 0, "codes per image (0: from the VQ tokenizer's grid)")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_integer("batch_size", 16, "requests per decoding batch")


def read_requests(prompt, image, question, batch) -> list[dict]:
    given = [x is not None for x in (prompt, image or question, batch)]
    if sum(given) != 1:
        raise app.UsageError("give exactly one of --prompt, --image with --question, or --batch")
    if batch:
        out = []
        with open(batch) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    r = json.loads(line)
                    if not ("prompt" in r) ^ ("image" in r and "question" in r):
                        raise ValueError(f"{batch}:{n}: expected {{'prompt': ...}} or {{'image': ..., 'question': ...}}")
                    out.append(r)
        return out
    if prompt is not None:
        return [{"prompt": prompt}]
    if not (image and question):
        raise app.UsageError("--image needs --question (and --question needs --image)")
    return [{"image": image, "question": question}]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not F.workdir or not F.out:
        raise app.UsageError("--workdir and --out are required")

    reqs = read_requests(F.prompt, F.image, F.question, F.batch)
    model = load(F.workdir)  # a run directory or an export directory (uvjax/api.py)
    needs_vq = any("image" in r for r in reqs) or (F.force_image and any("prompt" in r for r in reqs))
    if needs_vq and model.codec is None and model.input_kind != "features":
        _, looked = find_vq(model.path, model.cfg)
        raise SystemExit(f"this request needs the run's VQ tokenizer (image inputs/outputs) but none was found; "
                         f"looked at {looked}. Train one with `python -m uvjax.training.vq_train ... "
                         f"--workdir={model.path}/vq`, or use --no_force_image for text-only prompts")
    if model.output_kind != "codes" and F.force_image:
        raise SystemExit("this run generates continuous features, which have no pixel decoder; "
                         "use --no_force_image")
    n_codes = (F.image_tokens or model.image_tokens) if model.can_generate else 0  # no decoder: never open one
    records = []
    for r in reqs:
        if "prompt" in r:
            records.append(Record("prompt", "generation", [Segment("user", "text", text=r["prompt"])]))
        else:
            try:
                image = model._image_segment(r["image"])
            except ValueError as e:
                raise app.UsageError(f"--image: {e}")
            records.append(Record("question", "vqa", [image, Segment("user", "text", text=r["question"])]))
    base = DecodeSettings(
        max_new_tokens=F.max_new_tokens or (64 + (n_codes + 2) * F.max_images if n_codes else 64),
        temperature=F.temperature, top_k=F.top_k, top_p=F.top_p, image_tokens=n_codes,
        image_temperature=F.image_temperature, image_top_k=F.image_top_k,
        max_images=F.max_images if n_codes else 0)
    # text-to-image rows may get <boi> forced; image questions never do (separate batches)
    t2i = dataclasses.replace(base, force_image_within=32 if (F.force_image and n_codes) else 0)
    ids = model._p.ids

    out_path = sp.resolve(F.out)  # a local path or a gs:// URL (written through etils.epath)
    single = out_path.lower().endswith(".png")
    out_dir = os.path.dirname(out_path) if single else out_path
    sp.as_path(out_dir).mkdir(parents=True, exist_ok=True)
    stem = os.path.splitext(out_path)[0] if single else None
    results, k_img = [None] * len(reqs), 0
    groups = [([i for i, r in enumerate(reqs) if "prompt" in r], t2i),
              ([i for i, r in enumerate(reqs) if "prompt" not in r], base)]
    for idx, settings in groups:
        for start in range(0, len(idx), F.batch_size):
            rows = idx[start:start + F.batch_size]
            out = model._decode([records[i] for i in rows], settings, cfg_scale=F.cfg_scale, seed=F.seed + rows[0])
            for row, i in enumerate(rows):
                r = reqs[i]
                imgs = [c for c in out.images(row, ids) if len(c) == n_codes]
                paths = []
                for j, c in enumerate(imgs):
                    if single:
                        path = out_path if k_img == 0 else f"{stem}_{k_img}.png"
                    else:
                        path = os.path.join(out_dir, f"{r.get('id', i)}" + (f"_{j}" if j else "") + ".png")
                    write_png(model.codec.decode(np.asarray(c)[None])[0], path)
                    paths.append(path)
                    k_img += 1
                results[i] = {**r, "text": out.text(row, ids, model.tokenizer).strip(), "images": paths,
                              "codes": [np.asarray(c).tolist() for c in imgs]}
    meta = {"workdir": model.path, "step": model.step, "vq": model.vq_path, "image_tokens": n_codes,
            "cfg_scale": F.cfg_scale, "seed": F.seed, "settings": dataclasses.asdict(t2i), "results": results}
    json_path = stem + ".json" if single else os.path.join(out_dir, "generations.json")
    sp.atomic_write_text(json_path, json.dumps(meta, indent=1))
    for r in results:
        print(f"{r.get('prompt') or r.get('question')!r} -> {r['text']!r} {r['images']}")
    print(f"wrote {json_path}")


def console_main():
    """The ``uvjax-generate`` console script."""
    app.run(main)


if __name__ == "__main__":
    app.run(main)
