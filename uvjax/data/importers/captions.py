"""Caption records -> text-to-image generation records (seed reference §8), with our own phrasings.

Only captions are converted (a VQA answer such as ``62%`` must never become an image prompt): a record
with an *explicit* task (:func:`explicit_task`) other than ``caption`` is skipped as ``not_caption``; a
record without one (ShareGPT4V caption files have no ``task`` key) is converted when it has the caption
shape (:func:`caption_problem`). Multi-turn conversations are never captions."""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator

import numpy as np

from uvjax.data import tasks
from uvjax.data.importers.common import EXPLICIT_TASK, FormatError, ImportStats, check_on_error
from uvjax.data.importers.llava import iter_llava
from uvjax.data.records import Record, Segment

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
    ``task`` column) when set, else ``record.task`` when it differs from ``tasks.infer_task`` (a tag set
    by whoever built the record), else None."""
    tag = record.attributes.get(EXPLICIT_TASK)
    if isinstance(tag, str) and tag.strip():
        return tag
    return record.task if record.task != tasks.infer_task(record.segments) else None


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
    check_on_error(on_error)
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
