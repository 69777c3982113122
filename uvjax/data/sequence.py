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

Bad input raises ``ValueError`` with ``where`` (file and record index when the caller knows them).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from uvjax.data.arrays import FEATURE_KEY, IMAGE_IN, IMAGE_OUT, INT_KEYS, TEXT
from uvjax.data.records import Record
from uvjax.data.tokenizer import IMAGE_PLACEHOLDER, ChatTemplate, TextTokenizer

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


_IMAGE_TASKS_USER = ("vqa", "caption")
_IMAGE_TASKS_ASSISTANT = ("generation", "gen_reasoning")
_IMAGE_TASKS_BOTH = ("edit", "correct", "mm_reasoning")  # reasoning subsets: an input and an output image


def _image_values(seg, where: str, cfg: SequenceConfig) -> tuple[np.ndarray, np.ndarray | None]:
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
        if cfg.codebook_size and (codes.min(initial=0) < 0 or codes.max(initial=0) >= cfg.codebook_size):
            raise ValueError(f"{where}: image codes outside [0, {cfg.codebook_size})")
        n, feats = codes.size, None
        toks = codes.astype(np.int32)
    else:
        feats = np.asarray(seg.features, np.float32)
        if feats.ndim != 2:
            raise ValueError(f"{where}: image features must be [N, F], got {list(feats.shape)}")
        if feats.shape[1] != cfg.feature_dim:
            raise ValueError(f"{where}: image features have F={feats.shape[1]}, expected "
                             f"feature_dim={cfg.feature_dim}")
        if not np.isfinite(feats).all():  # would make the loss NaN (bad data, not a bad step)
            raise ValueError(f"{where}: image features contain NaN or Inf")
        n = feats.shape[0]
        toks = np.zeros((n,), np.int32)
    if n == 0:
        raise ValueError(f"{where}: image with no codes/features")
    if cfg.image_tokens and n != cfg.image_tokens:
        raise ValueError(f"{where}: image has {n} tokens, expected {cfg.image_tokens}")
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
        n_user, n_asst = len(record.images("user")), len(record.images("assistant"))
        if record.task in _IMAGE_TASKS_USER and (n_user < 1 or n_asst):
            raise ValueError(f"{where}: task {record.task!r} expects >=1 user image and no assistant "
                             f"image, got {n_user} user / {n_asst} assistant images")
        if record.task in _IMAGE_TASKS_ASSISTANT and n_asst < 1:
            raise ValueError(f"{where}: task {record.task!r} expects >=1 assistant image, got {n_asst}")
        if record.task in _IMAGE_TASKS_BOTH and (n_user < 1 or n_asst < 1):
            raise ValueError(f"{where}: task {record.task!r} expects >=1 user and >=1 assistant image, got "
                             f"{n_user} user / {n_asst} assistant images")


def encode_record(record: Record, tokenizer: TextTokenizer, template: ChatTemplate,
                  cfg: SequenceConfig, *, pad: bool = True, where: str | None = None) -> Encoded:
    """Record -> sequence arrays (padded to ``cfg.seq_len`` unless ``pad=False``, for packing)."""
    where = where or f"record {record.id!r}"
    validate_record(record, tokenizer, cfg, where)
    tokens: list[np.ndarray] = []
    modality: list[np.ndarray] = []
    ttarget: list[np.ndarray] = []
    itarget: list[np.ndarray] = []
    feats: list[tuple[int, np.ndarray]] = []
    spans: list[tuple[int, int]] = []  # [boi position, eoi position + 1)
    n = 0
    image_index = {id(s): i for i, s in enumerate(record.images())}

    def put(ids, mod, tt, it):
        nonlocal n
        ids = np.asarray(ids, np.int32)
        k = ids.size
        tokens.append(ids)
        modality.append(np.full(k, mod, np.int32))
        ttarget.append(np.full(k, int(tt), np.int32))
        itarget.append(np.full(k, int(it), np.int32))
        n += k

    for p in template.pieces(record):
        if p.kind == "special":
            put([tokenizer.special_id(p.text)], TEXT, p.target, 0)
        elif p.kind == "text":
            if p.text:
                try:
                    ids = tokenizer.encode(p.text, allow_special=p.trusted)
                except ValueError as e:
                    raise ValueError(f"{where} ({p.role} text): {e}") from e
                put(ids, TEXT, p.target, 0)
        else:
            idx = image_index.get(id(p.segment), -1)
            toks, f = _image_values(p.segment, f"{where} image {idx} ({p.role})", cfg)
            start = n
            out = p.role == "assistant"
            put([tokenizer.boi_id], TEXT, out, 0)
            if f is not None:
                feats.append((n, f))
            put(toks, IMAGE_OUT if out else IMAGE_IN, 0, out)
            put([tokenizer.eoi_id], TEXT, out, 0)
            spans.append((start, n))

    arrays = {"tokens": np.concatenate(tokens), "modality": np.concatenate(modality),
              "text_target": np.concatenate(ttarget), "image_target": np.concatenate(itarget)}
    length = n
    status = OK
    if n > cfg.seq_len:
        if cfg.overflow == "drop":
            return Encoded(None, DROPPED, length)
        cut = cfg.seq_len
        for s, e in spans:
            if s < cut < e:
                cut = s
                break
        arrays = {k: v[:cut] for k, v in arrays.items()}
        n, status = cut, TRUNCATED
        if not (arrays["text_target"].any() or arrays["image_target"].any()):
            return Encoded(None, DROPPED, length)
    if cfg.feature_dim:
        fa = np.zeros((n, cfg.feature_dim), np.float32)
        for pos, f in feats:
            if pos + len(f) <= n:
                fa[pos:pos + len(f)] = f
        arrays[FEATURE_KEY] = fa
    elif feats:
        raise ValueError(f"{where}: continuous image features given but feature_dim is 0")
    arrays["segment_ids"] = np.ones((n,), np.int32)
    arrays["positions"] = np.arange(n, dtype=np.int32)
    if pad:
        arrays = pad_example(arrays, cfg.seq_len)
    return Encoded(arrays, status, length)


def pad_example(ex: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Right-pads every array to ``seq_len`` with zeros (PAD modality, segment 0)."""
    out = {}
    for k, v in ex.items():
        widths = [(0, seq_len - v.shape[0])] + [(0, 0)] * (v.ndim - 1)
        out[k] = np.pad(v, widths)
    return out


__all__ = ["SequenceConfig", "Encoded", "encode_record", "validate_record", "pad_example",
           "OK", "TRUNCATED", "DROPPED", "INT_KEYS"]
