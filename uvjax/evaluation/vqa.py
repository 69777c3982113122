"""Smart Watch test records -> prompts -> batched decoding -> per-item answers.

Every VQA *turn* is evaluated (the reference scored only the first turn of the first 499 records):
turn k's prompt is the image plus the ground-truth conversation up to question k, exactly the
context that turn had in training. Captions are one prompt per caption record; generation prompts
are the user text of each generation record. Images reach the model as VQ codes (or features):
:func:`attach_codes` runs an ``encode_images`` callable once per distinct image.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from uvjax.data import smartwatch as sw
from uvjax.data.records import Record, Segment
from uvjax.data.tokenizer import ChatTemplate, TextTokenizer
from uvjax.inference.decode import DecodeOutput, DecodeSettings, Generator, encode_prompt, null_prompt


@dataclasses.dataclass
class Item:
    """One prompt to evaluate. ``kind``: vqa | caption | generation; ``attribute``: the VQA attribute;
    ``truth``: the ground-truth answer (VQA) or text; ``attrs``: the image's attributes."""
    kind: str
    record_id: str
    prompt: Record
    attrs: dict
    attribute: str | None = None
    truth: str | None = None
    mentioned: tuple[str, ...] = ()


def attach_codes(records: Sequence[Record], encode_images: Callable[[np.ndarray], np.ndarray],
                 batch: int = 64) -> list[Record]:
    """Replaces pixel images by the encoder's output (int codes [N] or float features [N, F]); one
    encoder call per distinct pixel array (the VQA and caption records of an image share it)."""
    distinct: dict[int, np.ndarray] = {}
    for r in records:
        for s in r.images():
            if s.pixels is not None:
                distinct.setdefault(id(s.pixels), s.pixels)
    keys = list(distinct)
    encoded: dict[int, np.ndarray] = {}
    for i in range(0, len(keys), batch):
        ks = keys[i:i + batch]
        out = np.asarray(encode_images(np.stack([distinct[k] for k in ks])))
        for k, o in zip(ks, out):
            encoded[k] = o
    res = []
    for r in records:
        segs = []
        for s in r.segments:
            if s.kind == "image" and s.pixels is not None:
                e = encoded[id(s.pixels)]
                s = (Segment(s.role, "image", features=e.astype(np.float32)) if e.dtype.kind == "f"
                     else Segment(s.role, "image", codes=e.reshape(-1).astype(np.int32)))
            segs.append(s)
        res.append(Record(r.id, r.task, segs, r.attributes))
    return res


def build_items(records: Sequence[Record]) -> list[Item]:
    """VQA items (one per turn), caption items and generation items of Smart Watch test records."""
    items: list[Item] = []
    for r in records:
        a = r.attributes
        ts = bool(a.get("time_seconds", False))
        if r.task == "vqa":
            questions = list(a.get("questions", []))
            k = 0
            for i, s in enumerate(r.segments):
                if s.role == "assistant" and s.kind == "text":
                    att = questions[k] if k < len(questions) else None
                    if att is None:
                        raise ValueError(f"record {r.id!r}: attributes['questions'] has no entry for turn {k}")
                    items.append(Item("vqa", r.id, Record(f"{r.id}/{k}", "vqa", list(r.segments[:i])), a,
                                      att, sw.answer(att, a, ts)))
                    k += 1
        elif r.task == "caption":
            user = [s for s in r.segments if s.role == "user"]
            truth = " ".join(s.text for s in r.segments if s.role == "assistant" and s.kind == "text")
            items.append(Item("caption", r.id, Record(r.id, "caption", user), a, truth=truth,
                              mentioned=tuple(a.get("mentioned", ()))))
        elif r.task == "generation":
            user = [s for s in r.segments if s.role == "user"]
            items.append(Item("generation", r.id, Record(r.id, "generation", user), a,
                              truth=" ".join(s.text for s in user if s.kind == "text"),
                              mentioned=tuple(a.get("mentioned", ()))))
    return items


def run_items(gen: Generator, tokenizer: TextTokenizer, template: ChatTemplate, items: Sequence[Item],
              settings: DecodeSettings, *, batch_size: int = 32, cfg_scale: float = 0.0, seed: int = 0,
              feature_dim: int = 0, progress: str | None = None) -> list[dict]:
    """Decodes every item's prompt; returns per item ``{"text": str, "images": [codes|features]}``.

    Every batch is padded to the longest prompt and the last one is filled with repeats, so all calls
    share one compiled shape. ``cfg_scale > 0`` adds each prompt's null
    twin (:func:`~uvjax.inference.decode.null_prompt`). ``progress``: a bar over the items with this label."""
    prompts = [encode_prompt(it.prompt, tokenizer, template, feature_dim=feature_dim) for it in items]
    nulls = ([encode_prompt(null_prompt(it.prompt), tokenizer, template, feature_dim=feature_dim)
              for it in items] if cfg_scale else None)
    order = list(range(len(items)))
    results: list[dict] = [None] * len(items)  # type: ignore[list-item]
    B = min(batch_size, len(items))
    longest = max(len(p["tokens"]) for p in prompts + (nulls or []))
    bar = None
    if progress:
        bar = tqdm(total=len(items), desc=progress, unit="item", dynamic_ncols=True)
    for bi, start in enumerate(range(0, len(order), B)):
        idx = order[start:start + B]
        fill = idx + [idx[-1]] * (B - len(idx))
        out: DecodeOutput = gen.generate([prompts[i] for i in fill], settings,
                                         null_prompts=[nulls[i] for i in fill] if nulls else None,
                                         cfg_scale=cfg_scale, seed=seed + bi, min_length=longest)
        for row, i in enumerate(idx):
            results[i] = {"text": out.text(row, gen.ids, tokenizer).strip(), "images": out.images(row, gen.ids)}
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return results


__all__ = ["Item", "attach_codes", "build_items", "run_items"]
