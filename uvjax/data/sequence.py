"""Where a record becomes the sequence arrays of ``data/arrays.py``.

Rules (PRODUCT.md decisions 2-3):

- only assistant output is a target: assistant text (and the assistant's end token) has
  ``text_target=1``; system/user text never does;
- every image is wrapped in ``<boi>`` ... ``<eoi>`` text tokens. A user image's codes are IMAGE_IN
  positions (no targets, ``<boi>``/``<eoi>`` not targets). An assistant image's codes are IMAGE_OUT
  positions with ``image_target=1``, and its ``<boi>`` and ``<eoi>`` are assistant text targets, so the
  model learns when to open and close an image;
- images must already be VQ codes (int, N) or features (float [N, F]): frozen towers run once in the
  pre-tokenisation pass, never here (decision 5). Pixels or paths reaching this point are an error;
- over-long samples are truncated at ``seq_len`` but never inside an image (the cut moves to just
  before that image's ``<boi>``), or dropped (``overflow="drop"``); a sample left without targets is
  dropped. The status (``ok`` | ``truncated`` | ``dropped``) is returned so callers count it.

Decoding prompts (:func:`encode_prompt`, called by ``inference.decode.encode_prompt``) are laid out
by the same code as training sequences (``_lay_out``), so a prompt is the start of the training
sequence of the same conversation. The task rules checked here are ``data/tasks.py``'s.

Bad input raises ``ValueError`` with ``where`` (file and record index when the caller knows them).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from uvjax.data.arrays import FEATURE_KEY, IMAGE_IN, IMAGE_OUT, INT_KEYS, TEXT
from uvjax.data.records import Record
from uvjax.data.tasks import image_problem
from uvjax.data.tokenizer import IMAGE_PLACEHOLDER, ChatTemplate, Piece, TextTokenizer

OK, TRUNCATED, DROPPED = "ok", "truncated", "dropped"


@dataclasses.dataclass(frozen=True)
class SequenceConfig:
    """seq_len: row length T. overflow: ``truncate`` | ``drop``. image_tokens: required codes (or
    feature rows) per image, 0 = any. feature_dim: F of continuous images (0 = VQ codes only; then a
    ``features`` array is not produced). codebook_size: codes must lie in [0, K) when K > 0.
    check_tasks: vqa/caption need a user image, generation an assistant image."""
    seq_len: int = 512
    overflow: str = "truncate"
    image_tokens: int = 0
    feature_dim: int = 0
    codebook_size: int = 0
    check_tasks: bool = True

    def __post_init__(self):
        if self.overflow not in ("truncate", "drop"):
            raise ValueError(f"overflow must be 'truncate' or 'drop', got {self.overflow!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


class Encoded(NamedTuple):
    arrays: dict[str, np.ndarray] | None  # None when dropped
    status: str                           # ok | truncated | dropped
    length: int                           # untruncated length in tokens


def _image_values(seg, where: str, *, feature_dim: int, image_tokens: int = 0,
                  codebook_size: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens [N] int32, features [N, F] or None) of a pre-tokenised image segment."""
    if seg.pixels is not None or seg.path is not None:
        kind = "pixels" if seg.pixels is not None else f"path {seg.path!r}"
        raise ValueError(f"{where}: image given as {kind}; expected VQ codes or features: run the "
                         "pre-tokenisation pass first (`python -m uvjax.pretokenise`, or the stages: README "
                         "'Train on your own data')")
    if seg.codes is not None:
        codes = np.asarray(seg.codes)
        if codes.dtype.kind not in "iu" or codes.ndim not in (1, 2):
            raise ValueError(f"{where}: image codes must be an int array [N] or [h, w], got "
                             f"{codes.dtype} {list(codes.shape)}")
        codes = codes.reshape(-1).astype(np.int64)  # raster order
        if codebook_size and (codes.min(initial=0) < 0 or codes.max(initial=0) >= codebook_size):
            raise ValueError(f"{where}: image codes outside [0, {codebook_size})")
        n, feats = codes.size, None
        toks = codes.astype(np.int32)
    else:
        feats = np.asarray(seg.features, np.float32)
        if feats.ndim != 2:
            raise ValueError(f"{where}: image features must be [N, F], got {list(feats.shape)}")
        if feats.shape[1] != feature_dim:
            raise ValueError(f"{where}: image features have F={feats.shape[1]}, expected "
                             f"feature_dim={feature_dim}")
        if not np.isfinite(feats).all():  # would make the loss NaN (bad data, not a bad step)
            raise ValueError(f"{where}: image features contain NaN or Inf")
        n = feats.shape[0]
        toks = np.zeros((n,), np.int32)
    if n == 0:
        raise ValueError(f"{where}: image with no codes/features")
    if image_tokens and n != image_tokens:
        raise ValueError(f"{where}: image has {n} tokens, expected {image_tokens}")
    return toks, feats


def validate_record(record: Record, tokenizer: TextTokenizer, cfg: SequenceConfig, where: str) -> None:
    """Checks everything tokenisation relies on; raises ValueError naming ``where``."""
    record.validate(where)
    for i, s in enumerate(record.segments):
        if s.kind == "text":
            if IMAGE_PLACEHOLDER in s.text:
                raise ValueError(f"{where} segment {i}: text contains the placeholder "
                                 f"{IMAGE_PLACEHOLDER!r}: image-count mismatch (images must be "
                                 "separate image segments)")
            bad = tokenizer.find_special(s.text)
            if bad is not None:
                raise ValueError(f"{where} segment {i} ({s.role}): text contains the special-token "
                                 f"string {bad!r}, not allowed in data text")
    # Every assistant turn must say something.
    role, has_content, seen_assistant = None, False, False
    for i, s in enumerate(record.segments + [None]):
        if s is None or s.role != role:
            if role == "assistant" and not has_content:
                raise ValueError(f"{where}: empty assistant answer ending at segment {i - 1}; "
                                 "expected non-blank text or an image")
            if s is None:
                break
            role, has_content = s.role, False
        if s.role == "assistant":
            seen_assistant = True
            has_content |= s.kind == "image" or bool((s.text or "").strip())
    if not seen_assistant:
        raise ValueError(f"{where}: no assistant turn, so nothing to learn; expected at least one")
    if cfg.check_tasks:
        problem = image_problem(record.task, len(record.images("user")), len(record.images("assistant")))
        if problem is not None:
            raise ValueError(f"{where}: {problem}")


class _Layout:
    """The per-position arrays of one sequence, built piece by piece (a chat template's pieces: special
    tokens, text, and images wrapped in ``<boi>`` ... ``<eoi>``)."""

    def __init__(self):
        self.tokens: list[np.ndarray] = []
        self.modality: list[np.ndarray] = []
        self.text_target: list[np.ndarray] = []
        self.image_target: list[np.ndarray] = []
        self.feats: list[tuple[int, np.ndarray]] = []  # (first position, [N, F]) of continuous images
        self.spans: list[tuple[int, int]] = []         # [boi position, eoi position + 1) of every image
        self.n = 0

    def put(self, ids, mod: int, tt, it) -> None:
        ids = np.asarray(ids, np.int32)
        k = ids.size
        self.tokens.append(ids)
        self.modality.append(np.full(k, mod, np.int32))
        self.text_target.append(np.full(k, int(tt), np.int32))
        self.image_target.append(np.full(k, int(it), np.int32))
        self.n += k

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": np.concatenate(self.tokens), "modality": np.concatenate(self.modality),
                "text_target": np.concatenate(self.text_target),
                "image_target": np.concatenate(self.image_target)}

    def features(self, n: int, feature_dim: int) -> np.ndarray:
        """[n, feature_dim]: the continuous images' features at their positions (< n), zeros elsewhere."""
        fa = np.zeros((n, feature_dim), np.float32)
        for pos, f in self.feats:
            if pos + len(f) <= n:
                fa[pos:pos + len(f)] = f
        return fa


def _lay_out(record: Record, pieces: list[Piece], tokenizer: TextTokenizer, where: str, *,
             feature_dim: int, image_tokens: int = 0, codebook_size: int = 0) -> _Layout:
    """Template pieces -> arrays, the one place a record's text and images become positions (training
    sequences and decoding prompts both): assistant text is a text target; a user image is IMAGE_IN, an
    assistant image IMAGE_OUT with image targets and its ``<boi>``/``<eoi>`` as text targets."""
    lay = _Layout()
    image_index = {id(s): i for i, s in enumerate(record.images())}
    for p in pieces:
        if p.kind == "special":
            lay.put([tokenizer.special_id(p.text)], TEXT, p.target, 0)
        elif p.kind == "text":
            if p.text:
                try:
                    ids = tokenizer.encode(p.text, allow_special=p.trusted)
                except ValueError as e:
                    raise ValueError(f"{where} ({p.role} text): {e}") from e
                lay.put(ids, TEXT, p.target, 0)
        else:
            idx = image_index.get(id(p.segment), -1)
            toks, f = _image_values(p.segment, f"{where} image {idx} ({p.role})", feature_dim=feature_dim,
                                    image_tokens=image_tokens, codebook_size=codebook_size)
            start = lay.n
            out = p.role == "assistant"
            lay.put([tokenizer.boi_id], TEXT, out, 0)
            if f is not None:
                lay.feats.append((lay.n, f))
            lay.put(toks, IMAGE_OUT if out else IMAGE_IN, 0, out)
            lay.put([tokenizer.eoi_id], TEXT, out, 0)
            lay.spans.append((start, lay.n))
    return lay


def encode_record(record: Record, tokenizer: TextTokenizer, template: ChatTemplate,
                  cfg: SequenceConfig, *, pad: bool = True, where: str | None = None) -> Encoded:
    """Record -> sequence arrays (padded to ``cfg.seq_len`` unless ``pad=False``, for packing). The
    example is one segment: ``segment_ids`` 1 and ``positions`` 0..n-1 (packing renumbers the segment
    ids of a row and keeps the positions)."""
    where = where or f"record {record.id!r}"
    validate_record(record, tokenizer, cfg, where)
    lay = _lay_out(record, template.pieces(record), tokenizer, where, feature_dim=cfg.feature_dim,
                   image_tokens=cfg.image_tokens, codebook_size=cfg.codebook_size)
    arrays = lay.arrays()
    n = length = lay.n
    status = OK
    if n > cfg.seq_len:
        if cfg.overflow == "drop":
            return Encoded(None, DROPPED, length)
        cut = cfg.seq_len
        for s, e in lay.spans:
            if s < cut < e:
                cut = s
                break
        arrays = {k: v[:cut] for k, v in arrays.items()}
        n, status = cut, TRUNCATED
        if not (arrays["text_target"].any() or arrays["image_target"].any()):
            return Encoded(None, DROPPED, length)
    if cfg.feature_dim:
        arrays[FEATURE_KEY] = lay.features(n, cfg.feature_dim)
    elif lay.feats:
        raise ValueError(f"{where}: continuous image features given but feature_dim is 0")
    arrays["segment_ids"] = np.ones((n,), np.int32)
    arrays["positions"] = np.arange(n, dtype=np.int32)
    if pad:
        arrays = pad_example(arrays, cfg.seq_len)
    return Encoded(arrays, status, length)


def encode_prompt(record: Record, tokenizer: TextTokenizer, template: ChatTemplate, *,
                  assistant_prefix: str = "", open_image: bool = False, feature_dim: int = 0,
                  where: str | None = None) -> dict[str, np.ndarray]:
    """A conversation ending in a user turn -> decoding prompt arrays (``tokens``, ``modality`` and, with
    ``feature_dim``, ``features``) ending with the assistant's opening. Laid out by the same code as
    :func:`encode_record` (the prompt is exactly the start of the training sequence of the record
    answered, when neither ``assistant_prefix`` nor ``open_image`` is given); no targets, no task
    checks (the answer is not there yet), no length limit.
    ``assistant_prefix`` starts the answer with given text; ``open_image`` ends the prompt with
    ``<boi>`` (the decoder starts that row in image mode). Images must be VQ codes (IMAGE_IN for user
    images, IMAGE_OUT for earlier assistant images) or features."""
    where = where or f"record {record.id!r}"
    if any(s.codes is None and s.features is None for s in record.images()):
        raise ValueError(f"record {record.id!r}: prompt images must be VQ codes or features; "
                         "encode pixels with the run's VQ tokenizer first")
    if not feature_dim and any(s.features is not None for s in record.images()):
        raise ValueError("prompt has continuous image features but feature_dim is 0")
    lay = _lay_out(record, template.pieces(record, add_generation_prompt=True), tokenizer, where,
                   feature_dim=feature_dim)
    if assistant_prefix:
        lead = " " if template.name == "vicuna_v1" else ""  # vicuna answers start with a space (ChatTemplate)
        lay.put(tokenizer.encode(lead + assistant_prefix), TEXT, 0, 0)
    if open_image:
        lay.put([tokenizer.boi_id], TEXT, 0, 0)
    arrays = lay.arrays()
    out = {"tokens": arrays["tokens"], "modality": arrays["modality"]}
    if feature_dim:
        out[FEATURE_KEY] = lay.features(lay.n, feature_dim)
    return out


def pad_example(ex: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Right-pads every array to ``seq_len`` with zeros (PAD modality, segment 0)."""
    out = {}
    for k, v in ex.items():
        widths = [(0, seq_len - v.shape[0])] + [(0, 0)] * (v.ndim - 1)
        out[k] = np.pad(v, widths)
    return out


__all__ = ["SequenceConfig", "Encoded", "encode_record", "encode_prompt", "validate_record", "pad_example",
           "OK", "TRUNCATED", "DROPPED", "INT_KEYS"]
