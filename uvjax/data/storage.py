"""Records on disk: ArrayRecord shards of msgpack records, and image files for path-based records.

ArrayRecord gives random access (what grain's global shuffle and per-host index sharding need) and
``group_size:1`` makes every record its own chunk so a random read decodes one record only. Errors
name the shard file and the record's index inside it, because that is what a person fixing the data
needs to open.

Shards may be ``gs://`` URLs (``uvjax/storage_paths.py``): globs are expanded through ``etils.epath``, and since
the array_record reader only opens POSIX files (on a URL it hangs), each remote shard is read from a local
copy under ``$UVJAX_CACHE/remote`` (default ``~/.cache/uvjax``), downloaded once per process and version of the
object. Errors still name the URL.
"""
from __future__ import annotations

import bisect
import glob
import os
from typing import Iterable, Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image, UnidentifiedImageError

from uvjax import storage_paths as sp
from uvjax.data.records import Record, record_from_bytes, record_to_bytes

SUFFIX = ".array_record"
# what a damaged shard's error adds (a stage's shards are rebuilt from the stage directory moved aside)
DAMAGED_HINT = ("; if it is in a stage cache, move that stage directory aside (mv DIR DIR.damaged): the next run "
                "rebuilds it")


class ShardWriter:
    """Streams records into ``{out_dir}/{prefix}-00000.array_record``, ``-00001`` ... of at most
    ``records_per_shard`` records each (the total need not be known in advance)."""

    def __init__(self, out_dir: str, prefix: str, records_per_shard: int = 2000):
        if records_per_shard < 1:
            raise ValueError("records_per_shard must be >= 1")
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, records_per_shard
        os.makedirs(out_dir, exist_ok=True)
        self.paths: list[str] = []
        self._writer = None
        self._count = 0

    def _open(self) -> None:
        path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):05d}{SUFFIX}")
        self._writer = ArrayRecordWriter(path, "group_size:1")
        self.paths.append(path)
        self._count = 0

    def write(self, record: Record) -> None:
        self.write_bytes(record_to_bytes(record.validate()))

    def write_bytes(self, data: bytes) -> None:
        if self._writer is None or self._count >= self.per_shard:
            self._close_current()
            self._open()
        self._writer.write(data)
        self._count += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        self._close_current()
        return list(self.paths)


def write_records(records: Iterable[Record], out_dir: str, prefix: str,
                  records_per_shard: int = 2000) -> list[str]:
    w = ShardWriter(out_dir, prefix, records_per_shard)
    try:
        for r in records:
            w.write(r)
    finally:
        paths = w.close()
    return paths


def _expand_remote(item: str) -> list[str]:
    url = sp.resolve(item)
    if any(ch in url for ch in "*?["):
        scheme, rest = url.split("://", 1)
        bucket, _, pattern = rest.partition("/")
        return sorted(str(x) for x in sp.as_path(f"{scheme}://{bucket}").glob(pattern))
    p = sp.as_path(url)
    if p.is_dir():
        return sorted(str(x) for x in p.glob(f"*{SUFFIX}"))
    if p.exists():
        return [url]
    raise ValueError(f"record shard path {item!r} does not exist")


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """A directory, a glob, a file, or a list of those -> sorted, de-duplicated shard paths (``gs://``
    URLs too)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        item = str(item)
        if sp.is_remote(item):
            found = _expand_remote(item)
        elif os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, f"*{SUFFIX}")))
        elif any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item))
        elif os.path.exists(item):
            found = [item]
        else:
            raise ValueError(f"record shard path {item!r} does not exist")
        out.extend(p for p in found if p not in out)
    return out


class RecordReader:
    """Random access to the records of several shards through ``grain.sources.ArrayRecordDataSource``.

    Picklable (the open source is dropped and reopened lazily), so it can live in grain map
    functions that run in worker processes. ``gs://`` shards are read from local copies
    (:func:`local_shard`); ``paths`` keeps the URLs, which errors name.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise ValueError("RecordReader needs at least one shard path")
        self._starts = [0]
        for p in self.paths:
            if not (sp.exists(p) if sp.is_remote(p) else os.path.exists(p)):
                raise ValueError(f"record shard {p!r} does not exist")
            try:
                r = ArrayRecordReader(local_shard(p))
                try:
                    n = r.num_records()
                finally:
                    r.close()
            except RuntimeError as e:  # riegeli: truncated, a hash mismatch in the index/footer, not a shard
                raise ValueError(f"record shard {p!r} is damaged or not an ArrayRecord file "
                                 f"({e or 'the reader gave no detail'}){DAMAGED_HINT}") from e
            self._starts.append(self._starts[-1] + n)
        self._source = None

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_source"] = None
        return d

    @property
    def source(self):
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource([local_shard(p) for p in self.paths])
        return self._source

    def locate(self, index: int) -> tuple[str, int]:
        """Global index -> (shard path, index of the record inside that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} outside 0..{len(self) - 1}")
        f = bisect.bisect_right(self._starts, index) - 1
        return self.paths[f], index - self._starts[f]

    def where(self, index: int) -> str:
        path, local = self.locate(index)
        return f"{path} record {local}"

    def read_bytes(self, index: int) -> bytes:
        try:
            return self.source[index]
        except (RuntimeError, OSError) as e:  # riegeli checks a hash of every chunk: a damaged shard
            raise ValueError(f"{self.where(index)}: unreadable record ({type(e).__name__}: {e}){DAMAGED_HINT}") from e

    def read(self, index: int) -> Record:
        return record_from_bytes(self.read_bytes(index), self.where(index))

    def __iter__(self):
        for i in range(len(self)):
            yield self.read(i)


_LOCAL_SHARDS: dict[str, str] = {}  # URL -> local copy, per process


def local_shard(path: str) -> str:
    """A path the array_record reader can open: ``path`` itself when local; for a URL, a copy in
    ``$UVJAX_CACHE/remote`` made once per process (``storage_paths.local_copy``: keyed by the object's
    version, downloaded atomically, so processes sharing the cache share the file)."""
    if not sp.is_remote(path):
        return path
    got = _LOCAL_SHARDS.get(path)
    if got is None or not os.path.exists(got):
        got = _LOCAL_SHARDS[path] = sp.local_copy(path, sp.remote_cache_dir("remote"))
    return got


def host_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous share [lo, hi) of ``n`` records read by one host; shares are disjoint and
    cover 0..n-1 (sizes differ by at most one). Contiguous shares mostly touch whole shards."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    return n * process_index // process_count, n * (process_index + 1) // process_count


# ----------------------------------------------------------------------------------------- images
def check_pixels(pixels: np.ndarray, where: str, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Validates an RGB image array: uint8, [H, W, 3], and H x W == size when given."""
    a = np.asarray(pixels)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{where}: image must be uint8 [H, W, 3] RGB, got {a.dtype} {list(a.shape)}")
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if a.shape[:2] != hw:
            raise ValueError(f"{where}: image is {a.shape[0]}x{a.shape[1]}, expected {hw[0]}x{hw[1]}")
    return a


MAX_IMAGE_PIXELS = 1 << 26  # same bound as importers.common.Limits.max_image_pixels (decompression bombs)


def load_image(path: str, image_dir: str = "", *, where: str = "image",
               size: int | tuple[int, int] | None = None, convert: bool = False,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Reads an image file as uint8 RGB. Missing files, undecodable bytes, a mode other than RGB
    (unless ``convert``) or a size other than ``size`` raise ValueError naming the file. With an
    ``image_dir``, a path that leaves it (absolute, ``..``, a symlink pointing out) is refused; an
    image of more than ``max_pixels`` pixels is refused from its header, before it is decoded."""
    if image_dir:
        root = os.path.realpath(image_dir)
        full = os.path.join(image_dir, path)
        if os.path.isabs(path) or os.path.commonpath([root, os.path.realpath(full)]) != root:
            raise ValueError(f"{where}: image path {path!r} leaves the image folder {image_dir!r}; refused")
    else:
        full = path
    if not os.path.isfile(full):
        raise ValueError(f"{where}: image file {full!r} not found")
    try:
        with Image.open(full) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"{where}: image file {full!r} is {w}x{h} pixels, more than the "
                                 f"{max_pixels} allowed (decompression bomb?); refused")
            im.load()
            if im.mode != "RGB":
                if not convert:
                    raise ValueError(f"{where}: image file {full!r} has mode {im.mode}, expected RGB")
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: image file {full!r} is corrupt or not an image ({e})") from e
    return check_pixels(arr, f"{where} ({full})", size)
