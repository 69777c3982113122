"""Small on-disk datasets for trainer tests: Smart Watch records whose images are already VQ codes.

The codes are a deterministic function of the rendered attributes (not a trained VQ), which is enough
to exercise the real pipeline (ArrayRecord → grain → packing) end to end in seconds.
"""
from __future__ import annotations

import os

import numpy as np

from uvjax.data import smartwatch as sw
from uvjax.data import storage
from uvjax.data.records import Record, Segment
from uvjax.data.tokenizer import template_texts, train_bpe


def _codes_for(attrs: dict, n: int, num_codes: int) -> np.ndarray:
    rng = np.random.default_rng(abs(hash((attrs["hour"], attrs["minute"], attrs["weather"]))) % (2 ** 32))
    return rng.integers(0, num_codes, n).astype(np.int32)


def make_code_dataset(root: str, *, num_images: int = 60, image_tokens: int = 16, num_codes: int = 64,
                      vocab_size: int = 400, seed: int = 0) -> dict:
    spec = sw.SmartWatchSpec(name="test", seed=seed, num_images=num_images)
    streams: dict[str, list[Record]] = {"understanding": [], "generation": []}
    for i in range(num_images):
        attrs, recs = sw.records_for_image(i, spec)
        codes = _codes_for(attrs, image_tokens, num_codes)
        for r in recs:
            segs = [Segment(s.role, s.kind, text=s.text) if s.kind == "text" else
                    Segment(s.role, "image", codes=codes) for s in r.segments]
            rec = Record(r.id, r.task, segs, r.attributes)
            streams["generation" if r.task == "generation" else "understanding"].append(rec)
    paths = {}
    for name, recs in streams.items():
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        storage.write_records(recs, d, "part", records_per_shard=50)
        paths[name] = d
    tok = train_bpe(list(sw.corpus_texts(spec, num_images=200)) + template_texts(), vocab_size=vocab_size)
    tok_dir = os.path.join(root, "tokenizer")
    tok.save(tok_dir)
    return {"paths": paths, "tokenizer": tok_dir, "vocab_size": tok.vocab_size}
