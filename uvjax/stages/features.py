"""The pieces of the stage graph (``uvjax.stages.prepare``) for architectures with continuous (SigLIP/CLIP)
images: SigLIP-VQ, SigLIP-SigLIP, VQ-SigLIP — the SigLIP pretraining stage, the per-role pre-tokenisation of the
Smart Watch records, the encoders, evaluation helpers and the architecture presets. For the Smart Watch source
the graph is

    tokenizer (shared with vqvq)  →  vq (only when some image is codes; shared with vqvq)
                                  →  siglip (``uvjax.training.siglip_pretrain``, cached; or towers.*.path as given)
                                  →  dataset-features (pre-tokenisation, resumable by chunk)  →  LM

Pre-tokenisation runs both frozen towers once (PRODUCT decision 5): a *user* image (understanding input)
goes through the tower of ``model.image.input_kind`` and an *assistant* image (generation target) through
that of ``model.image.output_kind`` — for SigLIP-VQ user images become SigLIP layer −2 features and
assistant images VQ codes. Each distinct pixel array is encoded at most once per tower.

Features are stored as ``[N, F]`` arrays in the records' image segments, by default **float16**
(``stages.features.dtype``; ``float32`` also allowed): half the disk and read bandwidth, and a relative
rounding error of ≤ 2^-11 (≈5e-4), far below what separates two Smart Watch images; the sequence encoder
casts them back to float32 (``data/sequence.py``). Values beyond the float16 range would become inf, so the
pass refuses them instead of storing them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np

from uvjax import interrupt
from uvjax.data import smartwatch as sw
from uvjax.data import storage
from uvjax.data.records import Record, Segment
from uvjax.integrity_files import read_marker, write_marker
from uvjax.models.siglip import FeatureExtractor
from uvjax.models.unified import uses_features
from uvjax.pretokenise import store_features  # float16 with a finiteness check
from uvjax.stage_log import read_stage_log, stage_dir
from uvjax.stages.specs import train_split_spec
from uvjax.towers import encoders
from uvjax.towers.vq_codec import VQCodec
from uvjax.training.siglip_pretrain import train_siglip
from uvjax.weights.hf_siglip import load_vit

FEATURE_DTYPES = ("float16", "float32")
SIGLIP_FILE = "siglip.safetensors"


def needs_feature_stages(cfg) -> bool:
    im = cfg.model.image
    return uses_features(im)


# --------------------------------------------------------------------------------------------- encoders
class TowerEncoder:
    """The frozen SigLIP tower trained by the ``siglip`` stage: uint8 images -> float32 [B, N, F]."""

    kind = "features"

    def __init__(self, siglip_dir_or_file: str):
        path = siglip_dir_or_file
        if os.path.isdir(path):
            path = os.path.join(path, SIGLIP_FILE)
        self.cfg, params = load_vit(path)
        self._fx = FeatureExtractor(self.cfg, params)

    @property
    def feature_dim(self) -> int:
        return self.cfg.width

    @property
    def tokens(self) -> int:
        return self.cfg.feature_tokens

    def encode(self, images_u8: np.ndarray) -> np.ndarray:
        return self._fx(images_u8)


class CodesEncoder:
    """A VQ codec (``uvjax.towers.vq_codec.VQCodec`` or anything with ``encode(u8) -> int [B, N]``) tagged as codes."""

    kind = "codes"

    def __init__(self, codec):
        self.codec = codec

    def encode(self, images_u8: np.ndarray) -> np.ndarray:
        return np.asarray(self.codec.encode(images_u8), np.int32)


def _as_encoder(e):
    return e if getattr(e, "kind", None) in ("codes", "features") else CodesEncoder(e)


# ------------------------------------------------------------------------------------- pre-tokenisation


def pretokenise_split_features(spec, encoders: Mapping[str, object], out_dir: str, *, chunk: int, batch: int,
                               feature_dtype: str = "float16", progress=None) -> dict:
    """Like ``uvjax.stages.pretokenise_split`` with one encoder per role (``{"user": ..., "assistant": ...}``;
    each has ``kind`` "codes" | "features" and ``encode(uint8 [B,H,W,3])``). Renders ``spec``'s records
    chunk by chunk, encodes every distinct image once per encoder it needs, writes per-stream shards, and
    marks a chunk done last, so a killed pass resumes at the first unfinished chunk."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"stages.features.dtype={feature_dtype!r}; expected one of {FEATURE_DTYPES}")
    enc = {role: _as_encoder(e) for role, e in encoders.items()}
    for role in ("user", "assistant"):
        if role not in enc:
            raise ValueError(f"no encoder for {role} images")
    counts = {"understanding": 0, "generation": 0, "interleaved": 0}
    n_chunks = (spec.num_images + chunk - 1) // chunk
    for c in range(n_chunks):
        interrupt.check()
        marker = os.path.join(out_dir, f".{spec.name}-chunk{c:05d}.done")
        done = read_marker(marker) if os.path.exists(marker) else None  # damaged: reported, chunk redone
        if done is not None:
            for k, v in done.items():
                counts[k] += v
            if progress:
                progress(min(chunk, spec.num_images - c * chunk))
            continue
        lo, hi = c * chunk, min(spec.num_images, (c + 1) * chunk)
        per_image = [sw.records_for_image(spec.start_index + i, spec)[1] for i in range(lo, hi)]
        # distinct pixel arrays each encoder needs (vqa/caption/generation records share one array)
        need: dict[int, dict[int, np.ndarray]] = {}
        for recs in per_image:
            for r in recs:
                for s in r.images():
                    need.setdefault(id(enc[s.role]), {}).setdefault(id(s.pixels), s.pixels)
        encoded: dict[tuple[int, int], np.ndarray] = {}
        for e in {id(x): x for x in enc.values()}.values():
            pix = need.get(id(e), {})
            keys = list(pix)
            for i in range(0, len(keys), batch):
                out = np.asarray(e.encode(np.stack([pix[k] for k in keys[i:i + batch]])))
                for k, o in zip(keys[i:i + batch], out):
                    encoded[(id(e), k)] = o
        streams: dict[str, list] = {"understanding": [], "generation": [], "interleaved": []}
        for recs in per_image:
            for r in recs:
                segs = []
                for s in r.segments:
                    if s.kind != "image":
                        segs.append(Segment(s.role, s.kind, text=s.text))
                        continue
                    e = enc[s.role]
                    v = encoded[(id(e), id(s.pixels))]
                    segs.append(Segment(s.role, "image", codes=v.reshape(-1).astype(np.int32)) if e.kind == "codes"
                                else Segment(s.role, "image", features=store_features(v, feature_dtype, r.id)))
                streams[sw.stream_of(r)].append(Record(r.id, r.task, segs, r.attributes))
        chunk_counts = {}
        for name, recs in streams.items():
            if recs:
                prefix = f"{spec.name}-{name}-c{c:05d}"
                for p in os.listdir(out_dir):  # leftovers of a killed attempt at this chunk
                    if p.startswith(prefix):
                        os.remove(os.path.join(out_dir, p))
                storage.write_records(recs, out_dir, prefix, records_per_shard=10 ** 9)
            chunk_counts[name] = len(recs)
            counts[name] += len(recs)
        write_marker(marker, chunk_counts)
        if progress:
            progress(hi - lo)
    return counts


# ------------------------------------------------------------------------------------------------ stages
def build_siglip(sc, out: str) -> dict:
    scfg = sc.siglip.copy_and_resolve_references()
    with scfg.unlocked():
        scfg.data.image_size = int(sc.data.image_size)  # pretrain on the renders the dataset will hold
    _, metrics = train_siglip(scfg, out, progress=True)
    return {"retrieval": metrics["eval"], "train_time_s": metrics["train_time_s"],
            "feature_tokens": metrics["feature_tokens"], "feature_dim": metrics["feature_dim"]}


def build_feature_dataset(sc, kinds: Mapping[str, str], encoders: Mapping[str, object], out: str,
                          progress_factory=None) -> dict:
    """Pre-tokenises the Smart Watch splits of ``sc.data`` with one encoder per role (each with ``kind`` and
    ``encode``, e.g. ``uvjax.pretokenise.Encoder``); returns the record counts per split and stream. The
    caller (``uvjax.stages.prepare``) adds what the encoders imply (image tokens, codebook, feature width)."""
    d = sc.data
    splits = sw.default_splits(seed=int(d.seed), num_train=int(d.num_train), num_test=int(d.num_test),
                               image_size=int(d.image_size))
    splits["train"] = train_split_spec(sc)
    info: dict = {}
    for name, spec in splits.items():
        if d.time_seconds:
            spec = dataclasses.replace(spec, time_seconds=True)
        os.makedirs(os.path.join(out, name), exist_ok=True)
        bar = progress_factory(f"pretokenise {name}", spec.num_images) if progress_factory else None
        info[name] = pretokenise_split_features(spec, encoders, os.path.join(out, name),
                                                chunk=int(d.records_per_shard), batch=int(d.encode_batch),
                                                feature_dtype=str(sc.features.dtype),
                                                progress=(bar.update if bar else None))
        if bar:
            bar.close()
    info["kinds"] = dict(kinds)
    info["feature_dtype"] = str(sc.features.dtype)
    return info


# ---------------------------------------------------------------------------------------------- evaluation
def find_stage_dir(workdir: str, stage: str) -> str | None:
    """The last ``stage`` directory recorded in ``<workdir>/stages.jsonl`` (local; mirrored from gs://)."""
    return stage_dir(workdir, stage)


def evaluation_kwargs(workdir: str, cfg) -> dict:
    """Extra ``uvjax.evaluation.run.evaluate_run`` arguments for a run whose *understanding* images are SigLIP
    features: test images go through the run's tower, generated codes (SigLIP-VQ) through its VQ. Empty
    for VQ inputs (the evaluator's default VQ codec is right there, also for VQ-SigLIP)."""
    if cfg.model.image.input_kind != "features":
        return {}
    sg = find_stage_dir(workdir, "siglip")
    if sg is None:
        raise FileNotFoundError(f"no siglip stage recorded in {workdir}/stages.jsonl; cannot encode test images")
    if os.path.isdir(sg) and os.path.exists(os.path.join(sg, "config.json")):  # a given HF tower (towers.*.path)
        rec = [r for r in read_stage_log(workdir) if r.get("stage") == "siglip"][-1]
        tower = encoders.tower_encoder(sg, kind=str(rec.get("tower", "siglip"))).tower
    else:
        tower = TowerEncoder(sg)
    decode = None
    if cfg.model.image.output_kind == "codes":
        vq = find_stage_dir(workdir, "vq")
        if vq is None:
            raise FileNotFoundError(f"no vq stage recorded in {workdir}/stages.jsonl; cannot decode generated codes")
        decode = VQCodec(vq).decode
    else:
        def decode(codes):
            raise RuntimeError("continuous (feature) outputs have no pixel decoder")
    return {"encode_images": tower.encode, "decode_codes": decode}


# --------------------------------------------------------------------------------------------- configs


