"""Turns of any source format -> segments -> a checked :class:`~uvjax.data.records.Record`.

A turn is ``(role, pieces)``: stripped non-empty text strings and :data:`IMAGE` slots, in order
(:func:`split_placeholders` makes them from text with ``<image>`` placeholders). :func:`build_segments`
fills the slots with the record's image references; :func:`finish_record` tags the task (the data's,
else :func:`~uvjax.data.tasks.infer_task`), checks the image placement it promises (:func:`check_task`,
the rule of ``uvjax.data.tasks``) and validates the record."""
from __future__ import annotations

import re
from typing import Any, Sequence

from uvjax.data import tasks
from uvjax.data.importers.common import FormatError, Limits
from uvjax.data.importers.paths import ImageOptions
from uvjax.data.records import Record, Segment
from uvjax.data.tokenizer import IMAGE_PLACEHOLDER

IMAGE = object()  # an image slot in a split turn


def split_placeholders(text: str, placeholder: str | re.Pattern = IMAGE_PLACEHOLDER) -> list:
    """Text with placeholders -> pieces: stripped non-empty strings and ``IMAGE`` slots, in order.
    ``placeholder`` is a literal string or a compiled regular expression."""
    pat = placeholder if isinstance(placeholder, re.Pattern) else re.compile(re.escape(placeholder))
    out: list = []
    pos = 0
    for m in pat.finditer(text):
        piece = text[pos:m.start()].strip()
        if piece:
            out.append(piece)
        out.append(IMAGE)
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
    slots = sum(1 for _, pieces in turns for p in pieces if p is IMAGE)
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
            if p is IMAGE:
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


def check_task(task: str, segments: Sequence[Segment], where: str) -> None:
    """The image placement a known task implies (``tasks.image_problem``, the rule the sequence
    encoder checks too); raises :class:`FormatError` (``image_count``)."""
    n_user = sum(1 for s in segments if s.kind == "image" and s.role == "user")
    n_asst = sum(1 for s in segments if s.kind == "image" and s.role == "assistant")
    problem = tasks.image_problem(task, n_user, n_asst)
    if problem is not None:
        raise FormatError(where, f"{problem} (user images are {IMAGE_PLACEHOLDER} in human turns, "
                                 "assistant images in gpt turns)", "image_count")


def str_id(v: Any, default: str, where: str) -> str:
    """A record id from the data: a string or an integer; ``default`` when absent."""
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise FormatError(where, f"'id' must be a string or integer, got {type(v).__name__}", "schema")
    return str(v)


def finish_record(rid: str, task: str | None, segs: list[Segment], attrs: dict, where: str) -> Record:
    """The checked record: ``task`` (else the shape's tag), its image placement, ``Record.validate``."""
    task = task or tasks.infer_task(segs)
    check_task(task, segs, where)
    try:
        return Record(rid, task, segs, attrs).validate(where)
    except FormatError:
        raise
    except ValueError as e:
        raise FormatError(where, str(e), "invalid") from e
