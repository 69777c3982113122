"""``python -m uvjax.integrations.geneval --workdir=RUN (--prompts=FILE.jsonl | --smartwatch) --out=DIR [--n=4]``

Writes text-to-image samples in GenEval's layout, so GenEval's own scorer (``evaluation/evaluate_images.py``,
which reads exactly this tree) or any tool built for it can read a uvjax run's images::

    DIR/00000/metadata.jsonl      the prompt's metadata: one JSON object (GenEval: tag, include, prompt, ...)
    DIR/00000/samples/0000.png    n samples per prompt, drawn with run.generate_batch
    DIR/00001/...

``--prompts``: a JSONL file with one object per line holding at least ``"prompt"`` (GenEval's
``evaluation_metadata.jsonl`` is such a file); each line is copied unchanged as the folder's metadata.
``--smartwatch``: the generation prompts of the run's Smart Watch test split (the split ``uvjax.evaluate``
scores); their metadata is ``{"tag": "smartwatch", "prompt", "attributes": {attribute: value, ...} (the values
the prompt mentions), "record_id"}``.

Sampling: ``--cfg_scale`` (classifier-free guidance), ``--temperature`` / ``--top_k`` of the image codes, and
``--seed``: prompt ``p``'s samples are ``run.generate(p, n=n, seed=seed, ...)`` (every prompt is its own decoding
call, so a sample does not depend on which other prompts were exported with it). Images are written at the
run's image size; ``--resize=S`` also scales them to S x S (bicubic) for detectors that expect larger images.
A folder whose metadata and n samples are already there is kept (an interrupted export resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

from PIL import Image
from tqdm import tqdm

import uvjax
from uvjax import storage_paths as sp
from uvjax.api import image_size_of
from uvjax.data import smartwatch as sw
from uvjax.evaluation.run import test_spec
from uvjax.inference.decode import find_vq
from uvjax.inference.loading import load_config


def read_prompts(path: str) -> list[dict]:
    """The metadata objects of a GenEval-style JSONL prompt file (each with a string ``prompt``)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e}); expected one object per line with a \"prompt\"") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise ValueError(f"{path}:{n}: expected a JSON object with a non-empty string \"prompt\", got "
                                 f"{line.strip()[:120]!r}")
            out.append(obj)
    if not out:
        raise ValueError(f"{path}: no prompts (expected JSON lines such as {{\"prompt\": \"a photo of a cat\"}})")
    return out


def smartwatch_prompts(workdir: str, num_images: int | None = None) -> list[dict]:
    """GenEval-style metadata of the generation prompts of the run's Smart Watch test split."""
    wd = sp.resolve(workdir)
    cfg = load_config(wd)
    vq_path, _ = find_vq(wd, cfg)
    spec = test_spec(cfg, num_images, image_size_of(wd, cfg, vq_path))
    out = []
    for r in sw.generate(spec):
        if r.task != "generation":
            continue
        a = r.attributes
        prompt = " ".join(s.text for s in r.segments if s.role == "user" and s.kind == "text")
        attrs = {m: sw.answer(m, a, bool(a.get("time_seconds"))) for m in a.get("mentioned", ())}
        out.append({"tag": "smartwatch", "prompt": prompt, "attributes": attrs, "record_id": r.id})
    return out


def _done(folder: str, meta_line: str, n: int) -> bool:
    try:
        with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
            same = f.read() == meta_line
    except OSError:
        return False
    return same and all(os.path.exists(os.path.join(folder, "samples", f"{k:04d}.png")) for k in range(n))


def export(run, prompts: Sequence[dict], out: str, *, n: int = 4, cfg_scale: float = 0.0, temperature: float = 1.0,
           top_k: int = 0, seed: int = 0, resize: int = 0, chunk: int = 8, progress: bool = False) -> dict:
    """Writes ``prompts`` (metadata dicts with ``"prompt"``) in GenEval's layout under ``out``; ``run`` is a
    :class:`uvjax.api.Model`. Returns a summary: folders written / kept, samples per folder, prompts with fewer
    than ``n`` images (the model closed its answer without a complete image)."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if not run.can_generate:
        raise ValueError(f"{run.path}: this run cannot draw images (no VQ decoder, or feature outputs)")
    os.makedirs(out, exist_ok=True)
    lines = [json.dumps(p, ensure_ascii=False) + "\n" for p in prompts]
    todo = [i for i in range(len(prompts)) if not _done(os.path.join(out, f"{i:05d}"), lines[i], n)]
    short: dict[str, int] = {}
    bar = None
    if progress:
        bar = tqdm(total=len(todo), desc="geneval export", unit="prompt", dynamic_ncols=True)
    for start in range(0, len(todo), chunk):
        idx = todo[start:start + chunk]
        images = run.generate_batch([prompts[i]["prompt"] for i in idx], n=n, cfg_scale=cfg_scale,
                                    temperature=temperature, top_k=top_k, seed=seed)
        for i, imgs in zip(idx, images):
            folder = os.path.join(out, f"{i:05d}")
            tmp = folder + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "samples"))
            with open(os.path.join(tmp, "metadata.jsonl"), "w", encoding="utf-8") as f:
                f.write(lines[i])
            for k, im in enumerate(imgs):
                if resize:
                    im = im.resize((resize, resize), Image.Resampling.BICUBIC)
                im.save(os.path.join(tmp, "samples", f"{k:04d}.png"))
            if len(imgs) < n:
                short[f"{i:05d}"] = len(imgs)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)  # a folder appears whole or not at all
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return {"out": out, "prompts": len(prompts), "written": len(todo), "kept": len(prompts) - len(todo), "n": n,
            "fewer_images": short, "image_size": resize or run.image_size, "cfg_scale": cfg_scale,
            "temperature": temperature, "top_k": top_k, "seed": seed}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m uvjax.integrations.geneval",
                                description="Write a run's text-to-image samples in GenEval's folder layout")
    p.add_argument("--workdir", required=True, help="uvjax run (or export) directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="JSONL, one {\"prompt\": ...} object per line (GenEval metadata)")
    src.add_argument("--smartwatch", action="store_true", help="the run's Smart Watch test generation prompts")
    p.add_argument("--num_images", type=int, default=None, help="--smartwatch: first N test images")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--cfg_scale", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0, help="image code temperature")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resize", type=int, default=0, help="also scale samples to S x S pixels (0: run's size)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    prompts = read_prompts(a.prompts) if a.prompts else smartwatch_prompts(a.workdir, a.num_images)
    run = uvjax.load(a.workdir, step=a.step)
    summary = export(run, prompts, a.out, n=a.n, cfg_scale=a.cfg_scale, temperature=a.temperature, top_k=a.top_k,
                     seed=a.seed, resize=a.resize, progress=True)
    print(json.dumps(summary))
    return summary


def console_main() -> None:
    """``uvjax-geneval`` (a console script exits with what its function returns: None here)."""
    main()


if __name__ == "__main__":
    console_main()
