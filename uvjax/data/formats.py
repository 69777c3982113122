"""Importers of real conversation data into :class:`~uvjax.data.records.Record` s, and shard conversion.

Three sources, each read lazily (records are yielded one at a time):

- **LLaVA / ShareGPT4V JSON** (:func:`iter_llava`): a JSON list (or JSON Lines) of
  ``{"id", "image"?, "conversations": [{"from": human|gpt|system, "value"}], "task"?}``. Every
  ``<image>`` placeholder becomes an image segment of the turn it sits in, in order: in a human turn
  an understanding input, in a gpt turn a generation target (the reference's generation records put
  ``<image>`` at the end of the gpt turn with ``task == "generation"``). ``image`` is a path, or a
  list of paths, relative to ``image_dir``; the number of placeholders must equal the number of paths.
- **caption -> generation** (:func:`caption_to_generation`, seed reference §8): caption records
  become "request + caption -> acknowledgement + image" records, with our own phrasings. Only
  captions are converted (a VQA answer such as ``62%`` must never become an image prompt): a record
  with an *explicit* task (the LLaVA item's ``task`` key, kept in ``attributes["task"]``) other than
  ``caption`` is skipped as ``not_caption``; a record without one (ShareGPT4V caption files have no
  ``task`` key) is converted when it has the caption shape: one user turn with exactly one image, one
  single-turn text answer, no assistant image. Multi-turn conversations are never captions.
- **UnifiedVisual parquet** (:func:`iter_unifiedvisual`): the real schema is unverified, so the
  schema is read from each file and matched against the documented :data:`LAYOUTS`; anything else
  fails naming the columns found. :func:`describe` prints schema, detected layout and a few rows.

Images stay ``path`` segments (decoded later by the pre-tokenisation pass) unless ``load_pixels``;
image bytes embedded in parquet are decoded to pixels. Paths are refused when they could read
outside the image folder (``..``, absolute, symlinks resolving outside), because a data file is
untrusted input.

Bad input raises :class:`FormatError` (a ``ValueError``) naming the file, the record index and what
was expected; with ``on_error="skip"`` the record is skipped and counted per reason in an
:class:`ImportStats`. File-level problems (unreadable or oversized file, a JSON list whose syntax
breaks so later records cannot be located, an unknown parquet layout) always raise.

**Ambiguous hours (warned and counted, data unchanged).** The paper's Smart Watch reference data
(LLaVA JSON written by the paper's code) labels time answers ``HH:MM:SS`` with hours 00-12, so
``00:MM`` and ``12:MM`` name the same dial (hour 0 and hour 12 draw the same hands). Every kept
assistant answer that is exactly such a time (``^(00|12):MM(:SS)?$`` after stripping) is counted in
``ImportStats.warnings["hour_00_12_ambiguous"]`` (so in ``as_dict()`` and the import manifest) and
each file with any logs one ``logging.warning``. Records are kept as they are; evaluation should treat
the two hours as equal (``evaluation.metrics``' tolerant/coarse/hour time scores compare hours modulo
12; its strict string match does not).

**Import manifest.** :func:`convert` writes ``{out_dir}/import_manifest.json`` (:data:`MANIFEST_NAME`)
beside the shards: ``{"format", "sources": [absolute input files], "image_dir": absolute real path
of the image folder ("" if none), "counts": ImportStats.as_dict(), "paths": {stream: [absolute shard
paths]}, "created": ISO time}``. Images stay paths relative to ``image_dir``, so later stages take the
folder from the manifest (:func:`read_manifest`) and work from any current directory.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import glob
import io
import itertools
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from uvjax.data import storage
from uvjax.data.records import Record, Segment
from uvjax.data.tokenizer import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system"}
UNDERSTANDING_TASKS = ("vqa", "caption", "conversation", "text")
GENERATION_TASKS = ("generation",)
STREAMS = ("understanding", "generation", "interleaved")
EXPLICIT_TASK = "task"  # attributes key of a task given by the data (LLaVA ``task`` key, parquet column)


# ---------------------------------------------------------------------------------------- errors
class FormatError(ValueError):
    """A data error: ``reason`` is the counter key under ``on_error="skip"``; ``fatal`` errors
    (file-level) are raised even then."""

    def __init__(self, where: str, message: str, reason: str, fatal: bool = False):
        super().__init__(f"{where}: {message}")
        self.where, self.reason, self.fatal = where, reason, fatal


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on untrusted input, so one bad file cannot exhaust memory. A JSON list file is held
    in memory whole (split it into JSON Lines above ``max_file_bytes``)."""
    max_file_bytes: int = 4 << 30
    max_record_bytes: int = 16 << 20      # one JSON Lines line / one item of a JSON list
    max_text_chars: int = 1 << 20         # one turn's text
    max_turns: int = 1024
    max_images: int = 64                  # per record
    max_image_bytes: int = 64 << 20       # embedded (parquet) image bytes
    max_image_pixels: int = 1 << 26


DEFAULT_LIMITS = Limits()


HOUR_AMBIGUOUS = "hour_00_12_ambiguous"   # ImportStats.warnings key, see the module docstring
_AMBIGUOUS_HOUR = re.compile(r"(?:00|12):[0-5]\d(?::[0-5]\d)?")


class ImportStats:
    """Counts of an import: ``read`` items, ``kept`` records, ``skipped`` per reason, ``warnings``
    per kind (kept records that are suspicious, e.g. :data:`HOUR_AMBIGUOUS`), and the first few skip
    messages (so a person can find the bad records)."""

    def __init__(self, keep_messages: int = 20):
        self.read = 0
        self.kept = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.warnings: collections.Counter[str] = collections.Counter()
        self.messages: list[str] = []
        self._keep = keep_messages

    def handle(self, err: FormatError, on_error: str) -> None:
        if on_error == "raise" or err.fatal:
            raise err
        self.skipped[err.reason] += 1
        if len(self.messages) < self._keep:
            self.messages.append(str(err))
            log.warning("skipping: %s", err)

    def absorb_reading(self, inner: "ImportStats") -> None:
        """Adds what ``inner`` counted while reading (read, skipped, warnings, messages), not its
        ``kept``: for a conversion stage that counts its own output."""
        self.read += inner.read
        self.skipped.update(inner.skipped)
        self.warnings.update(inner.warnings)
        self.messages.extend(inner.messages[:max(0, self._keep - len(self.messages))])

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "warnings": dict(self.warnings),
                "messages": list(self.messages)}

    def summary(self) -> str:
        return summary_line(self.as_dict())


def summary_line(counts: dict[str, Any]) -> str:
    """One human line from :meth:`ImportStats.as_dict`: read / kept / skipped per reason / warnings."""
    def per(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
    skipped = counts.get("skipped") or {}
    total = counts.get("skipped_total", sum(skipped.values()))
    warnings = per(counts.get("warnings") or {})
    return (f"read {counts.get('read', 0)}, kept {counts.get('kept', 0)}, skipped {total}"
            + (f" ({per(skipped)})" if skipped else "") + f"; warnings: {warnings}")


def _keep(stats: "ImportStats", rec: Record) -> int:
    """Counts a kept record (and its ambiguous hour answers, returned for the per-file warning)."""
    stats.kept += 1
    n = ambiguous_hour_answers(rec)
    if n:
        stats.warnings[HOUR_AMBIGUOUS] += n
    return n


def ambiguous_hour_answers(record: Record) -> int:
    """How many assistant text answers of ``record`` are exactly a time whose hour is 00 or 12
    (``HH:MM`` or ``HH:MM:SS`` after stripping), which the 12-hour dial cannot tell apart."""
    return sum(1 for s in record.segments if s.role == "assistant" and s.kind == "text"
               and _AMBIGUOUS_HOUR.fullmatch((s.text or "").strip()))


def _warn_ambiguous_hours(path: str, n: int) -> None:
    if n:
        log.warning("%s: %d assistant answer(s) are a time with hour 00 or 12 (e.g. '12:15:00'); "
                    "these labels are ambiguous: hour 0 and hour 12 draw the same hands, so the "
                    "reference data's 00 vs 12 cannot be learnt from the image. Records are kept "
                    "unchanged and counted as %r; uvjax's evaluation should treat the two hours as "
                    "equal (evaluation.metrics' tolerant/coarse/hour time scores compare hours "
                    "modulo 12; its strict string match does not)", path, n, HOUR_AMBIGUOUS)


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


# ---------------------------------------------------------------------------------------- images
def resolve_image_path(image_dir: str, rel: Any, where: str, *, check_files: bool = True) -> str:
    """The normalised relative path of an image inside ``image_dir``; refuses anything that could
    read outside it (absolute paths, ``..`` components, symlinks resolving outside)."""
    if not isinstance(rel, str) or not rel.strip():
        raise FormatError(where, f"image path must be a non-empty string, got {rel!r}", "bad_image")
    if "\x00" in rel:
        raise FormatError(where, f"image path {rel!r} contains a NUL byte", "path_escape")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise FormatError(where, f"absolute image path {rel!r} refused; expected a path relative to "
                                 f"the image folder {image_dir!r}", "path_escape")
    if ".." in re.split(r"[\\/]", rel):
        raise FormatError(where, f"image path {rel!r} contains '..' and could escape the image folder "
                                 f"{image_dir!r}; refused", "path_escape")
    norm = os.path.normpath(rel)
    if "://" in str(image_dir):  # an object store (gs://): no symlinks; the pre-tokenisation reads and checks it
        return norm.replace(os.sep, "/")
    root = os.path.realpath(image_dir or ".")
    full = os.path.realpath(os.path.join(root, norm))
    if os.path.commonpath([root, full]) != root:
        raise FormatError(where, f"image path {rel!r} resolves to {full!r}, outside the image folder "
                                 f"{root!r} (symlink?); refused", "path_escape")
    if check_files and not os.path.isfile(full):
        raise FormatError(where, f"image file {os.path.join(image_dir, norm)!r} not found "
                                 f"(record image path {rel!r})", "missing_image")
    return norm


def decode_image_bytes(data: bytes, where: str, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Encoded image bytes (PNG/JPEG ...) -> uint8 RGB, bounded in bytes and pixels."""
    from PIL import Image, UnidentifiedImageError
    if len(data) > limits.max_image_bytes:
        raise FormatError(where, f"embedded image of {len(data)} bytes exceeds max_image_bytes="
                                 f"{limits.max_image_bytes}", "oversized")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise FormatError(where, f"embedded image of {w}x{h} pixels exceeds max_image_pixels="
                                         f"{limits.max_image_pixels}", "oversized")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FormatError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FormatError(where, f"embedded image bytes are corrupt or not an image ({e})",
                          "bad_image") from e
    return storage.check_pixels(arr, where)


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How image references become segments. ``image_size`` (with ``load_pixels``) checks the
    decoded size; ``check_files`` makes a missing file a record error at import time."""
    image_dir: str = ""
    load_pixels: bool = False
    check_files: bool = True
    image_size: int | None = None

    def segment(self, role: str, ref: Any, where: str, limits: Limits) -> Segment:
        """``ref``: a relative path, encoded bytes, or an HF ``{"bytes", "path"}`` image struct."""
        if isinstance(ref, dict):
            data, path = ref.get("bytes"), ref.get("path")
            ref = data if data is not None else path
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return Segment(role, "image", pixels=decode_image_bytes(bytes(ref), where, limits))
        rel = resolve_image_path(self.image_dir, ref, where,
                                 check_files=self.check_files or self.load_pixels)
        if not self.load_pixels:
            return Segment(role, "image", path=rel)
        try:
            pixels = storage.load_image(rel, self.image_dir, where=where, size=self.image_size,
                                        convert=True, max_pixels=limits.max_image_pixels)
        except ValueError as e:
            raise FormatError(where, f"cannot load image {rel!r}: {e}", "bad_image") from e
        return Segment(role, "image", pixels=pixels)


# ---------------------------------------------------------------------------------------- turns -> segments
_IMAGE = object()  # an image slot in a split turn


def split_placeholders(text: str, placeholder: str | re.Pattern = IMAGE_PLACEHOLDER) -> list:
    """Text with placeholders -> pieces: stripped non-empty strings and ``_IMAGE`` slots, in order.
    ``placeholder`` is a literal string or a compiled regular expression."""
    pat = placeholder if isinstance(placeholder, re.Pattern) else re.compile(re.escape(placeholder))
    out: list = []
    pos = 0
    for m in pat.finditer(text):
        piece = text[pos:m.start()].strip()
        if piece:
            out.append(piece)
        out.append(_IMAGE)
        pos = m.end()
    piece = text[pos:].strip()
    if piece:
        out.append(piece)
    return out


def build_segments(turns: Sequence[tuple[str, list]], images: Sequence[Any], where: str,
                   opts: ImageOptions, limits: Limits) -> list[Segment]:
    """(role, pieces) turns + the record's image references -> segments. Checks: placeholder count
    equals image count; a system turn only first and without images; no empty assistant answer
    (nor an empty user turn, which would silently merge two answers)."""
    slots = sum(1 for _, pieces in turns for p in pieces if p is _IMAGE)
    if slots != len(images):
        raise FormatError(where, f"{slots} {IMAGE_PLACEHOLDER} placeholder(s) in the conversation but "
                                 f"{len(images)} image(s) given; expected equal counts", "image_count")
    if len(images) > limits.max_images:
        raise FormatError(where, f"{len(images)} images exceed max_images={limits.max_images}",
                          "oversized")
    segs: list[Segment] = []
    k = 0
    for t, (role, pieces) in enumerate(turns):
        if role == "system" and t > 0:
            raise FormatError(where, f"turn {t}: a system turn is only allowed first", "bad_turn")
        before = len(segs)
        for p in pieces:
            if p is _IMAGE:
                if role == "system":
                    raise FormatError(where, f"turn {t}: image placeholder in the system turn; "
                                             "expected images in human/gpt turns only", "image_count")
                segs.append(opts.segment(role, images[k], f"{where} image {k}", limits))
                k += 1
            else:
                segs.append(Segment(role, "text", text=p))
        if len(segs) == before and role != "system":
            reason = "empty_answer" if role == "assistant" else "empty_turn"
            what = "assistant answer" if role == "assistant" else f"{role} turn"
            raise FormatError(where, f"turn {t}: empty {what}; expected non-blank text or an image",
                              reason)
    if not any(s.role == "assistant" for s in segs):
        raise FormatError(where, "no assistant (gpt) turn; expected at least one answer", "bad_turn")
    return segs


def infer_task(segments: Sequence[Segment]) -> str:
    """A task tag from the shape: ``text`` (no image), ``conversation`` (user images only),
    ``generation`` (one assistant image ending the record, no user image), else ``interleaved``."""
    user = [s for s in segments if s.kind == "image" and s.role == "user"]
    asst = [s for s in segments if s.kind == "image" and s.role == "assistant"]
    if not user and not asst:
        return "text"
    if not asst:
        return "conversation"
    if not user and len(asst) == 1 and segments[-1] is asst[0]:
        return "generation"
    return "interleaved"


def check_task(task: str, segments: Sequence[Segment], where: str) -> None:
    """The image placement a known task implies (as ``sequence.validate_record`` will check)."""
    n_user = sum(1 for s in segments if s.kind == "image" and s.role == "user")
    n_asst = sum(1 for s in segments if s.kind == "image" and s.role == "assistant")
    if task in ("vqa", "caption") and (n_user < 1 or n_asst):
        raise FormatError(where, f"task {task!r} expects >=1 image in a human turn and none in gpt "
                                 f"turns, got {n_user} / {n_asst}", "image_count")
    if task in GENERATION_TASKS and n_asst < 1:
        raise FormatError(where, f"task {task!r} expects {IMAGE_PLACEHOLDER} in a gpt turn (the "
                                 "generated image), found none", "image_count")


def stream_for(record: Record) -> str:
    """The pipeline stream of an imported record: ``generation`` for generation tasks,
    ``understanding`` for records without assistant images, else ``interleaved``."""
    if record.task in GENERATION_TASKS:
        return "generation"
    if not record.images("assistant"):
        return "understanding"
    return "interleaved"


def _finish(rid: str, task: str | None, segs: list[Segment], attrs: dict, where: str) -> Record:
    task = task or infer_task(segs)
    check_task(task, segs, where)
    try:
        return Record(rid, task, segs, attrs).validate(where)
    except FormatError:
        raise
    except ValueError as e:
        raise FormatError(where, str(e), "invalid") from e


# ---------------------------------------------------------------------------------------- LLaVA JSON
def _str_id(v: Any, default: str, where: str) -> str:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise FormatError(where, f"'id' must be a string or integer, got {type(v).__name__}", "schema")
    return str(v)


def llava_record(item: Any, *, where: str, default_id: str = "", source: str = "", index: int = 0,
                 images: ImageOptions = ImageOptions(), limits: Limits = DEFAULT_LIMITS) -> Record:
    """One LLaVA/ShareGPT4V item -> Record (raises :class:`FormatError`)."""
    if not isinstance(item, dict):
        raise FormatError(where, f"expected a JSON object with 'conversations', got "
                                 f"{type(item).__name__}", "schema")
    rid = _str_id(item.get("id"), default_id or f"{source}#{index}", where)
    img = item.get("image")
    if img is None:
        refs: list = []
    elif isinstance(img, str):
        refs = [img]
    elif isinstance(img, list) and all(isinstance(x, str) for x in img):
        refs = list(img)
    else:
        raise FormatError(where, f"'image' must be a path string or a list of path strings, got "
                                 f"{type(img).__name__}", "schema")
    task = item.get("task")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise FormatError(where, f"'task' must be a non-empty string, got {task!r}", "schema")
    convs = item.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise FormatError(where, "'conversations' must be a non-empty list of {from, value} turns",
                          "schema")
    if len(convs) > limits.max_turns:
        raise FormatError(where, f"{len(convs)} turns exceed max_turns={limits.max_turns}", "oversized")
    turns = []
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) \
                or not isinstance(turn.get("value"), str):
            raise FormatError(where, f"turn {t}: expected {{'from': str, 'value': str}}, got "
                                     f"{str(turn)[:80]!r}", "schema")
        role = ROLE_NAMES.get(turn["from"])
        if role is None:
            raise FormatError(where, f"turn {t}: unknown role {turn['from']!r}; expected one of "
                                     "human, gpt, system (or user, assistant)", "unknown_role")
        if len(turn["value"]) > limits.max_text_chars:
            raise FormatError(where, f"turn {t}: {len(turn['value'])} characters exceed "
                                     f"max_text_chars={limits.max_text_chars}", "oversized")
        turns.append((role, split_placeholders(turn["value"])))
    segs = build_segments(turns, refs, where, images, limits)
    attrs: dict[str, Any] = {"source": source, "index": index}
    if task is not None:
        attrs[EXPLICIT_TASK] = task  # given by the data, not inferred (see caption_to_generation)
    if any(s.path is not None for s in segs):
        attrs["image_dir"] = images.image_dir
    return _finish(rid, task, segs, attrs, where)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_error(where: str, e: Exception, fatal: bool) -> FormatError:
    if isinstance(e, json.JSONDecodeError):
        msg = f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
    elif isinstance(e, RecursionError):
        msg = "malformed JSON: nesting too deep"
    else:
        msg = f"malformed JSON: {e}"
    return FormatError(where, msg + "; expected one JSON object per record", "malformed_json", fatal)


def iter_json_items(path: str, limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[int, Any]]:
    """(index, parsed item or FormatError) of a JSON list or JSON Lines file. List items are
    decoded one at a time, so a syntax error names its record index; a broken JSON list is fatal
    (later records cannot be located), a broken JSON Lines line only costs that record."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FormatError(path, f"cannot read data file ({e})", "io", fatal=True) from e
    if size > limits.max_file_bytes:
        raise FormatError(path, f"file of {size} bytes exceeds max_file_bytes={limits.max_file_bytes}; "
                                "split it (JSON Lines streams with bounded memory) or raise the "
                                "limit", "oversized", fatal=True)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head[:1] == b"[" and not path.endswith(".jsonl"):
        yield from _iter_json_list(path, limits)
    else:
        yield from _iter_json_lines(path, limits)


def _iter_json_list(path: str, limits: Limits) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError) as e:
        raise FormatError(path, f"cannot read as UTF-8 JSON ({e})", "malformed_json", fatal=True) from e
    dec = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if not text.startswith("[", pos):
        raise FormatError(path, "expected a JSON list of records", "malformed_json", fatal=True)
    pos = _skip_ws(text, pos + 1)
    if text.startswith("]", pos):
        pos = _skip_ws(text, pos + 1)
        if pos != len(text):
            raise FormatError(path, "extra data after the JSON list", "malformed_json", fatal=True)
        return
    i = 0
    while True:
        where = f"{path} record {i}"
        try:
            item, end = dec.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            raise _json_error(where, e, fatal=True) from e
        if end - pos > limits.max_record_bytes:
            yield i, FormatError(where, f"record of {end - pos} characters exceeds max_record_bytes="
                                        f"{limits.max_record_bytes}", "oversized")
        else:
            yield i, item
        i += 1
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
            if text.startswith("]", pos):
                raise FormatError(f"{path} record {i}", "malformed JSON: trailing comma before ']'",
                                  "malformed_json", fatal=True)
            continue
        if text.startswith("]", pos):
            if _skip_ws(text, pos + 1) != len(text):
                raise FormatError(path, "extra data after the JSON list", "malformed_json", fatal=True)
            return
        raise FormatError(f"{path} record {i - 1}", "malformed JSON: expected ',' or ']' after the "
                                                    "record", "malformed_json", fatal=True)


def _iter_json_lines(path: str, limits: Limits) -> Iterator[tuple[int, Any]]:
    cap = limits.max_record_bytes
    with open(path, "rb") as f:
        i = 0
        first = True
        while True:
            line = f.readline(cap + 1)
            if not line:
                return
            oversized = len(line) > cap
            if oversized:  # consume the rest of the line in bounded chunks
                while line and not line.endswith(b"\n"):
                    line = f.readline(cap + 1)
            if first:
                first = False
                if not oversized and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
            if not oversized and not line.strip():
                continue
            where = f"{path} record {i}"
            if oversized:
                yield i, FormatError(where, f"line longer than max_record_bytes={cap}", "oversized")
            else:
                try:
                    yield i, json.loads(line.decode("utf-8"))
                except (ValueError, RecursionError) as e:
                    yield i, _json_error(where, e, fatal=False)
            i += 1


def iter_llava(path: str, image_dir: str = "", *, load_pixels: bool = False,
               check_files: bool = True, image_size: int | None = None, on_error: str = "raise",
               stats: ImportStats | None = None, limits: Limits = DEFAULT_LIMITS) -> Iterator[Record]:
    """Records of a LLaVA/ShareGPT4V JSON (list) or JSON Lines file; ``stats`` (filled in place)
    counts what was read, kept and skipped."""
    _check_on_error(on_error)
    stats = stats if stats is not None else ImportStats()
    opts = ImageOptions(image_dir, load_pixels, check_files, image_size)
    base = os.path.basename(path)
    ambiguous = 0
    try:
        for i, item in iter_json_items(path, limits):
            stats.read += 1
            where = f"{path} record {i}"
            try:
                if isinstance(item, FormatError):
                    raise item
                rec = llava_record(item, where=where, default_id=f"{base}#{i}", source=path, index=i,
                                   images=opts, limits=limits)
            except FormatError as e:
                stats.handle(e, on_error)
                continue
            ambiguous += _keep(stats, rec)
            yield rec
    finally:
        _warn_ambiguous_hours(path, ambiguous)


# ---------------------------------------------------------------------------------------- caption -> generation
REQUEST_PHRASINGS = (
    "Create an image that fits this description:",
    "Please produce a picture matching the caption below.",
    "Paint the scene described here:",
)
ACKNOWLEDGEMENTS = (
    "Here is an image that matches the description.",
    "Sure, this picture follows your caption.",
    "Done, the requested image is below.",
)


def skip_paths(*needles: str) -> Callable[[Record], bool]:
    """A skip predicate: true when any image path of the record starts with or contains a
    ``/``-delimited component sequence equal to one of ``needles`` (e.g. ``skip_paths("sam")`` skips
    ShareGPT4V's SAM images, as the reference conversion did)."""
    parts = [tuple(p for p in n.strip("/").split("/") if p) for n in needles]

    def pred(rec: Record) -> bool:
        for s in rec.images():
            if s.path is None:
                continue
            comps = tuple(s.path.replace("\\", "/").split("/"))
            for p in parts:
                if any(comps[j:j + len(p)] == p for j in range(len(comps) - len(p) + 1)):
                    return True
        return False
    return pred


def explicit_task(record: Record) -> str | None:
    """The task the data gave ``record``, or None when its task was inferred from the shape:
    ``attributes["task"]`` (:data:`EXPLICIT_TASK`; the LLaVA item's ``task`` key, or a parquet
    ``task`` column) when set, else ``record.task`` when it differs from :func:`infer_task` (a tag set
    by whoever built the record), else None."""
    tag = record.attributes.get(EXPLICIT_TASK)
    if isinstance(tag, str) and tag.strip():
        return tag
    return record.task if record.task != infer_task(record.segments) else None


def caption_problem(record: Record) -> str | None:
    """Why ``record`` is not a caption (None when it is). The rule: an explicit task
    (:func:`explicit_task`) must be ``caption``; an absent one is fine (ShareGPT4V caption files have
    no ``task`` key). Either way the shape must be a caption: an optional system turn, then one user
    turn holding exactly one image, then one assistant answer that is a single non-empty text (no
    assistant image). More than one human+gpt exchange (a multi-turn conversation) is not a caption."""
    tag = explicit_task(record)
    if tag is not None and tag.strip().lower() != "caption":
        return (f"explicit task {tag!r}; only task 'caption' (or no task, with the caption shape) "
                "becomes a generation prompt")
    roles = [r for r, _ in itertools.groupby(s.role for s in record.segments)]
    if roles[:1] == ["system"]:
        roles = roles[1:]
    answer = [s for s in record.segments if s.role == "assistant"]
    n_user, n_asst = len(record.images("user")), len(record.images("assistant"))
    label = f"task {record.task!r}" + (", explicit" if tag is not None else ", inferred")
    if roles.count("assistant") > 1:
        return (f"{label}: a multi-turn conversation ({roles.count('assistant')} exchanges); expected "
                "one human turn and one gpt answer")
    text = (answer[0].text or "").strip() if len(answer) == 1 and answer[0].kind == "text" else ""
    if roles != ["user", "assistant"] or n_user != 1 or n_asst or not text:
        return (f"{label}: expected 1 user image, no assistant image and a single-turn caption "
                f"answer, got {n_user}/{n_asst} images and caption {text[:40]!r}")
    return None


def caption_to_generation(records: Iterable[Record], *, seed: int = 0,
                          skip: Callable[[Record], bool] | None = None, limit: int | None = None,
                          on_error: str = "raise", stats: ImportStats | None = None) -> Iterator[Record]:
    """Caption records -> generation records: user ``"<request> <caption>"``, assistant
    ``"<acknowledgement>"`` + the image. Which records are captions is :func:`caption_problem`'s
    rule: an explicit task other than ``caption`` (e.g. a VQA record whose answer is ``62%``) or a
    multi-turn conversation is skipped as ``not_caption`` (raised, naming file, record index, id and
    task, under ``on_error="raise"``); a record without a task is converted when it has the caption
    shape. Phrasings are drawn from ``(seed, position in the input)``, so output is deterministic and
    independent of ``skip`` and ``limit``; at most ``limit`` records are produced (input is read no
    further)."""
    _check_on_error(on_error)
    stats = stats if stats is not None else ImportStats()
    made = 0
    if limit is not None and limit <= 0:
        return
    for i, rec in enumerate(records):
        src_file, src_index = rec.attributes.get("source"), rec.attributes.get("index")
        where = (f"{src_file} record {src_index}" if src_file else f"input {i}") + f" (id {rec.id!r})"
        if skip is not None and skip(rec):
            stats.skipped["predicate"] += 1
            continue
        problem = caption_problem(rec)
        if problem is not None:
            stats.handle(FormatError(where, f"not a caption record: {problem}", "not_caption"),
                         on_error)
            continue
        user_imgs = rec.images("user")
        caption = next(s.text or "" for s in rec.segments if s.role == "assistant").strip()
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCA9, i]))
        q, a = int(rng.integers(len(REQUEST_PHRASINGS))), int(rng.integers(len(ACKNOWLEDGEMENTS)))
        src = user_imgs[0]
        image = Segment("assistant", "image", pixels=src.pixels, path=src.path, codes=src.codes,
                        features=src.features)
        segs = [Segment("user", "text", text=f"{REQUEST_PHRASINGS[q]} {caption}"),
                Segment("assistant", "text", text=ACKNOWLEDGEMENTS[a]), image]
        attrs = {k: v for k, v in rec.attributes.items() if k != EXPLICIT_TASK}  # task is now generation
        attrs.update(converted_from=rec.id, request=q, acknowledgement=a)
        made += 1
        stats.kept += 1
        yield Record(f"{rec.id}/generation", "generation", segs, attrs).validate(where)
        if limit is not None and made >= limit:
            return


def iter_caption_generation(path: str, image_dir: str = "", *, seed: int = 0,
                            skip: Callable[[Record], bool] | None = None, limit: int | None = None,
                            on_error: str = "raise", stats: ImportStats | None = None,
                            **llava_kw) -> Iterator[Record]:
    """:func:`caption_to_generation` over :func:`iter_llava` of a ShareGPT4V caption file."""
    stats = stats if stats is not None else ImportStats()
    inner = ImportStats()
    recs = iter_llava(path, image_dir, on_error=on_error, stats=inner, **llava_kw)
    try:
        yield from caption_to_generation(recs, seed=seed, skip=skip, limit=limit, on_error=on_error,
                                         stats=stats)
    finally:
        stats.absorb_reading(inner)


# ---------------------------------------------------------------------------------------- UnifiedVisual parquet
TURN_COLUMNS = ("conversations", "messages", "conversation")
ROLE_FIELDS = ("from", "role")
CONTENT_FIELDS = ("value", "content")
IMAGE_COLUMNS = ("images", "image")
PROMPT_COLUMNS = ("prompt", "question", "input", "instruction", "query")
RESPONSE_COLUMNS = ("response", "answer", "output", "solution")
ID_COLUMNS = ("id", "uid", "sample_id")
TASK_COLUMNS = ("task", "subset")

LAYOUTS = {
    "turns": "a list<struct<from|role: string, value|content: string>> column named "
             f"{'|'.join(TURN_COLUMNS)} with placeholders in the text, + optional image column",
    "typed_turns": "the same column with content: list<struct<type: string ('text'|'image'), "
                   "text: string>>; each 'image' item takes the next image of the image column",
    "prompt_response": f"string columns {'|'.join(PROMPT_COLUMNS)} and {'|'.join(RESPONSE_COLUMNS)} "
                       "with placeholders, + an image column (consumed prompt first) or separate "
                       "input_images/output_images columns",
}
IMAGE_COLUMN_DOC = (f"image column {'|'.join(IMAGE_COLUMNS)}: list of (or one) relative path string, "
                    "binary image bytes, or struct<bytes: binary, path: string> (HF Image)")


def _pa():
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pa, pq


def _image_type_ok(t) -> bool:
    pa, _ = _pa()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return bool(names & {"bytes", "path"})
    return False


def _is_list(t) -> bool:
    pa, _ = _pa()
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_str(t) -> bool:
    pa, _ = _pa()
    return pa.types.is_string(t) or pa.types.is_large_string(t)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A recognised parquet layout: ``name`` (a key of :data:`LAYOUTS`) and the physical column (or
    struct field) names it reads."""
    name: str
    turns: str = ""
    role_field: str = ""
    content_field: str = ""
    prompt: str = ""
    response: str = ""
    images: str = ""
    input_images: str = ""
    output_images: str = ""
    id: str = ""
    task: str = ""

    def columns(self) -> list[str]:
        return [c for c in (self.turns, self.prompt, self.response, self.images, self.input_images,
                            self.output_images, self.id, self.task) if c]


def _columns_text(schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def detect_layout(schema, path: str = "parquet", column_map: dict[str, str] | None = None) -> Layout:
    """Matches a parquet schema against :data:`LAYOUTS`. ``column_map`` names columns explicitly
    (keys: turns, prompt, response, images, input_images, output_images, id, task). Unknown layouts
    raise a fatal :class:`FormatError` listing the columns found."""
    cm = dict(column_map or {})
    allowed = {f.name for f in dataclasses.fields(Layout)} - {"name"}
    if set(cm) - allowed:
        raise ValueError(f"column_map keys {sorted(set(cm) - allowed)} unknown; expected {sorted(allowed)}")
    names = set(schema.names)

    def pick(key: str, candidates: Sequence[str], ok) -> str:
        if key in cm:
            if cm[key] not in names:
                raise FormatError(path, f"column_map[{key!r}] = {cm[key]!r} is not a column; columns "
                                        f"found: {_columns_text(schema)}", "schema", fatal=True)
            return cm[key]
        for c in candidates:
            if c in names and ok(schema.field(c).type):
                return c
        return ""

    def image_col_ok(t) -> bool:
        return _image_type_ok(t) or (_is_list(t) and _image_type_ok(t.value_type))

    common = {
        "id": pick("id", ID_COLUMNS, lambda t: _is_str(t) or _pa()[0].types.is_integer(t)),
        "task": pick("task", TASK_COLUMNS, _is_str),
    }
    images = pick("images", IMAGE_COLUMNS, image_col_ok)
    turns = pick("turns", TURN_COLUMNS, lambda t: _is_list(t) and _pa()[0].types.is_struct(t.value_type))
    if turns:
        st = schema.field(turns).type.value_type
        fields = {st.field(i).name: st.field(i).type for i in range(st.num_fields)}
        role = cm.get("role_field") or next((f for f in ROLE_FIELDS if f in fields), "")
        content = cm.get("content_field") or next((f for f in CONTENT_FIELDS if f in fields), "")
        if role in fields and content in fields and _is_str(fields[role]):
            ct = fields[content]
            if _is_str(ct):
                return Layout("turns", turns=turns, role_field=role, content_field=content,
                              images=images, **common)
            if _is_list(ct) and _pa()[0].types.is_struct(ct.value_type):
                sub = {ct.value_type.field(i).name for i in range(ct.value_type.num_fields)}
                if {"type", "text"} <= sub:
                    return Layout("typed_turns", turns=turns, role_field=role, content_field=content,
                                  images=images, **common)
    prompt = pick("prompt", PROMPT_COLUMNS, _is_str)
    response = pick("response", RESPONSE_COLUMNS, _is_str)
    if prompt and response:
        inp = pick("input_images", ("input_images", "input_image"), image_col_ok)
        outp = pick("output_images", ("output_images", "output_image"), image_col_ok)
        if (inp or outp) and images:
            raise FormatError(path, f"both a shared image column {images!r} and input/output image "
                                    f"columns; columns found: {_columns_text(schema)}", "schema",
                              fatal=True)
        return Layout("prompt_response", prompt=prompt, response=response, images=images,
                      input_images=inp, output_images=outp, **common)
    layouts = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    raise FormatError(path, f"unrecognised UnifiedVisual parquet layout. Columns found: "
                            f"{_columns_text(schema)}. Supported layouts: {layouts}; {IMAGE_COLUMN_DOC}. "
                            "Inspect rows with formats.describe(path) and pass column_map=... or add "
                            "a layout", "unknown_layout", fatal=True)


def read_layout(path: str, column_map: dict[str, str] | None = None) -> Layout:
    """The layout of one parquet file, from its schema (``pyarrow.parquet.read_schema``)."""
    _, pq = _pa()
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as e:
        raise FormatError(path, f"cannot read a parquet schema ({e})", "io", fatal=True) from e
    return detect_layout(schema, path, column_map)


def _image_list(v: Any, where: str, column: str) -> list:
    if v is None:
        return []
    if isinstance(v, list):
        if any(x is None for x in v):
            raise FormatError(where, f"null entry in image column {column!r}", "bad_image")
        return v
    return [v]


def _row_turns(row: dict, lay: Layout, where: str, placeholder, limits: Limits) -> list:
    if lay.name == "prompt_response":
        out = []
        for role, col in (("user", lay.prompt), ("assistant", lay.response)):
            v = row.get(col)
            if not isinstance(v, str):
                raise FormatError(where, f"column {col!r} is null; expected text", "schema")
            if len(v) > limits.max_text_chars:
                raise FormatError(where, f"column {col!r}: {len(v)} characters exceed "
                                         f"max_text_chars={limits.max_text_chars}", "oversized")
            out.append((role, split_placeholders(v, placeholder)))
        return out
    convs = row.get(lay.turns)
    if not isinstance(convs, list) or not convs:
        raise FormatError(where, f"column {lay.turns!r} is null or empty; expected a list of turns",
                          "schema")
    if len(convs) > limits.max_turns:
        raise FormatError(where, f"{len(convs)} turns exceed max_turns={limits.max_turns}", "oversized")
    out = []
    for t, turn in enumerate(convs):
        r = (turn or {}).get(lay.role_field)
        role = ROLE_NAMES.get(r) if isinstance(r, str) else None
        if role is None:
            raise FormatError(where, f"turn {t}: unknown role {r!r}; expected one of "
                                     f"{sorted(ROLE_NAMES)}", "unknown_role")
        content = turn.get(lay.content_field)
        if lay.name == "turns":
            if not isinstance(content, str):
                raise FormatError(where, f"turn {t}: {lay.content_field!r} is null", "schema")
            if len(content) > limits.max_text_chars:
                raise FormatError(where, f"turn {t}: {len(content)} characters exceed "
                                         f"max_text_chars={limits.max_text_chars}", "oversized")
            out.append((role, split_placeholders(content, placeholder)))
            continue
        pieces: list = []
        for j, item in enumerate(content or []):
            typ = (item or {}).get("type")
            if typ == "image":
                pieces.append(_IMAGE)
            elif typ == "text":
                text = item.get("text") or ""
                if len(text) > limits.max_text_chars:
                    raise FormatError(where, f"turn {t} item {j}: text exceeds max_text_chars",
                                      "oversized")
                if placeholder.search(text):
                    raise FormatError(where, f"turn {t} item {j}: placeholder inside a typed text item; "
                                             "expected images as {'type': 'image'} items",
                                      "image_count")
                if text.strip():
                    pieces.append(text.strip())
            else:
                raise FormatError(where, f"turn {t} item {j}: content type {typ!r}; expected 'text' "
                                         "or 'image'", "schema")
        out.append((role, pieces))
    return out


def unifiedvisual_record(row: dict, lay: Layout, *, where: str, default_id: str, source: str,
                         index: int, task: str | None = None, images: ImageOptions = ImageOptions(),
                         limits: Limits = DEFAULT_LIMITS,
                         placeholder: str | re.Pattern = IMAGE_PLACEHOLDER) -> Record:
    """One parquet row (as a dict) -> Record, by the detected layout."""
    pat = placeholder if isinstance(placeholder, re.Pattern) else re.compile(re.escape(placeholder))
    turns = _row_turns(row, lay, where, pat, limits)
    if lay.name == "prompt_response" and (lay.input_images or lay.output_images):
        # separate columns: check each side's count, then lay them out as one list in turn order
        ins = _image_list(row.get(lay.input_images), where, lay.input_images) if lay.input_images else []
        outs = _image_list(row.get(lay.output_images), where, lay.output_images) if lay.output_images else []
        for (role, pieces), got, col in zip(turns, (ins, outs), ("input", "output")):
            n = sum(1 for p in pieces if p is _IMAGE)
            if n != len(got):
                raise FormatError(where, f"{n} placeholder(s) in the {role} text but {len(got)} "
                                         f"{col} image(s); expected equal counts", "image_count")
        refs = ins + outs
    else:
        refs = _image_list(row.get(lay.images), where, lay.images) if lay.images else []
    segs = build_segments(turns, refs, where, images, limits)
    rid = _str_id(row.get(lay.id) if lay.id else None, default_id, where)
    tag = task or (row.get(lay.task) if lay.task else None)
    if tag is not None and (not isinstance(tag, str) or not tag.strip()):
        tag = None
    attrs: dict[str, Any] = {"source": source, "index": index, "layout": lay.name}
    if lay.task and isinstance(row.get(lay.task), str):
        attrs[lay.task] = row[lay.task]
    if any(s.path is not None for s in segs):
        attrs["image_dir"] = images.image_dir
    return _finish(rid, tag, segs, attrs, where)


def iter_unifiedvisual(path: str, image_dir: str = "", *, task: str | None = None,
                       load_pixels: bool = False, check_files: bool = True,
                       image_size: int | None = None, on_error: str = "raise",
                       stats: ImportStats | None = None, limits: Limits = DEFAULT_LIMITS,
                       column_map: dict[str, str] | None = None,
                       placeholder: str | re.Pattern = IMAGE_PLACEHOLDER,
                       batch_size: int = 64) -> Iterator[Record]:
    """Records of one UnifiedVisual-style parquet file, read in batches of ``batch_size`` rows.
    ``task`` overrides the tag (default: a task/subset column, else inferred from the shape)."""
    _check_on_error(on_error)
    stats = stats if stats is not None else ImportStats()
    lay = read_layout(path, column_map)
    opts = ImageOptions(image_dir, load_pixels, check_files, image_size)
    base = os.path.basename(path)
    i = 0
    ambiguous = 0
    try:
        for row in _parquet_rows(path, lay.columns(), batch_size):
            stats.read += 1
            where = f"{path} row {i}"
            try:
                rec = unifiedvisual_record(row, lay, where=where, default_id=f"{base}#{i}", source=path,
                                           index=i, task=task, images=opts, limits=limits,
                                           placeholder=placeholder)
            except FormatError as e:
                stats.handle(e, on_error)
            else:
                ambiguous += _keep(stats, rec)
                yield rec
            i += 1
    finally:
        _warn_ambiguous_hours(path, ambiguous)


def _parquet_rows(path: str, columns: list[str], batch_size: int) -> Iterator[dict]:
    """Rows as dicts, batch by batch; pyarrow read errors become fatal FormatErrors."""
    _, pq = _pa()
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)
        for batch in batches:
            rows = batch.to_pylist()
            yield from rows
    except (OSError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(path, f"cannot read parquet rows ({e})", "io", fatal=True) from e


def _short(v: Any, n: int = 160) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, str):
        return v if len(v) <= n else v[:n] + f"...<{len(v)} chars>"
    if isinstance(v, list):
        return [_short(x, n) for x in v[:8]] + ([f"...<{len(v)} items>"] if len(v) > 8 else [])
    if isinstance(v, dict):
        return {k: _short(x, n) for k, x in v.items()}
    return v


def describe(path: str, rows: int = 3, out=None) -> str:
    """Prints (to ``out``, default stdout) and returns: the schema, the detected layout (or why none
    matched) and the first ``rows`` rows with long values shortened. For inspecting unverified data."""
    _, pq = _pa()
    pf = pq.ParquetFile(path)
    lines = [f"{path}: {pf.metadata.num_rows} rows, {pf.metadata.num_row_groups} row groups",
             "columns:"] + [f"  {f.name}: {f.type}" for f in pf.schema_arrow]
    try:
        lines.append(f"layout: {detect_layout(pf.schema_arrow, path)}")
    except FormatError as e:
        lines.append(f"layout: none ({e})")
    shown = 0
    for batch in pf.iter_batches(batch_size=max(1, rows)):
        for row in batch.to_pylist():
            if shown >= rows:
                break
            lines.append(f"row {shown}: {json.dumps(_short(row), ensure_ascii=False, default=str)}")
            shown += 1
        if shown >= rows:
            break
    text = "\n".join(lines)
    print(text, file=out or sys.stdout)
    return text


# ---------------------------------------------------------------------------------------- conversion
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


MANIFEST_NAME = "import_manifest.json"
MANIFEST_KEYS = ("format", "sources", "image_dir", "counts", "paths", "created")


def _load_manifest(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the import manifest ({e})") from e
    if not isinstance(m, dict) or set(m) != set(MANIFEST_KEYS) or not isinstance(m["image_dir"], str) \
            or not isinstance(m["paths"], dict) or not isinstance(m["sources"], list):
        got = sorted(m) if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"{path}: not an import manifest; expected a JSON object with keys "
                         f"{list(MANIFEST_KEYS)} (image_dir a string), got {got}")
    return m


def read_manifest(shard_dir_or_glob: str | os.PathLike | Sequence[str]) -> dict[str, Any]:
    """The import manifest (see the module docstring) of a shard directory: ``shard_dir_or_glob`` is
    the directory, a shard path or glob whose directory holds :data:`MANIFEST_NAME`, the manifest
    file itself, or a list of those (all in one directory). Raises FileNotFoundError naming where it
    looked when there is none, ValueError when the shards span several directories' manifests or the
    file is not a manifest."""
    items = [shard_dir_or_glob] if isinstance(shard_dir_or_glob, (str, os.PathLike)) \
        else list(shard_dir_or_glob)
    looked: list[str] = []
    for it in map(os.fspath, items):
        if os.path.isdir(it):
            dirs = [it]
        elif os.path.basename(it) == MANIFEST_NAME:
            dirs = [os.path.dirname(it) or "."]
        elif any(ch in it for ch in "*?["):
            dirs = sorted({os.path.dirname(p) or "." for p in glob.glob(it)})
            if not dirs and not any(ch in os.path.dirname(it) for ch in "*?["):
                dirs = [os.path.dirname(it) or "."]
        else:
            dirs = [os.path.dirname(it) or "."]
        looked.extend(os.path.abspath(os.path.join(d, MANIFEST_NAME)) for d in dirs)
    looked = list(dict.fromkeys(looked))
    found = [p for p in looked if os.path.isfile(p)]
    if not found:
        where = ", ".join(looked) if looked else \
            "nowhere (no path matches it, so no directory to look in)"
        raise FileNotFoundError(f"no import manifest for shards {shard_dir_or_glob!r}: looked for "
                                f"{where}. It is written beside the shards by `python -m "
                                "uvjax.data.formats convert`; re-run the import to create it")
    if len({os.path.realpath(p) for p in found}) > 1:
        raise ValueError(f"shards {shard_dir_or_glob!r} span several import manifests {found}; "
                         "read each directory's manifest separately")
    return _load_manifest(found[0])


def _check_out_dir_manifest(out_dir: str, image_dir: str, prefix: str) -> None:
    """A shard directory has one manifest: refuse to import into a directory whose earlier import
    (other shards, still present) used another image folder, which the manifest could not name."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return
    try:
        old = _load_manifest(path)
    except ValueError as e:
        log.warning("replacing an unreadable manifest: %s", e)
        return
    others = [p for ps in old["paths"].values() if isinstance(ps, list) for p in ps
              if isinstance(p, str) and os.path.isfile(p)
              and not os.path.basename(p).startswith(f"{prefix}-")]
    if not others:
        return
    if old["image_dir"] != image_dir:
        raise ValueError(f"{out_dir} already holds shards of another import ({len(others)} shard(s), "
                         f"e.g. {others[0]}) whose images are relative to {old['image_dir']!r}, but "
                         f"this import's images are relative to {image_dir!r}; the directory's one "
                         f"{MANIFEST_NAME} cannot name both: use a separate out_dir")
    log.warning("%s: replacing the manifest of an earlier import (%d other shard(s), same image "
                "folder); it will describe this import only", path, len(others))


def write_manifest(out_dir: str, *, format: str, sources: Sequence[str], image_dir: str,
                   counts: dict[str, Any], paths: dict[str, list[str]]) -> str:
    """Writes ``{out_dir}/import_manifest.json`` (atomically) and returns its path."""
    manifest = {
        "format": format,
        "sources": [os.path.abspath(p) for p in sources],
        "image_dir": (image_dir.rstrip("/") if "://" in image_dir else os.path.realpath(image_dir)) if image_dir else "",
        "counts": counts,
        "paths": {s: [os.path.abspath(p) for p in ps] for s, ps in paths.items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def convert(source: str | Sequence[str], out_dir: str, *, format: str, image_dir: str = "",
            prefix: str = "data", stream: str | None = None, records_per_shard: int = 2000,
            on_error: str = "raise", **options) -> dict[str, Any]:
    """Imports ``source`` and writes ArrayRecord shards. ``stream=None`` splits by
    :func:`stream_for` into ``{out_dir}/{prefix}-{stream}-NNNNN.array_record``; a named stream writes
    everything to ``{prefix}-{stream}-...`` via ``storage.write_records``. Then writes the import
    manifest ``{out_dir}/import_manifest.json`` (module docstring; read it with
    :func:`read_manifest`). Returns ``{"paths": {stream: [...]}, "counts": ImportStats.as_dict(),
    "manifest": manifest path}``."""
    _check_on_error(on_error)
    if stream is not None and stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS} or None, got {stream!r}")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    files = _expand_sources(source, format)
    real_image_dir = (image_dir.rstrip("/") if "://" in image_dir else os.path.realpath(image_dir)) if image_dir else ""
    _check_out_dir_manifest(out_dir, real_image_dir, prefix)
    stats = ImportStats()
    recs = _iter_files(files, format=format, image_dir=image_dir, on_error=on_error, stats=stats,
                       **options)
    if stream is not None:
        paths = {stream: storage.write_records(recs, out_dir, f"{prefix}-{stream}", records_per_shard)}
    else:
        writers = {s: storage.ShardWriter(out_dir, f"{prefix}-{s}", records_per_shard) for s in STREAMS}
        try:
            for rec in recs:
                writers[stream_for(rec)].write(rec)
        finally:
            paths = {s: w.close() for s, w in writers.items()}
    paths = {s: p for s, p in paths.items() if p}
    counts = stats.as_dict()
    manifest = write_manifest(out_dir, format=format, sources=files, image_dir=image_dir,
                              counts=counts, paths=paths)
    return {"paths": paths, "counts": counts, "manifest": manifest}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m uvjax.data.formats convert|describe ...``"""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m uvjax.data.formats", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="import files and write ArrayRecord shards")
    c.add_argument("source", nargs="+")
    c.add_argument("--format", required=True, choices=FORMATS)
    c.add_argument("--out_dir", required=True)
    c.add_argument("--image_dir", default="")
    c.add_argument("--prefix", default="data")
    c.add_argument("--stream", default=None, choices=STREAMS)
    c.add_argument("--on_error", default="raise", choices=("raise", "skip"))
    c.add_argument("--load_pixels", action="store_true")
    c.add_argument("--seed", type=int, default=0, help="caption_generation phrasing seed")
    c.add_argument("--limit", type=int, default=None, help="caption_generation record limit")
    c.add_argument("--skip_paths", nargs="*", default=[], help="caption_generation: skip image "
                   "paths with these components (e.g. sam)")
    d = sub.add_parser("describe", help="print schema, layout and rows of parquet files")
    d.add_argument("paths", nargs="+")
    d.add_argument("--rows", type=int, default=3)
    a = ap.parse_args(argv)
    if a.cmd == "describe":
        for p in a.paths:
            describe(p, a.rows)
        return 0
    opts: dict[str, Any] = {"load_pixels": a.load_pixels}
    if a.format == "caption_generation":
        opts.update(seed=a.seed, limit=a.limit, skip=skip_paths(*a.skip_paths) if a.skip_paths else None)
    res = convert(a.source, a.out_dir, format=a.format, image_dir=a.image_dir, prefix=a.prefix,
                  stream=a.stream, on_error=a.on_error, **opts)
    print(json.dumps(res, indent=1))
    print(f"manifest: {res['manifest']}")
    print(f"import summary: {summary_line(res['counts'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
