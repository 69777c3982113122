"""The imported-data source of the stage graph (``uvjax.stages.prepare``): other people's records.

Selected by ``stages.source.kind = "imported"``: ``stages.source.train`` (and ``.test`` for a held-out split)
name LLaVA/ShareGPT4V JSON files, caption files (``format="caption_generation"``), UnifiedVisual/HF parquet
(``format="unifiedvisual"``), or shards already written by ``python -m uvjax.data.formats convert``
(``format="shards"``); ``image_dir`` / ``test_image_dir`` are their image folders. Every node is cached by
fingerprint in ``<cache_dir>/<stage>-<fp>/`` as for the Smart Watch source (local or ``gs://``):

    import-train, import-test   importers.convert (input files fingerprinted by path, size and mtime / generation)
    tokenizer                   BPE trained on the imported training texts, or the base model's
    vq                          ``stages.source.vq`` (e.g. a converted LlamaGen VQ-16) as given, else
                                uvjax's VQ (``stages.vq``) trained on the imported training images
    (siglip / clip)             ``towers.siglip|clip.path`` as given, for feature architectures
    dataset                     ``uvjax.pretokenise`` of both splits (resumable by chunk)
    lengths                     each pre-tokenised record's length and target positions under the run's
                                template; the start of every run reports how many records ``seq_len``
                                truncates or strips of their targets, per stream and reason

The user's data is never swapped for anything else: the config's streams point at these shards, and a
config that sets ``data.streams.*.paths`` itself is refused while the stages build (``uvjax.stages``).
Skipped records (``on_error="skip"``) are counted per reason at import and at pre-tokenisation and
printed; nothing else is dropped.
"""
from __future__ import annotations

import fnmatch
import glob
import os

import numpy as np

from uvjax import pretokenise as pt
from uvjax import storage_paths as sp
from uvjax.data import images as image_io
from uvjax.data import sequence as sq
from uvjax.data.importers.convert import convert
from uvjax.data.storage import RecordReader
from uvjax.data.tasks import stream_of
from uvjax.data.tokenizer import TextTokenizer, get_template
from uvjax.models.unified import sequence_feature_dim
from uvjax.stage_log import fingerprint
from uvjax.stages.cache import cached_stage
from uvjax.towers.vq_codec import VQ_FILE

FORMATS = ("llava", "caption_generation", "unifiedvisual", "shards")


def is_imported(sc) -> bool:
    src = sc.get("source")
    return src is not None and str(src.get("kind", "smartwatch")) == "imported"


def _files(spec: str, fmt: str) -> list[str]:
    """The input files of ``stages.source.train``/``test``: comma-separated files, directories or globs,
    local or ``gs://``."""
    items = [s for s in str(spec).split(",") if s.strip()]
    pats = {"unifiedvisual": ("*.parquet",), "shards": ("*.array_record",)}.get(fmt, ("*.json", "*.jsonl"))
    out: list[str] = []
    for it in items:
        it = it.strip()
        it = sp.resolve(it) if sp.is_remote(it) else os.path.abspath(os.path.expanduser(it))
        if any(ch in it for ch in "*?["):
            if sp.is_remote(it):
                base, pat = it.rsplit("/", 1)
                found = sorted(str(p) for p in sp.as_path(base).glob(pat))
            else:
                found = sorted(glob.glob(it))
        elif sp.isdir(it):
            found = sorted(sp.join(it, n) for n in sp.listdir(it) if any(fnmatch.fnmatch(n, q) for q in pats))
        else:
            found = [it] if sp.exists(it) else []
        if not found:
            raise FileNotFoundError(f"stages.source: no {fmt} input found at {it!r}")
        out += [p for p in found if p not in out]
    return out


def _file_stamp(paths: list[str]) -> list:
    """What identifies each input's content: (path, size, mtime) locally, (URL, size, generation) on gs://."""
    return [[p, *sp.remote_fingerprint(p)] if sp.is_remote(p) else [p, os.path.getsize(p), os.stat(p).st_mtime_ns]
            for p in paths]


def _import_split(src, split: str, cache: str, log, say) -> tuple[str, str, dict]:
    """(shard directory, fingerprint, import counts) of one split."""
    fmt = str(src.format)
    if fmt not in FORMATS:
        raise ValueError(f"stages.source.format={fmt!r}; expected one of {FORMATS}")
    spec = src.train if split == "train" else src.test
    files = _files(spec, fmt)
    image_dir = str(src.image_dir if split == "train" else (src.test_image_dir or src.image_dir))
    image_dir = sp.resolve(os.path.expanduser(image_dir)) if image_dir else ""
    if fmt == "shards":  # converted by the user: used in place
        d = sp.parent(files[0]) if sp.is_remote(files[0]) else os.path.dirname(files[0])
        return d, fingerprint("shards", _file_stamp(files), image_dir), {"files": files}
    fp = fingerprint("import", fmt, _file_stamp(files), image_dir, str(src.on_error), int(src.seed))

    def build(out: str) -> dict:
        for p in os.listdir(out):  # a killed conversion starts over (it is one streaming pass)
            os.remove(os.path.join(out, p))
        opts = {"seed": int(src.seed)} if fmt == "caption_generation" else {}
        # gs:// inputs are read from local copies (the JSON/parquet readers open files); a gs:// image folder
        # stays remote (pre-tokenisation reads it), its files are checked there, not at import
        local = [sp.local_copy(f, sp.remote_cache_dir()) for f in files]
        res = convert(local, out, format=fmt, image_dir=image_dir, prefix=split,
                              on_error=str(src.on_error), **opts)
        return {"counts": res["counts"], "paths": res["paths"], "image_dir": image_dir, "files": files}

    out, info = cached_stage(f"import-{split}", fp, cache, build, log, say)
    counts = info.get("counts", {})
    if say:
        sk = counts.get("skipped") or {}
        msg = (f"import-{split}: {counts.get('read', '?')} records read, {counts.get('kept', '?')} kept"
               + (f", SKIPPED {sum(sk.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(sk.items())) if sk else ""))
        say(msg)
    return out, fp, counts


def _shards(d: str, split: str | None = None) -> list[str]:
    pat = f"{split}-*.array_record" if split else "*.array_record"
    if sp.is_remote(d):
        return sorted(str(p) for p in sp.as_path(d).glob(pat))
    return sorted(glob.glob(os.path.join(d, pat)))


def _texts(shards: list[str], limit: int = 200_000) -> list[str]:
    out = []
    for rec in RecordReader(shards):
        out += [s.text for s in rec.segments if s.kind == "text" and s.text]
        if len(out) >= limit:
            break
    return out


def _train_images(shards: list[str], n: int, size: int, resize: str) -> np.ndarray:
    """Up to ``n`` distinct training images, loaded and preprocessed as the pre-tokenisation will."""
    root = pt.image_root_of(shards)
    seen, imgs = set(), []
    for rec in RecordReader(shards):
        for s in rec.images():
            key = s.path if s.path is not None else id(s.pixels)
            if key in seen:
                continue
            seen.add(key)
            try:
                px = (image_io.read_image_file(os.path.join(root, s.path) if root else s.path, image_io.ImagePolicy())[0]
                      if s.path is not None else np.asarray(s.pixels))
            except image_io.ImageError:
                continue  # the pre-tokenisation pass names (or counts) bad images; the VQ just needs good ones
            imgs.append(image_io.preprocess(px, size, resize))
            if len(imgs) >= n:
                return np.stack(imgs)
    if not imgs:
        raise ValueError(f"no readable training image in {shards[:3]}... to train the VQ tokenizer on")
    return np.stack(imgs)


class ImportedSource:
    """The records of ``stages.source`` (imported): runs the import nodes on construction; then serves the
    tokenizer corpus, VQ training images and the pre-tokenisation of both splits to ``uvjax.stages.prepare``."""

    kind = "imported"

    def __init__(self, sc, cache: str, log, say):
        src = sc.source
        if not str(src.train):
            raise ValueError("stages.source.kind='imported' needs stages.source.train (a LLaVA JSON, parquet, or "
                             "a directory of converted shards)")
        self.sc, self.src = sc, src
        self.train_dir, self.train_fp, self.counts = _import_split(src, "train", cache, log, say)
        self.test_dir = self.test_fp = None
        test_counts: dict = {}
        if str(src.test):
            self.test_dir, self.test_fp, test_counts = _import_split(src, "test", cache, log, say)
        # format "shards": exactly the files the user named; else every shard the import wrote
        self.split_shards = {"train": self.counts.get("files") or _shards(self.train_dir),
                             "test": (test_counts.get("files") or _shards(self.test_dir)) if self.test_dir else []}
        self.train_shards = self.split_shards["train"]
        if not self.train_shards:
            raise ValueError(f"import-train wrote no records ({self.train_dir}); see the skip counts above")
        self.vq_resize = str(src.resize) or "center_crop"

    def stage_dirs(self, *splits: str) -> dict[str, str | None]:
        """``{"import-<split>": directory}`` of the import stages of ``splits`` (None for shards the user
        converted: used in place, not a stage): the input stages of the tokenizer, VQ and dataset stages."""
        shards = str(self.src.format) == "shards"
        dirs = {"train": self.train_dir, "test": self.test_dir}
        return {f"import-{s}": None if shards else dirs[s] for s in splits}

    def tokenizer_fp(self, cfg, base_part) -> str:
        return fingerprint("tokenizer-imported", self.sc.tokenizer, self.train_fp, cfg.data.template, base_part)

    def texts(self) -> list[str]:
        return _texts(self.train_shards)

    def vq_fp(self) -> str:
        return fingerprint("vq-imported", self.sc.vq, int(self.sc.data.image_size), self.train_fp, self.vq_resize,
                           int(self.src.vq_images))

    def vq_images(self, vq_cfg) -> tuple[np.ndarray, object]:
        """Training images for the VQ stage and its config with num_train/num_eval set to what was found."""
        size = int(self.sc.data.image_size)
        n = int(self.src.vq_images) or int(vq_cfg.data.num_train + vq_cfg.data.num_eval)
        images = _train_images(self.train_shards, n, size, self.vq_resize)
        with vq_cfg.unlocked():  # held-out images for its PSNR: the last num_eval (at most a quarter)
            vq_cfg.data.num_eval = max(1, min(int(vq_cfg.data.num_eval), len(images) // 4))
            vq_cfg.data.num_train = len(images) - int(vq_cfg.data.num_eval)
            if int(vq_cfg.train.batch_size) > int(vq_cfg.data.num_train):  # a small sample: smaller batches
                print(f"[stage] vq: {len(images)} distinct training images; VQ batch size "
                      f"{vq_cfg.train.batch_size} -> {vq_cfg.data.num_train}", flush=True)
                vq_cfg.train.batch_size = max(1, int(vq_cfg.data.num_train))
        return images, vq_cfg

    def dataset_fp(self, kinds, vq_fp, tower_fp, feature_dtype) -> str:
        feats = "features" in kinds.values()
        return fingerprint("dataset-imported", self.train_fp, self.test_fp, vq_fp, int(self.sc.data.image_size),
                           str(self.src.resize), str(self.src.on_error), int(self.sc.data.records_per_shard),
                           dict(kinds) if feats else None, tower_fp, feature_dtype if feats else None)

    def pretokenise(self, encoders, out: str, feature_dtype: str, progress_factory=None) -> dict:
        info = {}
        for split in ("train", "test"):
            shards = self.split_shards[split]
            if not shards:
                continue
            bar = progress_factory(f"pretokenise {split}", len(RecordReader(shards))) if progress_factory else None
            info[split] = pt.pretokenise_shards(shards, encoders, os.path.join(out, split), split=split,
                                                chunk=int(self.sc.data.records_per_shard),
                                                batch=int(self.sc.data.encode_batch), on_error=str(self.src.on_error),
                                                feature_dtype=feature_dtype, progress=bar.update if bar else None)
            if bar:
                bar.close()
        return info

    def train_paths(self, ds_dir: str) -> dict[str, tuple]:
        return {s: tuple(_shards(os.path.join(ds_dir, "train"), f"train-{s}"))
                for s in ("understanding", "generation", "interleaved")}

    def test_split(self, ds_dir: str) -> str | None:
        d = os.path.join(ds_dir, "test")
        return d if self.test_dir is not None and os.path.isdir(d) else None


def given_vq(path: str, log) -> tuple[str, str]:
    """(vq.safetensors path, fingerprint) of a VQ tokenizer used as given (logged as the ``vq`` stage)."""
    p = os.path.abspath(os.path.expanduser(path))
    f = os.path.join(p, VQ_FILE) if os.path.isdir(p) else p
    if not os.path.isfile(f):
        raise FileNotFoundError(f"stages.source.vq={path!r}: no {VQ_FILE} there")
    fp = fingerprint("vq-file", _file_stamp([f]))
    log.write(stage="vq", fingerprint=fp, reused=True, seconds=0.0, path=f)
    return f, fp


def given_tower_fp(name: str, tower) -> list:
    tp = os.path.abspath(os.path.expanduser(str(tower.path)))
    stamp = _file_stamp(sorted(glob.glob(os.path.join(tp, "*"))) if os.path.isdir(tp) else [tp])
    return [name, stamp, int(tower.get("select_layer", -2)), bool(tower.get("feature_post_norm", False))]


def given_tower(cfg):
    """(name, config) of a pretrained ``towers.clip`` / ``towers.siglip`` with a ``path``, or (None, None)."""
    towers = cfg.get("towers") or {}
    for name in ("clip", "siglip"):
        t = towers.get(name)
        if t is not None and str(t.get("path", "")):
            return name, t
    return None, None


# ------------------------------------------------------------------------------------------ lengths
def record_lengths(records, tokenizer, template, seq_len: int, feature_dim: int = 0) -> dict:
    """Per stream: how many records ``seq_len`` leaves whole, truncates (text cut), strips of an image
    target (an assistant image cut off) or drops (no target left)."""
    cfg = sq.SequenceConfig(seq_len=10 ** 9, check_tasks=False, feature_dim=feature_dim)
    out: dict = {}
    for rec in records:
        enc = sq.encode_record(rec, tokenizer, template, cfg, pad=False)
        a = enc.arrays
        n = int(enc.length)
        it = np.flatnonzero(a["image_target"])
        tt = np.flatnonzero(a["text_target"])
        s = out.setdefault(stream_of(rec), {"records": 0, "ok": 0, "truncated": 0, "image_target_lost": 0,
                                             "dropped": 0, "max_length": 0})
        s["records"] += 1
        s["max_length"] = max(s["max_length"], n)
        if n <= seq_len:
            s["ok"] += 1
            continue
        first_target = min([int(x[0]) for x in (it, tt) if x.size] or [n])
        if first_target >= seq_len:
            s["dropped"] += 1
        elif it.size and int(it[-1]) >= seq_len - 1:  # an image cut moves before its <boi>: its codes are lost
            s["image_target_lost"] += 1
        else:
            s["truncated"] += 1
    return out


def length_report(cfg, ds_dir: str, tok_dir: str, cache: str, log, inputs: dict | None = None) -> dict:
    """Per split and stream, how many records ``train.seq_len`` cuts (the ``lengths`` stage); ``inputs``: the
    input stages (dataset, tokenizer) whose content ``DONE.json`` records (``uvjax.stages.cached_stage``)."""
    seq_len = int(cfg.train.seq_len)
    im = cfg.model.image
    fdim = sequence_feature_dim(im)
    fp = fingerprint("lengths", ds_dir, tok_dir, str(cfg.data.template), cfg.data.get("system_prompt"), seq_len)

    def build(out: str) -> dict:
        tok = TextTokenizer.load(tok_dir)
        template = get_template(cfg.data.template, cfg.data.get("system_prompt"))
        res = {"seq_len": seq_len}
        for split in ("train", "test"):
            shards = _shards(os.path.join(ds_dir, split))
            if shards:
                res[split] = record_lengths(RecordReader(shards), tok, template, seq_len, fdim)
        return res

    _, info = cached_stage("lengths", fp, cache, build, log, None, inputs=inputs)
    return info


def format_length_report(rep: dict, seq_len: int) -> str:
    lines, bad = [], False
    for split in ("train", "test"):
        for stream, s in sorted((rep.get(split) or {}).items()):
            lost = s["truncated"] + s["image_target_lost"] + s["dropped"]
            bad |= lost > 0
            lines.append(f"  {split}/{stream}: {s['records']} records, longest {s['max_length']} tokens; at "
                         f"seq_len={seq_len}: {s['ok']} whole, {s['truncated']} text cut, {s['image_target_lost']} "
                         f"lose an image target, {s['dropped']} dropped (no target left)")
    head = (f"WARNING: train.seq_len={seq_len} cuts records (counted below); raise --config.train.seq_len to keep them"
            if bad else f"sequence lengths: every record fits train.seq_len={seq_len}")
    return "\n".join([head] + lines)
