"""Importers of real conversation data into :class:`~uvjax.data.records.Record` s, and shard conversion.

Three sources, each read lazily (records are yielded one at a time), one module each:

- **LLaVA / ShareGPT4V JSON** (:mod:`.llava`, ``iter_llava``): a JSON list (or JSON Lines) of
  ``{"id", "image"?, "conversations": [{"from": human|gpt|system, "value"}], "task"?}``. Every
  ``<image>`` placeholder becomes an image segment of the turn it sits in, in order: in a human turn
  an understanding input, in a gpt turn a generation target (the reference's generation records put
  ``<image>`` at the end of the gpt turn with ``task == "generation"``). ``image`` is a path, or a
  list of paths, relative to ``image_dir``; the number of placeholders must equal the number of paths.
- **caption -> generation** (:mod:`.captions`, ``caption_to_generation``, seed reference §8): caption
  records become "request + caption -> acknowledgement + image" records, with our own phrasings. Only
  captions are converted (a VQA answer such as ``62%`` must never become an image prompt): a record
  with an *explicit* task (the LLaVA item's ``task`` key, kept in ``attributes["task"]``) other than
  ``caption`` is skipped as ``not_caption``; a record without one (ShareGPT4V caption files have no
  ``task`` key) is converted when it has the caption shape: one user turn with exactly one image, one
  single-turn text answer, no assistant image. Multi-turn conversations are never captions.
- **UnifiedVisual parquet** (:mod:`.unifiedvisual`, ``iter_unifiedvisual``): the real schema is
  unverified, so the schema is read from each file and matched against the documented layouts
  (:mod:`.parquet_layout`, ``LAYOUTS``); anything else fails naming the columns found.
  ``parquet_layout.describe`` prints schema, detected layout and a few rows.

Shared helpers: :mod:`.common` (``FormatError``, ``Limits``, ``ImportStats``), :mod:`.paths` (image
path safety and image bytes), :mod:`.json_stream` (the bounded JSON list / JSON Lines reader),
:mod:`.segments` (turns -> segments -> a checked Record), :mod:`.manifest` (the import manifest) and
:mod:`.convert` (files -> ArrayRecord shards; the command line is ``python -m uvjax.data.formats``).
Task tags and streams are ``uvjax.data.tasks``.

Images stay ``path`` segments (decoded later by the pre-tokenisation pass) unless ``load_pixels``;
image bytes embedded in parquet are decoded to pixels. Paths are refused when they could read
outside the image folder (``..``, absolute, symlinks resolving outside), because a data file is
untrusted input.

Bad input raises ``FormatError`` (a ``ValueError``) naming the file, the record index and what
was expected; with ``on_error="skip"`` the record is skipped and counted per reason in an
``ImportStats``. File-level problems (unreadable or oversized file, a JSON list whose syntax
breaks so later records cannot be located, an unknown parquet layout) always raise.

**Ambiguous hours (warned and counted, data unchanged).** The paper's Smart Watch reference data
(LLaVA JSON written by the paper's code) labels time answers ``HH:MM:SS`` with hours 00-12, so
``00:MM`` and ``12:MM`` name the same dial (hour 0 and hour 12 draw the same hands). Every kept
assistant answer that is exactly such a time (``^(00|12):MM(:SS)?$`` after stripping) is counted in
``ImportStats.warnings["hour_00_12_ambiguous"]`` (so in ``as_dict()`` and the import manifest) and
each file with any logs one ``logging.warning``. Records are kept as they are; evaluation should treat
the two hours as equal (``evaluation.metrics``' tolerant/coarse/hour time scores compare hours modulo
12; its strict string match does not).

**Import manifest.** ``convert.convert`` writes ``{out_dir}/import_manifest.json``
(``manifest.MANIFEST_NAME``) beside the shards: ``{"format", "sources": [absolute input files],
"image_dir": absolute real path of the image folder ("" if none), "counts": ImportStats.as_dict(),
"paths": {stream: [absolute shard paths]}, "created": ISO time}``. Images stay paths relative to
``image_dir``, so later stages take the folder from the manifest (``manifest.read_manifest``) and work
from any current directory.
"""
