"""The record: one training sample as ordered segments, before tokenisation.

A record is what importers and generators produce and what ArrayRecord shards store. Tokenisation
(``data/sequence.py``) turns it into the sequence arrays of ``data/arrays.py``.

- ``segments``: ordered turns' pieces. ``role`` is ``system`` | ``user`` | ``assistant``; ``kind`` is
  ``text`` | ``image``. An image is given as exactly one of: ``pixels`` (uint8 HxWx3), ``path``
  (relative to an image folder), ``codes`` (int32 VQ indices, raster order) or ``features``
  (float32 [N, F], continuous tower output). User images are understanding inputs; assistant images
  are generation targets.
- ``task``: a tag (``vqa``, ``caption``, ``generation``, ``interleaved``, ``text`` ...) used for stream
  mixing and evaluation.
- ``attributes``: JSON-able ground truth (e.g. the Smart Watch attributes) for evaluation.

Serialisation is msgpack with arrays stored as (dtype, shape, bytes): no pickle, so a shard made by
someone else cannot run code when read.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np

ROLES = ("system", "user", "assistant")
KINDS = ("text", "image")
_ALLOWED_DTYPES = {"uint8", "int32", "int64", "float32", "float16", "bool"}
MAX_RECORD_BYTES = 64 << 20  # a record larger than this is refused (bounded input)


@dataclasses.dataclass
class Segment:
    role: str
    kind: str
    text: str | None = None
    pixels: np.ndarray | None = None
    path: str | None = None
    codes: np.ndarray | None = None
    features: np.ndarray | None = None

    def validate(self, where: str) -> None:
        if self.role not in ROLES:
            raise ValueError(f"{where}: unknown role {self.role!r}; expected one of {ROLES}")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: unknown segment kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "text":
            if not isinstance(self.text, str):
                raise ValueError(f"{where}: text segment without a text string")
        else:
            given = [n for n in ("pixels", "path", "codes", "features") if getattr(self, n) is not None]
            if len(given) != 1:
                raise ValueError(
                    f"{where}: an image segment needs exactly one of pixels/path/codes/features, got {given}")


@dataclasses.dataclass
class Record:
    id: str
    task: str
    segments: list[Segment]
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self, where: str | None = None) -> "Record":
        where = where or f"record {self.id!r}"
        if not self.segments:
            raise ValueError(f"{where}: no segments")
        for i, s in enumerate(self.segments):
            s.validate(f"{where} segment {i}")
        return self

    def images(self, role: str | None = None) -> list[Segment]:
        return [s for s in self.segments if s.kind == "image" and (role is None or s.role == role)]


def _pack_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    if a.dtype.name not in _ALLOWED_DTYPES:
        raise ValueError(f"array dtype {a.dtype} not storable; allowed {sorted(_ALLOWED_DTYPES)}")
    return {"__nd__": True, "dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}


def _unpack_array(d: dict) -> np.ndarray:
    dtype = d["dtype"]
    if dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"array dtype {dtype!r} not allowed")
    shape = tuple(int(x) for x in d["shape"])
    a = np.frombuffer(d["data"], dtype=np.dtype(dtype))
    if a.size != int(np.prod(shape)):
        raise ValueError(f"array data of {a.size} elements does not match shape {shape}")
    return a.reshape(shape)


def record_to_bytes(rec: Record) -> bytes:
    segs = []
    for s in rec.segments:
        d: dict[str, Any] = {"role": s.role, "kind": s.kind}
        if s.text is not None:
            d["text"] = s.text
        if s.path is not None:
            d["path"] = s.path
        for n in ("pixels", "codes", "features"):
            v = getattr(s, n)
            if v is not None:
                d[n] = _pack_array(np.asarray(v))
        segs.append(d)
    return msgpack.packb({"id": rec.id, "task": rec.task, "segments": segs,
                          "attributes": rec.attributes}, use_bin_type=True)


def record_from_bytes(b: bytes, where: str = "record") -> Record:
    if len(b) > MAX_RECORD_BYTES:
        raise ValueError(f"{where}: {len(b)} bytes exceeds the {MAX_RECORD_BYTES}-byte record limit")
    try:
        d = msgpack.unpackb(b, raw=False, strict_map_key=True)
        segs = []
        for s in d["segments"]:
            kw = {"role": s["role"], "kind": s["kind"], "text": s.get("text"), "path": s.get("path")}
            for n in ("pixels", "codes", "features"):
                if n in s:
                    kw[n] = _unpack_array(s[n])
            segs.append(Segment(**kw))
        rec = Record(id=str(d["id"]), task=str(d["task"]), segments=segs,
                     attributes=dict(d.get("attributes") or {}))
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as e:
        raise ValueError(f"{where}: malformed record bytes ({type(e).__name__}: {e})") from e
    return rec.validate(where)


def null_prompt(record: Record) -> Record:
    """The unconditional version of a conversation: user text segments become empty strings and
    user images are dropped (one empty text per user turn remains); everything else (system turn,
    assistant answer and images, task, attributes) is kept. Inference builds the classifier-free
    guidance null stream from the prompt record with this; training uses :func:`null_prompt_record`."""
    segs: list[Segment] = []
    for s in record.segments:
        if s.role != "user":
            segs.append(s)
        elif not segs or segs[-1].role != "user":
            segs.append(Segment("user", "text", text=""))
    return Record(record.id, record.task, segs, dict(record.attributes))


def null_prompt_record(record: Record) -> Record:
    """Training-time prompt dropout for classifier-free guidance: :func:`null_prompt` of a record with
    an assistant image (the image is still trained, after an uninformative prompt); records without
    an assistant image are returned unchanged. The pipeline applies it with probability
    ``data.cfg_dropout``, seeded by (seed, record index) so a resumed run replays the same choices."""
    if not record.images("assistant"):
        return record
    return null_prompt(record)
