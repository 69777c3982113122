"""The first run's cached stages: tokenizer → VQ tokenizer → pre-tokenised dataset → LM → evaluation.

Each stage's output lives in ``<cache_dir>/<stage>-<fingerprint>/`` where the fingerprint hashes the
config that produced it and the fingerprints of its inputs. A finished stage writes ``DONE.json``
last (after its files are complete), so a killed stage is rebuilt and a finished one is reused by the
next run — and by other configs that share it (e.g. vqvq and siglipvq share the dataset and the text
tokenizer). Every decision is appended to ``<workdir>/stages.jsonl`` (stage, fingerprint, reused or
built, seconds), which is also how tests check what was rebuilt.

The pre-tokenisation pass renders the Smart Watch records image by image, runs the frozen VQ encoder
over them in batches and stores codes in the records (ArrayRecord), so the train step never runs a
frozen tower. It is resumable by chunk: finished chunks have their own marker and are skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

import ml_collections as mlc
import numpy as np

STAGES_VERSION = 1  # bump when a stage's output format changes


def fingerprint(*parts: Any) -> str:
    blob = json.dumps([STAGES_VERSION, *[_jsonable(p) for p in parts]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _jsonable(x):
    if isinstance(x, mlc.ConfigDict):
        return json.loads(x.to_json_best_effort(sort_keys=True))
    return x


def stages_config() -> mlc.ConfigDict:
    """Defaults for ``config.stages`` (the LM config embeds it)."""
    from uvjax.config import load_config_file
    vq_config = lambda preset: load_config_file("vq_tokenizer", preset)
    c = mlc.ConfigDict()
    c.build = True  # run the stages; False: use config.data paths and config.data.tokenizer as given
    c.cache_dir = ""  # "" = <parent of workdir>/cache
    c.data = mlc.ConfigDict(dict(seed=0, num_train=4000, num_test=500, image_size=128, time_seconds=False,
                                 records_per_shard=1000, encode_batch=64))
    c.tokenizer = mlc.ConfigDict(dict(vocab_size=2048, corpus_images=2000))
    c.vq = vq_config("tiny")
    c.evaluate = mlc.ConfigDict(dict(enabled=True, quick=False))
    return c


class StageLog:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "stages.jsonl")
        os.makedirs(workdir, exist_ok=True)

    def write(self, **rec):
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **rec}) + "\n")


def read_stage_log(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "stages.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def cached_stage(name: str, fp: str, cache_dir: str, build: Callable[[str], dict], log: StageLog,
                 progress=None) -> tuple[str, dict]:
    """Returns (directory, info). Builds into a temporary directory and renames it when complete."""
    out = os.path.join(cache_dir, f"{name}-{fp}")
    done = os.path.join(out, "DONE.json")
    t0 = time.time()
    if os.path.exists(done):
        with open(done) as f:
            info = json.load(f)
        log.write(stage=name, fingerprint=fp, reused=True, seconds=0.0, path=out)
        if progress:
            progress(f"{name}: reused {out}")
        return out, info
    work = out + ".partial"
    os.makedirs(work, exist_ok=True)  # a .partial left by a killed run is resumed (chunk markers)
    if progress:
        progress(f"{name}: building {out}")
    info = build(work) or {}
    info = {**info, "fingerprint": fp, "seconds": time.time() - t0}
    with open(os.path.join(work, "DONE.json"), "w") as f:
        json.dump(info, f, indent=1)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(work, out)
    log.write(stage=name, fingerprint=fp, reused=False, seconds=info["seconds"], path=out)
    return out, info


# ------------------------------------------------------------------------------------------ stages
def build_tokenizer(sc, template_name: str, out: str) -> dict:
    from uvjax.data import smartwatch as sw
    from uvjax.data.tokenizer import template_texts, train_bpe
    spec = sw.SmartWatchSpec(name="train", seed=int(sc.data.seed), num_images=int(sc.data.num_train),
                             image_size=16, time_seconds=bool(sc.data.time_seconds))
    texts = list(sw.corpus_texts(spec, num_images=int(sc.tokenizer.corpus_images))) + template_texts()
    tok = train_bpe(texts, vocab_size=int(sc.tokenizer.vocab_size))
    tok.save(out)
    return {"vocab_size": tok.vocab_size, "template": template_name}


def build_vq(sc, out: str) -> dict:
    from uvjax.training.vq_train import images_for, train_vq
    vq_cfg = sc.vq.copy_and_resolve_references()
    with vq_cfg.unlocked():
        vq_cfg.data.image_size = int(sc.data.image_size)
    images = images_for(vq_cfg)
    _, metrics = train_vq(images, vq_cfg, out, progress=True)
    ev = metrics.get("eval", {})
    return {"psnr": ev.get("psnr"), "usage": ev.get("usage"), "train_time_s": metrics.get("train_time_s")}


from uvjax.inference.decode import VQCodec  # noqa: E402  (the one VQ codec: jitted, fixed-shape chunks)


def pretokenise_split(spec, codec: VQCodec, out_dir: str, *, chunk: int, batch: int, progress=None) -> dict:
    """Renders ``spec``'s records chunk by chunk, VQ-encodes every image once, writes per-stream shards,
    resumable by chunk: the one-tower case of ``stages_features.pretokenise_split_features``."""
    from uvjax.stages_features import _as_encoder, pretokenise_split_features
    enc = _as_encoder(codec)  # one encoder object for both roles: each image is encoded once
    return pretokenise_split_features(spec, {"user": enc, "assistant": enc}, out_dir, chunk=chunk, batch=batch,
                                      progress=progress)


def build_dataset(sc, vq_dir: str, out: str, progress_factory=None) -> dict:
    from uvjax.data import smartwatch as sw
    codec = VQCodec(vq_dir)
    d = sc.data
    splits = sw.default_splits(seed=int(d.seed), num_train=int(d.num_train), num_test=int(d.num_test),
                               image_size=int(d.image_size))
    info = {"image_tokens": None}
    for name, spec in splits.items():
        if d.time_seconds:
            import dataclasses
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


# ------------------------------------------------------------------------------------------ runner
def _bar(desc: str, total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def prepare(cfg, workdir: str, *, progress: bool = True) -> tuple[mlc.ConfigDict, dict]:
    """Builds or reuses the stages before the LM; returns the config pointed at their outputs
    (tokenizer, data shards, image token count) and a summary of the stage paths."""
    from uvjax.stages_features import needs_feature_stages, prepare_features
    if needs_feature_stages(cfg):  # SigLIP variants: + the tower stage, per-role encoding
        return prepare_features(cfg, workdir, progress=progress)
    sc = cfg.stages
    cache = os.path.abspath(sc.cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache"))
    os.makedirs(cache, exist_ok=True)
    log = StageLog(workdir)
    say = (lambda m: print(f"[stage] {m}", flush=True)) if progress else None
    data_fp_parts = dict(sc.data)
    from uvjax.weights.pretrained import pretrained_spec, save_base_tokenizer
    base = pretrained_spec(cfg)
    tok_fp = fingerprint("tokenizer", sc.tokenizer, data_fp_parts, cfg.data.template,
                         _jsonable(cfg.model.get("pretrained")) if base else None)
    build_tok = (lambda out: save_base_tokenizer(cfg, out)) if base else \
        (lambda out: build_tokenizer(sc, cfg.data.template, out))
    tok_dir, tok_info = cached_stage("tokenizer", tok_fp, cache, build_tok, log, say)
    vq_fp = fingerprint("vq", sc.vq, int(sc.data.image_size))
    vq_dir, vq_info = cached_stage("vq", vq_fp, cache, lambda out: build_vq(sc, out), log, say)
    ds_fp = fingerprint("dataset", data_fp_parts, vq_fp)
    ds_dir, ds_info = cached_stage("dataset", ds_fp, cache,
                                   lambda out: build_dataset(sc, vq_dir, out, _bar if progress else None), log, say)
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.tokenizer = tok_dir
        for stream in ("understanding", "generation"):
            cfg.data.streams[stream].paths = (os.path.join(ds_dir, "train", f"train-{stream}-*.array_record"),)
        cfg.data.image_tokens = int(ds_info["image_tokens"])
        if "codes" in (cfg.model.image.input_kind, cfg.model.image.output_kind):
            cfg.model.image.codebook_from = vq_dir  # fresh runs start their code vectors from the VQ's
        if cfg.model.image.num_codes != ds_info["codebook_size"] or cfg.model.image.code_dim != ds_info["code_dim"]:
            raise ValueError(f"model.image.num_codes/code_dim ({cfg.model.image.num_codes}/{cfg.model.image.code_dim}) "
                             f"must match the VQ tokenizer ({ds_info['codebook_size']}/{ds_info['code_dim']}): "
                             f"set stages.vq.model.codebook_size/code_dim or the model's")
        if cfg.model.vocab_size < tok_info["vocab_size"]:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < tokenizer vocab {tok_info['vocab_size']}")
    return cfg, {"tokenizer": tok_dir, "vq": vq_dir, "dataset": ds_dir, "vq_metrics": vq_info,
                 "test_split": os.path.join(ds_dir, "test")}
