"""UnifiedVisual-style parquet -> records: each row read by the layout its file's schema matches
(``parquet_layout.detect_layout``); the real schema is unverified, so an unknown layout fails naming the
columns found. Images are a column of relative paths, embedded bytes (decoded to pixels) or HF
``{bytes, path}`` structs, consumed by the placeholders (or typed ``image`` items) in turn order."""
from __future__ import annotations

import os
import re
from typing import Any, Iterator

from uvjax.data.importers.common import (
    DEFAULT_LIMITS,
    ROLE_NAMES,
    FormatError,
    ImportStats,
    Limits,
    check_on_error,
    count_kept,
    warn_ambiguous_hours,
)
from uvjax.data.importers.parquet_layout import Layout, parquet_rows, read_layout
from uvjax.data.importers.paths import ImageOptions
from uvjax.data.importers.segments import IMAGE, build_segments, finish_record, split_placeholders, str_id
from uvjax.data.records import Record
from uvjax.data.tokenizer import IMAGE_PLACEHOLDER


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
                pieces.append(IMAGE)
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
            n = sum(1 for p in pieces if p is IMAGE)
            if n != len(got):
                raise FormatError(where, f"{n} placeholder(s) in the {role} text but {len(got)} "
                                         f"{col} image(s); expected equal counts", "image_count")
        refs = ins + outs
    else:
        refs = _image_list(row.get(lay.images), where, lay.images) if lay.images else []
    segs = build_segments(turns, refs, where, images, limits)
    rid = str_id(row.get(lay.id) if lay.id else None, default_id, where)
    tag = task or (row.get(lay.task) if lay.task else None)
    if tag is not None and (not isinstance(tag, str) or not tag.strip()):
        tag = None
    attrs: dict[str, Any] = {"source": source, "index": index, "layout": lay.name}
    if lay.task and isinstance(row.get(lay.task), str):
        attrs[lay.task] = row[lay.task]
    if any(s.path is not None for s in segs):
        attrs["image_dir"] = images.image_dir
    return finish_record(rid, tag, segs, attrs, where)


def iter_unifiedvisual(path: str, image_dir: str = "", *, task: str | None = None,
                       load_pixels: bool = False, check_files: bool = True,
                       image_size: int | None = None, on_error: str = "raise",
                       stats: ImportStats | None = None, limits: Limits = DEFAULT_LIMITS,
                       column_map: dict[str, str] | None = None,
                       placeholder: str | re.Pattern = IMAGE_PLACEHOLDER,
                       batch_size: int = 64) -> Iterator[Record]:
    """Records of one UnifiedVisual-style parquet file, read in batches of ``batch_size`` rows.
    ``task`` overrides the tag (default: a task/subset column, else inferred from the shape)."""
    check_on_error(on_error)
    stats = stats if stats is not None else ImportStats()
    lay = read_layout(path, column_map)
    opts = ImageOptions(image_dir, load_pixels, check_files, image_size)
    base = os.path.basename(path)
    i = 0
    ambiguous = 0
    try:
        for row in parquet_rows(path, lay.columns(), batch_size):
            stats.read += 1
            where = f"{path} row {i}"
            try:
                rec = unifiedvisual_record(row, lay, where=where, default_id=f"{base}#{i}", source=path,
                                           index=i, task=task, images=opts, limits=limits,
                                           placeholder=placeholder)
            except FormatError as e:
                stats.handle(e, on_error)
            else:
                ambiguous += count_kept(stats, rec)
                yield rec
            i += 1
    finally:
        warn_ambiguous_hours(path, ambiguous)
