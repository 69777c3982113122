"""The Smart Watch source's stages (the first run): its fingerprints, the BPE tokenizer, the VQ tokenizer,
the pre-tokenised dataset and the reasoning records."""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
from tqdm import tqdm

from uvjax import interrupt
from uvjax.data import reasoning as rs
from uvjax.data import smartwatch as sw
from uvjax.data import storage
from uvjax.data.records import Record, Segment
from uvjax.data.tokenizer import template_texts, train_bpe
from uvjax.integrity_files import read_marker, write_marker
from uvjax.stage_log import fingerprint
from uvjax.stages.features import _as_encoder, pretokenise_split_features
from uvjax.stages.specs import (
    _reasoning_spec,
    _reasoning_tokenizer_parts,
    data_fp_parts,
    reasoning_enabled,
    train_split_spec,
)
from uvjax.towers.vq_codec import VQCodec  # the one VQ codec: jitted, fixed-shape chunks
from uvjax.training.vq_train import images_for, train_vq

_log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ stages
def build_tokenizer(sc, template_name: str, out: str) -> dict:
    spec = sw.SmartWatchSpec(name="train", seed=int(sc.data.seed), num_images=int(sc.data.num_train),
                             image_size=16, time_seconds=bool(sc.data.time_seconds),
                             generation_plan=bool(sc.data.get("generation_plan", False)))
    texts = list(sw.corpus_texts(spec, num_images=int(sc.tokenizer.corpus_images))) + template_texts()
    if reasoning_enabled(sc):  # the reasoning phrasings (with rationales, whatever the switch says)
        texts += list(rs.corpus_texts(_reasoning_spec(sc, 16), num_scenes=min(500, int(sc.reasoning.num_scenes))))
    tok = train_bpe(texts, vocab_size=int(sc.tokenizer.vocab_size))
    tok.save(out)
    return {"vocab_size": tok.vocab_size, "template": template_name}


def build_vq(sc, out: str) -> dict:
    vq_cfg = sc.vq.copy_and_resolve_references()
    with vq_cfg.unlocked():
        vq_cfg.data.image_size = int(sc.data.image_size)
    images = images_for(vq_cfg)
    _, metrics = train_vq(images, vq_cfg, out, progress=True)
    ev = metrics.get("eval", {})
    return {"psnr": ev.get("psnr"), "usage": ev.get("usage"), "train_time_s": metrics.get("train_time_s")}


def pretokenise_split(spec, codec: VQCodec, out_dir: str, *, chunk: int, batch: int, progress=None) -> dict:
    """Renders ``spec``'s records chunk by chunk, VQ-encodes every image once, writes per-stream shards,
    resumable by chunk: the one-tower case of ``stages_features.pretokenise_split_features``."""
    enc = _as_encoder(codec)  # one encoder object for both roles: each image is encoded once
    return pretokenise_split_features(spec, {"user": enc, "assistant": enc}, out_dir, chunk=chunk, batch=batch,
                                      progress=progress)


def build_dataset(sc, vq_dir: str, out: str, progress_factory=None) -> dict:
    codec = VQCodec(vq_dir)
    d = sc.data
    splits = sw.default_splits(seed=int(d.seed), num_train=int(d.num_train), num_test=int(d.num_test),
                               image_size=int(d.image_size))
    splits["train"] = train_split_spec(sc)
    info = {"image_tokens": None}
    for name, spec in splits.items():
        if d.time_seconds:
            spec = dataclasses.replace(spec, time_seconds=True)
        os.makedirs(os.path.join(out, name), exist_ok=True)
        bar = progress_factory(f"pretokenise {name}", spec.num_images) if progress_factory else None
        info[name] = pretokenise_split(spec, codec, os.path.join(out, name), chunk=int(d.records_per_shard),
                                       batch=int(d.encode_batch), progress=(bar.update if bar else None))
        if bar:
            bar.close()
    h, w = codec.cfg.grid(int(d.image_size))
    info.update(image_tokens=int(h * w), codebook_size=int(codec.cfg.codebook_size),
                code_dim=int(codec.cfg.code_dim))
    return info


def build_reasoning(sc, vq_dir: str, out: str) -> dict:
    """Pre-tokenises the reasoning records (``stages.reasoning``) into ``train-interleaved-*`` shards, chunk
    by chunk (a finished chunk has a marker and is skipped when a killed build resumes)."""
    codec = VQCodec(vq_dir)
    spec = _reasoning_spec(sc)
    chunk, batch = int(sc.data.records_per_shard), int(sc.data.encode_batch)
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    n = 0
    for c in range((spec.num_scenes + chunk - 1) // chunk):
        interrupt.check()
        marker = os.path.join(out, "train", f".reasoning-chunk{c:05d}.done")
        done = read_marker(marker) if os.path.exists(marker) else None  # damaged: reported, chunk redone
        if done is not None:
            n += done["records"]
            continue
        recs = list(rs.generate(spec, c * chunk, (c + 1) * chunk))
        pix = {id(s.pixels): s.pixels for r in recs for s in r.images()}
        keys, codes = list(pix), {}
        for i in range(0, len(keys), batch):
            enc = np.asarray(codec.encode(np.stack([pix[k] for k in keys[i:i + batch]])))
            codes.update({k: e.reshape(-1).astype(np.int32) for k, e in zip(keys[i:i + batch], enc)})
        recs = [Record(r.id, r.task, [Segment(s.role, "image", codes=codes[id(s.pixels)]) if s.kind == "image"
                                      else s for s in r.segments], r.attributes) for r in recs]
        prefix = f"train-{rs.STREAM}-c{c:05d}"
        for p in os.listdir(os.path.join(out, "train")):  # leftovers of a killed attempt at this chunk
            if p.startswith(prefix):
                os.remove(os.path.join(out, "train", p))
        storage.write_records(recs, os.path.join(out, "train"), prefix, records_per_shard=10 ** 9)
        write_marker(marker, {"records": len(recs)})
        n += len(recs)
    return {"records": n, "rationale": spec.rationale, "tasks": list(spec.tasks)}


# ------------------------------------------------------------------------------------------ runner
def _bar(desc: str, total: int):
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


class SmartWatchSource:
    """The records uvjax renders itself (``stages.data``, and ``stages.reasoning`` when on): the first run's
    source. Its fingerprints are those of the original VQ-VQ chain, so existing caches stay valid."""

    kind = "smartwatch"

    def __init__(self, sc):
        self.sc = sc

    def tokenizer_fp(self, cfg, base_part) -> str:
        sc = self.sc
        return fingerprint("tokenizer", sc.tokenizer, data_fp_parts(sc, for_tokenizer=True), cfg.data.template,
                           base_part, *_reasoning_tokenizer_parts(sc))

    def build_tokenizer(self, cfg, out: str) -> dict:
        return build_tokenizer(self.sc, cfg.data.template, out)

    def vq_fp(self) -> str:
        return fingerprint("vq", self.sc.vq, int(self.sc.data.image_size))

    def dataset_fp(self, kinds, vq_fp, tower_fp, feature_dtype) -> str:
        if "features" not in kinds.values():
            return fingerprint("dataset", data_fp_parts(self.sc), vq_fp)
        return fingerprint("dataset-features", data_fp_parts(self.sc), dict(kinds), vq_fp, tower_fp,
                           dict(dtype=feature_dtype) if feature_dtype else None)

    def train_paths(self, ds_dir: str) -> dict[str, tuple]:
        return {s: (os.path.join(ds_dir, "train", f"train-{s}-*.array_record"),)
                for s in ("understanding", "generation")}

    def test_split(self, ds_dir: str) -> str:
        return os.path.join(ds_dir, "test")
