"""LLaVA / ShareGPT4V conversation JSON (a JSON list or JSON Lines) -> records.

An item is ``{"id", "image"?, "conversations": [{"from": human|gpt|system, "value"}], "task"?}``.
Every ``<image>`` placeholder becomes an image segment of the turn it sits in, in order: in a human
turn an understanding input, in a gpt turn a generation target. ``image`` is a path, or a list of
paths, relative to ``image_dir``; the number of placeholders must equal the number of paths. A
``task`` key is kept in ``attributes["task"]`` (``common.EXPLICIT_TASK``: given by the data, not
inferred)."""
from __future__ import annotations

import os
from typing import Any, Iterator

from uvjax.data.importers.common import (
    DEFAULT_LIMITS,
    EXPLICIT_TASK,
    ROLE_NAMES,
    FormatError,
    ImportStats,
    Limits,
    check_on_error,
    count_kept,
    warn_ambiguous_hours,
)
from uvjax.data.importers.json_stream import iter_json_items
from uvjax.data.importers.paths import ImageOptions
from uvjax.data.importers.segments import build_segments, finish_record, split_placeholders, str_id
from uvjax.data.records import Record


def llava_record(item: Any, *, where: str, default_id: str = "", source: str = "", index: int = 0,
                 images: ImageOptions = ImageOptions(), limits: Limits = DEFAULT_LIMITS) -> Record:
    """One LLaVA/ShareGPT4V item -> Record (raises :class:`~.common.FormatError`)."""
    if not isinstance(item, dict):
        raise FormatError(where, f"expected a JSON object with 'conversations', got "
                                 f"{type(item).__name__}", "schema")
    rid = str_id(item.get("id"), default_id or f"{source}#{index}", where)
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
        attrs[EXPLICIT_TASK] = task  # given by the data, not inferred (see captions.caption_to_generation)
    if any(s.path is not None for s in segs):
        attrs["image_dir"] = images.image_dir
    return finish_record(rid, task, segs, attrs, where)


def iter_llava(path: str, image_dir: str = "", *, load_pixels: bool = False,
               check_files: bool = True, image_size: int | None = None, on_error: str = "raise",
               stats: ImportStats | None = None, limits: Limits = DEFAULT_LIMITS) -> Iterator[Record]:
    """Records of a LLaVA/ShareGPT4V JSON (list) or JSON Lines file; ``stats`` (filled in place)
    counts what was read, kept and skipped."""
    check_on_error(on_error)
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
            ambiguous += count_kept(stats, rec)
            yield rec
    finally:
        warn_ambiguous_hours(path, ambiguous)
