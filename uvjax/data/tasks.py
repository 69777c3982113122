"""The task taxonomy: the task tags uvjax knows, the images each promises, and the stream it trains in.

A record's ``task`` is a tag. Three kinds:

- **checked tasks**: the tag promises where images sit; importers (``importers.segments.check_task``)
  and the sequence encoder (``sequence.validate_record``) check it with the same rule and message
  (:func:`image_problem`):

  ======================================  ==================================================
  :data:`USER_IMAGE_TASKS`                vqa, caption: >= 1 user image, no assistant image
  :data:`ASSISTANT_IMAGE_TASKS`           generation, gen_reasoning: >= 1 assistant image
  :data:`BOTH_IMAGE_TASKS`                edit, correct, mm_reasoning: >= 1 of each
  ======================================  ==================================================

- **shape tags** (:data:`SHAPE_TASKS`): what :func:`infer_task` names a record whose data gave no
  task (``text``, ``conversation``, ``generation``, ``interleaved``);
- any other tag is carried as it is, unchecked.

Streams (:data:`STREAMS`): the pipeline mixes three. :func:`stream_of` puts the tasks of
:data:`GENERATION_TASKS` (plain text-to-image) in ``generation``; every other record goes by its shape:
an assistant image -> ``interleaved`` (so the reasoning subsets, ``gen_reasoning`` included), else
``understanding``.

Generators: the Smart Watch data makes :data:`SMARTWATCH_TASKS`, ``data/reasoning.py`` makes
:data:`REASONING_TASKS` (all ``interleaved``).
"""
from __future__ import annotations

from typing import Sequence

from uvjax.data.records import Record, Segment

STREAMS = ("understanding", "generation", "interleaved")

USER_IMAGE_TASKS = ("vqa", "caption")                        # >= 1 user image, no assistant image
ASSISTANT_IMAGE_TASKS = ("generation", "gen_reasoning")      # >= 1 assistant image
BOTH_IMAGE_TASKS = ("edit", "correct", "mm_reasoning")       # an input and an output image

UNDERSTANDING_TASKS = USER_IMAGE_TASKS
GENERATION_TASKS = ("generation",)                           # the ``generation`` stream
REASONING_TASKS = ("gen_reasoning", "edit", "correct", "mm_reasoning")
SMARTWATCH_TASKS = ("vqa", "caption", "generation")
SHAPE_TASKS = ("text", "conversation", "generation", "interleaved")

CHECKED_TASKS = USER_IMAGE_TASKS + ASSISTANT_IMAGE_TASKS + BOTH_IMAGE_TASKS
KNOWN_TASKS = tuple(dict.fromkeys(CHECKED_TASKS + REASONING_TASKS + SMARTWATCH_TASKS + SHAPE_TASKS))


def image_problem(task: str, n_user: int, n_assistant: int) -> str | None:
    """Why ``n_user`` user and ``n_assistant`` assistant images break what ``task`` promises, or None
    (always None for a tag outside :data:`CHECKED_TASKS`)."""
    if task in USER_IMAGE_TASKS and (n_user < 1 or n_assistant):
        return (f"task {task!r} expects >=1 user image and no assistant image, got {n_user} user / "
                f"{n_assistant} assistant images")
    if task in ASSISTANT_IMAGE_TASKS and n_assistant < 1:
        return f"task {task!r} expects >=1 assistant image, got {n_assistant}"
    if task in BOTH_IMAGE_TASKS and (n_user < 1 or n_assistant < 1):
        return (f"task {task!r} expects >=1 user and >=1 assistant image, got {n_user} user / "
                f"{n_assistant} assistant images")
    return None


def infer_task(segments: Sequence[Segment]) -> str:
    """A shape tag: ``text`` (no image), ``conversation`` (user images only), ``generation`` (one
    assistant image ending the record, no user image), else ``interleaved``."""
    user = [s for s in segments if s.kind == "image" and s.role == "user"]
    asst = [s for s in segments if s.kind == "image" and s.role == "assistant"]
    if not user and not asst:
        return "text"
    if not asst:
        return "conversation"
    if not user and len(asst) == 1 and segments[-1] is asst[0]:
        return "generation"
    return "interleaved"


def stream_of(record: Record) -> str:
    """The mixing stream of a record: :data:`GENERATION_TASKS` -> ``generation``; an assistant image in
    any other task (reasoning, editing, correction, interleaved) -> ``interleaved``; else
    ``understanding``."""
    if record.task in GENERATION_TASKS:
        return "generation"
    if record.images("assistant"):
        return "interleaved"
    return "understanding"
