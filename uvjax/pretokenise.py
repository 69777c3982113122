"""Pre-tokenisation of imported data: record shards with image paths/pixels -> shards with codes/features.

``python -m uvjax.data.formats convert`` turns a LLaVA/ShareGPT4V JSON, caption file or parquet into
ArrayRecord shards whose images are still ``path`` (relative to the import's image folder, recorded
absolute in ``import_manifest.json``) or ``pixels`` segments. The train step never runs a frozen tower
(PRODUCT decision 5), so this pass runs them once:

- each record's images are loaded (path under the image root, or embedded pixels), checked, and
  preprocessed for the tower that needs them: resize the short side + centre crop (LlamaGen's
  ``center_crop_arr``) or LLaVA's pad-to-square with the CLIP mean colour (``resize="pad"``);
- a *user* image goes through the understanding tower, an *assistant* image through the generation
  tower (one encoder may serve both); every distinct image (by path, or by pixel digest) is encoded
  once per tower per chunk, so an image shared by five records costs one encoder pass;
- records are written per stream (understanding / generation / interleaved) as
  ``{split}-{stream}-c{chunk}-00000.array_record``; a chunk is marked done last, so a killed pass
  resumes at the first unfinished chunk; with ``process_count > 1`` chunk ``c`` belongs to process
  ``c % process_count`` (the same command on every host, disjoint shares);
- a bad image (missing file, corrupt or truncated bytes, decompression bomb, smaller than
  ``min_side``) raises a :class:`~uvjax.data.importers.common.FormatError` naming the shard, record and file,
  or with ``on_error="skip"`` drops that record and counts it per reason in ``report.json``. Images
  that are *converted* (CMYK, LA/RGBA/P with alpha, 16-bit, greyscale -> RGB) are kept and counted
  per source mode; nothing else is dropped or changed.

Command: ``python -m uvjax.pretokenise --shards=DIR --vq=VQ_DIR --out=DIR [--image_size=256]``.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import posixpath
import sys
import time
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from uvjax import integrity_files as itg
from uvjax import interrupt
from uvjax import storage_paths as sp
from uvjax.data import storage
from uvjax.data.images import RESIZE_MODES, ImageError, ImagePolicy, preprocess, read_image_file
from uvjax.data.importers.common import FormatError
from uvjax.data.records import Record, Segment
from uvjax.data.tasks import stream_of
from uvjax.towers.encoders import Encoder, tower_encoder, vq_encoder


# ----------------------------------------------------------------------------------------- the pass
def shard_paths(spec: str | Sequence[str]) -> list[str]:
    return storage.expand_paths(spec)


def image_root_of(shards: Sequence[str]) -> str:
    """The absolute image folder recorded by ``importers.convert`` next to the shards ("" if none)."""
    for d in dict.fromkeys(sp.parent(p) if sp.is_remote(p) else os.path.dirname(os.path.abspath(p))
                           for p in shards):
        m = sp.join(d, "import_manifest.json")
        if sp.exists(m):
            try:
                return str(json.loads(sp.read_text(m)).get("image_dir") or "")
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{m}: damaged import manifest: not a JSON object ({e}); convert the data "
                                 "again (python -m uvjax.data.formats convert) or move the import stage aside") from e
    return ""


def _where(reader: storage.RecordReader, i: int, rec: Record | None = None) -> str:
    w = reader.where(i)
    return f"{w} (id {rec.id!r})" if rec is not None else w


class _Report:
    def __init__(self):
        self.records_read = 0
        self.records_written = Counter()
        self.skipped = Counter()
        self.converted = Counter()
        self.messages: list[str] = []
        self.images_encoded = 0
        self.image_refs = 0
        self.encode_seconds = 0.0

    def skip(self, err: FormatError) -> None:
        self.skipped[err.reason] += 1
        if len(self.messages) < 20:
            self.messages.append(str(err))

    def add(self, d: dict) -> None:
        self.records_read += d["records_read"]
        self.records_written.update(d["records_written"])
        self.skipped.update(d["skipped"])
        self.converted.update(d["converted"])
        self.messages.extend(d["messages"][:max(0, 20 - len(self.messages))])
        self.images_encoded += d["images_encoded"]
        self.image_refs += d["image_refs"]
        self.encode_seconds += d["encode_seconds"]

    def as_dict(self) -> dict:
        return {"records_read": self.records_read, "records_written": dict(self.records_written),
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
                "converted": dict(self.converted), "messages": list(self.messages),
                "images_encoded": self.images_encoded, "image_refs": self.image_refs,
                "encode_seconds": round(self.encode_seconds, 3)}


def pretokenise_shards(shards: str | Sequence[str], encoders: Mapping[str, Encoder], out_dir: str, *,
                       split: str = "train", image_root: str | None = None, chunk: int = 1000,
                       batch: int = 64, on_error: str = "raise", feature_dtype: str = "float16",
                       process_index: int = 0, process_count: int = 1, policy: ImagePolicy = ImagePolicy(),
                       progress=None) -> dict:
    """Pre-tokenises imported record shards into ``out_dir`` (see the module docstring); returns the
    report of this process's chunks (finished chunks of an earlier attempt included) and writes it to
    ``out_dir/report-{split}.json`` (``-p{i}`` suffixed when several processes share the work)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    for role in ("user", "assistant"):
        if role not in encoders:
            raise ValueError(f"no encoder for {role} images")
    paths = shard_paths(shards)
    reader = storage.RecordReader(paths)
    root = image_root if image_root is not None else image_root_of(paths)
    os.makedirs(out_dir, exist_ok=True)
    n = len(reader)
    n_chunks = (n + chunk - 1) // chunk
    report = _Report()
    t0 = time.time()
    memo: dict = {}  # (encoder, image key) -> output, across chunks: an image shared by chunks is encoded once
    for c in range(n_chunks):
        if c % process_count != process_index:
            continue
        interrupt.check()
        lo, hi = c * chunk, min(n, (c + 1) * chunk)
        marker = os.path.join(out_dir, f".{split}-chunk{c:05d}.done")
        done = itg.read_marker(marker) if os.path.exists(marker) else None  # damaged: reported, chunk redone
        if done is not None:
            report.add(done)
            if progress:
                progress(hi - lo)
            continue
        part = _pretokenise_chunk(reader, range(lo, hi), encoders, root, batch=batch, on_error=on_error,
                                  feature_dtype=feature_dtype, policy=policy, memo=memo)
        recs_by_stream, chunk_report = part
        for name, recs in recs_by_stream.items():
            prefix = f"{split}-{name}-c{c:05d}"
            for p in os.listdir(out_dir):  # leftovers of a killed attempt at this chunk
                if p.startswith(prefix):
                    os.remove(os.path.join(out_dir, p))
            if recs:
                storage.write_records(recs, out_dir, prefix, records_per_shard=10 ** 9)
        d = chunk_report.as_dict()
        itg.write_marker(marker, d)
        report.add(d)
        if progress:
            progress(hi - lo)
    out = report.as_dict()
    wall = time.time() - t0
    out.update(split=split, shards=paths, image_root=root, process_index=process_index,
               process_count=process_count, wall_seconds=round(wall, 3),
               images_per_second=round(out["images_encoded"] / out["encode_seconds"], 2)
               if out["encode_seconds"] > 0 else None)
    name = f"report-{split}" + (f"-p{process_index}" if process_count > 1 else "") + ".json"
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(out, f, indent=1)
    return out


MEMO_ENTRIES = 200_000


def _pretokenise_chunk(reader, indices, encoders, root, *, batch, on_error, feature_dtype, policy, memo=None):
    rep = _Report()
    loaded: dict[str, tuple[np.ndarray, str | None]] = {}  # image key -> (rgb, converted-from mode)
    failed: dict[str, ImageError] = {}
    kept: list[tuple[int, Record, list[str]]] = []
    for i in indices:
        rep.records_read += 1
        try:
            rec = reader.read(i)
        except ValueError as e:
            err = FormatError(reader.where(i), str(e), "invalid_record")
            if on_error == "raise":
                raise err from e
            rep.skip(err)
            continue
        keys, bad = [], None
        for k, s in enumerate(rec.images()):
            if s.codes is not None or s.features is not None:
                keys.append("")  # already encoded: kept as it is
                continue
            if s.path is not None:
                key = "path:" + s.path
                if key not in loaded and key not in failed:
                    full = os.path.join(root, s.path) if root else s.path
                    try:
                        _check_inside(root, s.path)
                        loaded[key] = read_image_file(full, policy)
                    except ImageError as e:
                        failed[key] = e
            else:
                px = np.ascontiguousarray(s.pixels)
                key = "pix:" + hashlib.sha1(px.tobytes() + str(px.shape).encode()).hexdigest()
                if key not in loaded:
                    if min(px.shape[:2]) < policy.min_side:
                        failed[key] = ImageError(f"embedded image of {px.shape[1]}x{px.shape[0]} pixels is "
                                                 f"smaller than min_side={policy.min_side}", "too_small")
                    else:
                        loaded[key] = (storage.check_pixels(px, _where(reader, i, rec)), None)
            if key in failed:
                bad = (k, failed[key])
                break
            keys.append(key)
        if bad is not None:
            k, e = bad
            err = FormatError(f"{_where(reader, i, rec)} image {k}", str(e), e.reason)
            if on_error == "raise":
                raise err
            rep.skip(err)
            continue
        for key in keys:
            if key and loaded[key][1] is not None:
                rep.converted[loaded[key][1]] += 1
        kept.append((i, rec, keys))
    # distinct (encoder, image) pairs, encoded once each
    need: dict[int, dict[str, None]] = {}
    by_id = {id(e): e for e in encoders.values()}
    for _, rec, keys in kept:
        for s, key in zip(rec.images(), keys):
            if key:
                rep.image_refs += 1
                need.setdefault(id(encoders[s.role]), {})[key] = None
    memo = {} if memo is None else memo
    encoded: dict[tuple[int, str], np.ndarray] = {}
    t = time.time()
    for eid, ks in need.items():
        e = by_id[eid]
        for k in [k for k in ks if (eid, k) in memo]:
            encoded[(eid, k)] = memo[(eid, k)]
        ks = [k for k in ks if (eid, k) not in memo]
        for j in range(0, len(ks), batch):
            part = ks[j:j + batch]
            x = np.stack([preprocess(loaded[k][0], e.image_size, e.resize) for k in part])
            out = e.encode(x)
            for k, o in zip(part, out):
                encoded[(eid, k)] = o
                if len(memo) < MEMO_ENTRIES:
                    memo[(eid, k)] = o
        rep.images_encoded += len(ks)
    rep.encode_seconds += time.time() - t
    streams: dict[str, list[Record]] = {"understanding": [], "generation": [], "interleaved": []}
    for i, rec, keys in kept:
        segs, k = [], 0
        for s in rec.segments:
            if s.kind != "image":
                segs.append(s)
                continue
            key = keys[k]
            k += 1
            if not key:
                segs.append(s)
                continue
            e = encoders[s.role]
            v = encoded[(id(e), key)]
            if e.kind == "codes":
                segs.append(Segment(s.role, "image", codes=np.asarray(v).reshape(-1).astype(np.int32)))
            else:
                segs.append(Segment(s.role, "image", features=store_features(v, feature_dtype,
                                                                              _where(reader, i, rec))))
        out = Record(rec.id, rec.task, segs, rec.attributes)
        stream = stream_of(out)
        streams[stream].append(out)
        rep.records_written[stream] += 1
    return streams, rep


def _check_inside(root: str, rel: str) -> None:
    """Paths in shards were checked at import; a shard from elsewhere is checked again here."""
    if not root:
        return
    if sp.is_remote(root):  # no symlinks in a bucket: the relative path alone decides
        norm = posixpath.normpath(rel)
        if os.path.isabs(rel) or sp.is_remote(rel) or norm == ".." or norm.startswith("../"):
            raise ImageError(f"image path {rel!r} leaves the image folder {root!r}; refused", "path_escape")
        return
    r = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root, rel))
    if os.path.isabs(rel) or os.path.commonpath([r, full]) != r:
        raise ImageError(f"image path {rel!r} leaves the image folder {root!r}; refused", "path_escape")


def store_features(f: np.ndarray, dtype: str, where: str) -> np.ndarray:
    out = np.asarray(f, np.float32).astype(dtype)
    if not np.isfinite(out).all():
        raise ValueError(f"{where}: non-finite features after casting to {dtype} (max |x| = "
                         f"{np.abs(f).max():.3g}); set stages.features.dtype='float32'")
    return out


def merge_reports(out_dir: str, split: str) -> dict:
    """The per-process reports of ``split`` in ``out_dir`` summed (for a multi-host pass)."""
    tot = _Report()
    files = sorted(glob.glob(os.path.join(out_dir, f"report-{split}*.json")))
    for p in files:
        tot.add(itg.read_json(p, "pre-tokenisation report"))
    return {**tot.as_dict(), "reports": files}


def format_report(r: dict) -> str:
    w = r.get("records_written", {})
    lines = [f"pre-tokenised {r.get('split', '')}: read {r['records_read']} records, wrote "
             + ", ".join(f"{k} {v}" for k, v in sorted(w.items())) + f"; {r['images_encoded']} distinct images "
             f"encoded for {r['image_refs']} image references"
             + (f" ({r['images_per_second']} images/s)" if r.get("images_per_second") else "")]
    if r.get("skipped_total"):
        lines.append(f"  SKIPPED {r['skipped_total']} records: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(r["skipped"].items())))
        lines += [f"    {m}" for m in r["messages"][:5]]
    if r.get("converted"):
        lines.append("  converted to RGB (kept): " + ", ".join(f"{k} {v}" for k, v in sorted(r["converted"].items())))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- command
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uvjax.pretokenise", description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True, nargs="+", help="imported shards: directory, glob or files "
                                                               "(local or gs://)")
    ap.add_argument("--out", required=True, help="output directory of the pre-tokenised shards (local or gs://: "
                                                 "built in $UVJAX_CACHE, then uploaded)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--vq", default="", help="VQ tokenizer: vq.safetensors or its directory (uvjax-trained or "
                                             "converted LlamaGen VQ-16)")
    ap.add_argument("--image_size", type=int, default=256, help="VQ input size (the VQ's training size)")
    ap.add_argument("--tower", default="", help="SigLIP/CLIP tower: an HF vision-model directory or a uvjax "
                                                "tower file (siglip.safetensors)")
    ap.add_argument("--tower_kind", default="siglip", choices=("siglip", "clip"))
    ap.add_argument("--user", default="", choices=("", "vq", "tower"),
                    help="encoder of user (understanding) images; default: the VQ if given, else the tower")
    ap.add_argument("--assistant", default="", choices=("", "vq", "tower"),
                    help="encoder of assistant (generation) images; default: the VQ if given, else the tower")
    ap.add_argument("--resize", default="", choices=("",) + RESIZE_MODES,
                    help="default: each tower's own (VQ centre crop, SigLIP squash, CLIP resize + crop)")
    ap.add_argument("--feature_dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--image_root", default=None, help="image folder (default: the import manifest's)")
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--on_error", default="raise", choices=("raise", "skip"))
    ap.add_argument("--process_index", type=int, default=0)
    ap.add_argument("--process_count", type=int, default=1)
    a = ap.parse_args(argv)
    if not a.vq and not a.tower:
        ap.error("give --vq and/or --tower")
    made = {}
    if a.vq:
        made["vq"] = vq_encoder(a.vq, a.image_size, a.resize)
    if a.tower:
        made["tower"] = tower_encoder(a.tower, kind=a.tower_kind, resize=a.resize)
    default = "vq" if a.vq else "tower"
    roles = {"user": a.user or default, "assistant": a.assistant or default}
    for role, k in roles.items():
        if k not in made:
            ap.error(f"--{role}={k} needs --{'vq' if k == 'vq' else 'tower'}")
    out = a.out
    if sp.is_remote(out):  # resumable locally (chunk markers), uploaded when complete
        out = os.path.join(sp.remote_cache_dir("pretokenise"),
                           hashlib.sha256(sp.resolve(a.out).encode()).hexdigest()[:16])
    paths = shard_paths(a.shards)
    n = len(storage.RecordReader(paths))
    bar = tqdm(total=n, desc=f"pretokenise {a.split}", unit="rec", dynamic_ncols=True)
    try:
        rep = pretokenise_shards(paths, {r: made[k] for r, k in roles.items()}, out, split=a.split,
                                 image_root=a.image_root, chunk=a.chunk, batch=a.batch, on_error=a.on_error,
                                 feature_dtype=a.feature_dtype, process_index=a.process_index,
                                 process_count=a.process_count, progress=bar.update)
    except FormatError as e:
        bar.close()
        print(f"uvjax.pretokenise: {e}", file=sys.stderr)
        return 2
    bar.close()
    if out != a.out:
        sp.upload(out, a.out)
        print(f"uploaded {out} -> {a.out}")
    print(format_report(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
