"""Files of one format -> records (:func:`iter_records`) -> ArrayRecord shards per stream plus the import
manifest (:func:`convert`, the ``convert`` command of ``python -m uvjax.data.formats``)."""
from __future__ import annotations

import glob
import os
from typing import Any, Iterator, Sequence

from uvjax.data import storage
from uvjax.data.importers.captions import caption_to_generation
from uvjax.data.importers.common import ImportStats, check_on_error
from uvjax.data.importers.llava import iter_llava
from uvjax.data.importers.manifest import check_out_dir_manifest, write_manifest
from uvjax.data.importers.unifiedvisual import iter_unifiedvisual
from uvjax.data.records import Record
from uvjax.data.tasks import STREAMS, stream_of

FORMATS = ("llava", "caption_generation", "unifiedvisual")


def _expand_sources(source: str | Sequence[str], fmt: str) -> list[str]:
    items = [source] if isinstance(source, str) else list(source)
    out: list[str] = []
    for it in items:
        it = str(it)
        if os.path.isdir(it):
            exts = ("*.parquet",) if fmt == "unifiedvisual" else ("*.json", "*.jsonl")
            found = sorted(p for e in exts for p in glob.glob(os.path.join(it, e)))
        elif any(ch in it for ch in "*?["):
            found = sorted(glob.glob(it))
        else:
            found = [it]
        if not found:
            raise ValueError(f"no {fmt} files found at {it!r}")
        out.extend(p for p in found if p not in out)
    return out


def iter_records(source: str | Sequence[str], *, format: str, image_dir: str = "",
                 on_error: str = "raise", stats: ImportStats | None = None,
                 **options) -> Iterator[Record]:
    """Records of one or more files (paths, directories, globs) of one ``format``; ``options`` go to
    the format's reader (``seed``/``skip``/``limit`` for caption_generation, ``task``/``column_map``/
    ``placeholder`` for unifiedvisual, ``load_pixels``/``check_files``/``image_size``/``limits``)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    yield from _iter_files(_expand_sources(source, format), format=format, image_dir=image_dir,
                           on_error=on_error, stats=stats, **options)


def _iter_files(files: Sequence[str], *, format: str, image_dir: str, on_error: str,
                stats: ImportStats | None, **options) -> Iterator[Record]:
    stats = stats if stats is not None else ImportStats()
    if format == "caption_generation":
        kw = {k: options.pop(k) for k in ("seed", "skip", "limit") if k in options}

        def caps() -> Iterator[Record]:
            inner = ImportStats()
            try:
                for f in files:
                    yield from iter_llava(f, image_dir, on_error=on_error, stats=inner, **options)
            finally:
                stats.absorb_reading(inner)
        yield from caption_to_generation(caps(), on_error=on_error, stats=stats, **kw)
        return
    reader = iter_llava if format == "llava" else iter_unifiedvisual
    for f in files:
        yield from reader(f, image_dir, on_error=on_error, stats=stats, **options)


def convert(source: str | Sequence[str], out_dir: str, *, format: str, image_dir: str = "",
            prefix: str = "data", stream: str | None = None, records_per_shard: int = 2000,
            on_error: str = "raise", **options) -> dict[str, Any]:
    """Imports ``source`` and writes ArrayRecord shards. ``stream=None`` splits by
    ``tasks.stream_of`` into ``{out_dir}/{prefix}-{stream}-NNNNN.array_record``; a named stream writes
    everything to ``{prefix}-{stream}-...`` via ``storage.write_records``. Then writes the import
    manifest ``{out_dir}/import_manifest.json`` (``manifest`` module; read it with
    ``manifest.read_manifest``). Returns ``{"paths": {stream: [...]}, "counts": ImportStats.as_dict(),
    "manifest": manifest path}``."""
    check_on_error(on_error)
    if stream is not None and stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS} or None, got {stream!r}")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    files = _expand_sources(source, format)
    real_image_dir = (image_dir.rstrip("/") if "://" in image_dir else os.path.realpath(image_dir)) if image_dir else ""
    check_out_dir_manifest(out_dir, real_image_dir, prefix)
    stats = ImportStats()
    recs = _iter_files(files, format=format, image_dir=image_dir, on_error=on_error, stats=stats,
                       **options)
    if stream is not None:
        paths = {stream: storage.write_records(recs, out_dir, f"{prefix}-{stream}", records_per_shard)}
    else:
        writers = {s: storage.ShardWriter(out_dir, f"{prefix}-{s}", records_per_shard) for s in STREAMS}
        try:
            for rec in recs:
                writers[stream_of(rec)].write(rec)
        finally:
            paths = {s: w.close() for s, w in writers.items()}
    paths = {s: p for s, p in paths.items() if p}
    counts = stats.as_dict()
    manifest = write_manifest(out_dir, format=format, sources=files, image_dir=image_dir,
                              counts=counts, paths=paths)
    return {"paths": paths, "counts": counts, "manifest": manifest}
