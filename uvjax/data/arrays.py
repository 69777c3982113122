"""The sequence-array contract (PRODUCT.md decision 3).

Tokenisation turns one record into fixed-length arrays; everything downstream (packing, the model,
the loss, decoding) reads only these arrays. The one quantity derived from them is each image token's
index within its image (``models.unified.image_cells``, for ``model.image.image_positions``): an image is
always one contiguous ``modality`` span between ``<boi>`` and ``<eoi>``, so it is computed there, once.

Per example, every array has length ``T`` (the configured sequence length):

- ``tokens``       int32. Text token id at TEXT/PAD positions; the VQ code index (0..K-1) at IMAGE_IN
                   and IMAGE_OUT positions of VQ images; 0 at positions of continuous (SigLIP) images.
- ``modality``     int32. One of PAD, TEXT, IMAGE_IN (an image the model reads: understanding
                   adapter), IMAGE_OUT (an image the model writes: generation adapter, teacher forced).
- ``text_target``  int32 0/1. 1 where *this* token is a text target, i.e. predicted by the LM head from
                   the hidden state of the previous position of the same segment. Only assistant text
                   (including ``<boi>``, ``<eoi>`` and eos emitted by the assistant).
- ``image_target`` int32 0/1. 1 where this IMAGE_OUT position is a target, predicted by the generation
                   head from the previous position of the same segment.
- ``segment_ids``  int32. 1, 2, ... for the packed examples of a row; 0 for padding. Attention never
                   crosses segments.
- ``positions``    int32. Position within the segment (RoPE), restarting at 0 for each segment.
- ``features``     float32 [T, F], only for continuous image variants: the image feature vector at
                   IMAGE_IN/IMAGE_OUT positions of continuous images, zeros elsewhere.

Targets are stored on the token being predicted; the loss shifts by one and drops pairs that cross a
segment boundary.
"""
from __future__ import annotations

import numpy as np

PAD = 0
TEXT = 1
IMAGE_IN = 2
IMAGE_OUT = 3

MODALITY_NAMES = {PAD: "pad", TEXT: "text", IMAGE_IN: "image_in", IMAGE_OUT: "image_out"}

# The batch keys, defined once (training batches, plans, decoding): every int32 array of an example /
# a training batch; of those, the targets only training reads, and the inputs the model reads (a decoding
# batch has only these). ``features`` [.., F] float32 joins them for continuous-image variants.
INT_KEYS = ("tokens", "modality", "text_target", "image_target", "segment_ids", "positions")
TARGET_KEYS = ("text_target", "image_target")
INPUT_KEYS = tuple(k for k in INT_KEYS if k not in TARGET_KEYS)  # tokens, modality, segment_ids, positions
FEATURE_KEY = "features"


def empty_example(seq_len: int, feature_dim: int = 0) -> dict[str, np.ndarray]:
    """All-padding arrays of one example (what padding rows and tails contain)."""
    ex = {k: np.zeros((seq_len,), np.int32) for k in INT_KEYS}
    if feature_dim:
        ex[FEATURE_KEY] = np.zeros((seq_len, feature_dim), np.float32)
    return ex


def check_example(ex: dict[str, np.ndarray], where: str = "example") -> None:
    """Raises ValueError naming ``where`` when the arrays break the contract."""
    missing = [k for k in INT_KEYS if k not in ex]
    if missing:
        raise ValueError(f"{where}: missing sequence arrays {missing}; expected {list(INT_KEYS)}")
    shape = np.shape(ex["tokens"])
    for k in INT_KEYS:
        if np.shape(ex[k]) != shape:
            raise ValueError(f"{where}: array {k!r} has shape {np.shape(ex[k])}, expected {shape}")
    mod = np.asarray(ex["modality"])
    if not np.isin(mod, (PAD, TEXT, IMAGE_IN, IMAGE_OUT)).all():
        raise ValueError(f"{where}: modality values must be in 0..3, got {np.unique(mod)}")
    tt, it = np.asarray(ex["text_target"]), np.asarray(ex["image_target"])
    if (tt.astype(bool) & (mod != TEXT)).any():
        raise ValueError(f"{where}: text_target set at a non-text position")
    if (it.astype(bool) & (mod != IMAGE_OUT)).any():
        raise ValueError(f"{where}: image_target set at a non-IMAGE_OUT position")
    seg = np.asarray(ex["segment_ids"])
    if ((seg == 0) != (mod == PAD)).any():
        raise ValueError(f"{where}: segment_ids must be 0 exactly at PAD positions")
