"""Per-modality masked loss (PRODUCT.md decision 4): sums and counts, then one global normalisation.

The sequence arrays say which tokens are targets (``text_target`` / ``image_target``, stored on the
predicted token). Position t predicts token t+1 of the same segment. Logits are computed only at the
source positions of targets (gathered with a static capacity), which is exact as long as the capacity
holds every target; the ``dropped`` metrics say when it did not.

Returned sums (per microbatch) are additive, so gradient accumulation and multi-host reduction divide
by the *global* counts once: total = w_text · Σ text CE / N_text + w_image · Σ image loss / N_image.
A batch without text (or image) targets contributes 0 for that term, never NaN.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from uvjax.training.fused_ce import head_ce_sums

SUM_KEYS = ("text_loss", "text_count", "text_correct", "text_z", "text_dropped",
            "image_loss", "image_count", "image_correct", "image_z", "image_dropped")


def target_masks(batch):
    """[B, T-1] masks at *source* positions t whose next token (t+1, same segment) is a target."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    text = (batch["text_target"][:, 1:] > 0) & same
    image = (batch["image_target"][:, 1:] > 0) & same
    return text, image


def global_counts(batch) -> dict:
    text, image = target_masks(batch)
    return {"text_count": text.sum().astype(jnp.float32), "image_count": image.sum().astype(jnp.float32)}


def capacity(fraction: float, n: int) -> int:
    """Static number of gathered positions for a mask over n positions."""
    if fraction >= 1.0:
        return n
    return max(1, min(n, int(math.ceil(fraction * n))))


def _gather(mask, cap):
    flat = mask.reshape(-1)
    idx = jnp.nonzero(flat, size=cap, fill_value=0)[0]
    n = flat.sum()
    valid = jnp.arange(cap) < n
    return idx, valid, jnp.maximum(n - cap, 0)


def _ce(logits, labels):
    """Per-position CE, log-partition and top-1 hit. The hit is ``picked >= max`` (the label's logit is a
    maximum), which reuses the logsumexp's max instead of a separate argmax pass over the vocabulary (on CPU
    that pass cost ~3% of a step); it differs from ``argmax == label`` only on exact ties."""
    labels = jnp.clip(labels, 0, logits.shape[-1] - 1)  # non-target slots may hold other-vocab ids
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1))
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    correct = picked >= m
    return lse - picked, lse, correct


def continuous_loss(pred, target, kind: str):
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    if kind == "cosine":
        num = jnp.sum(pred * target, -1)
        den = jnp.maximum(jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1), 1e-8)
        return 1.0 - num / den
    if kind == "mse":
        return jnp.mean((pred - target) ** 2, -1)
    raise ValueError(f"unknown continuous image loss {kind!r}; expected 'cosine' or 'mse'")


def loss_sums(hidden, batch, text_logits_fn: Callable, image_logits_fn: Callable, *,
              image_output: str = "codes", image_loss: str = "ce",
              text_capacity: float = 1.0, image_capacity: float = 1.0, dense: bool = False,
              text_head: tuple | None = None, head_chunk: int = 512, z_grad: bool = True,
              head_grad: bool = True, image_head: tuple | None = None,
              image_label_ids=None) -> dict:
    """Per-modality sums and counts for one (micro)batch. ``dense`` computes logits everywhere
    (the reference path the gathered one must equal). With ``text_head`` = (weight, transposed) the text
    term goes through :func:`uvjax.training.fused_ce.head_ce_sums` in chunks of ``head_chunk`` rows
    (``z_grad`` / ``head_grad``: whether the z-term / the head weight need gradients); ``image_head`` does
    the same for the image term (the shared-vocabulary layout, whose image logits are LM-head rows).
    ``image_label_ids`` [num_codes]: the image targets' labels are ``image_label_ids[code]`` instead of the
    code (shared vocabulary with the image CE over the full vocabulary)."""
    B, T, E = hidden.shape
    text_mask, image_mask = target_masks(batch)
    labels = batch["tokens"][:, 1:].reshape(-1)
    h_src = hidden[:, :-1].reshape(-1, E)
    n = B * (T - 1)
    out = {}

    def select(mask, frac):
        if dense:
            idx = jnp.arange(n)
            return idx, mask.reshape(-1), jnp.zeros((), jnp.int32)
        return _gather(mask, capacity(frac, n))

    # text: LM head
    idx, valid, dropped = select(text_mask, text_capacity)
    w = valid.astype(jnp.float32)
    if text_head is not None and not dense:
        weight, transposed = text_head
        ce_sum, z_sum, hits = head_ce_sums(h_src[idx], weight, labels[idx], w, max(1, min(head_chunk, idx.shape[0])),
                                           transposed, z_grad, head_grad)
    else:
        ce, lse, correct = _ce(text_logits_fn(h_src[idx]), labels[idx])
        masked = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # where, not *: no NaN leaks from unused slots
        ce_sum, z_sum, hits = masked(ce), masked(lse ** 2), masked(correct.astype(jnp.float32))
    out.update(text_loss=ce_sum, text_count=jnp.sum(w), text_correct=hits, text_z=z_sum,
               text_dropped=dropped.astype(jnp.float32))

    # image: generation head
    idx, valid, dropped = select(image_mask, image_capacity)
    w = valid.astype(jnp.float32)
    masked = lambda x: jnp.sum(jnp.where(valid, x, 0.0))
    img_labels = labels[idx]
    if image_label_ids is not None:
        img_labels = jnp.take(jnp.asarray(image_label_ids), img_labels, mode="clip")
    if image_output == "codes" and image_head is not None and not dense:
        weight, transposed = image_head
        ce_sum, z_sum, hits = head_ce_sums(h_src[idx], weight, img_labels, w, max(1, min(head_chunk, idx.shape[0])),
                                           transposed, z_grad, head_grad)
        out.update(image_loss=ce_sum, image_correct=hits, image_z=z_sum)
    elif image_output == "codes":
        ce, lse, correct = _ce(image_logits_fn(h_src[idx]), img_labels)
        out.update(image_loss=masked(ce), image_correct=masked(correct.astype(jnp.float32)),
                   image_z=masked(lse ** 2))
    else:
        pred = image_logits_fn(h_src[idx])
        F = batch["features"].shape[-1]
        target = batch["features"][:, 1:].reshape(-1, F)[idx]
        l = continuous_loss(pred, target, image_loss)
        out.update(image_loss=masked(l), image_correct=jnp.zeros(()), image_z=jnp.zeros(()))
    out.update(image_count=jnp.sum(w), image_dropped=dropped.astype(jnp.float32))
    return out


def total_loss(sums: dict, counts: dict, *, w_text: float, w_image: float, z_loss: float = 0.0):
    """The objective from (micro)batch sums and *global* counts."""
    nt = jnp.maximum(counts["text_count"], 1.0)
    ni = jnp.maximum(counts["image_count"], 1.0)
    loss = w_text * sums["text_loss"] / nt + w_image * sums["image_loss"] / ni
    if z_loss:
        loss = loss + z_loss * (w_text * sums["text_z"] / nt + w_image * sums["image_z"] / ni)
    return loss


def metrics_from_sums(sums: dict, *, w_text: float, w_image: float, z_loss: float = 0.0) -> dict:
    """Loggable metrics from summed (global) sums."""
    nt = jnp.maximum(sums["text_count"], 1.0)
    ni = jnp.maximum(sums["image_count"], 1.0)
    return {
        "loss": total_loss(sums, sums, w_text=w_text, w_image=w_image, z_loss=z_loss),
        "loss/text": sums["text_loss"] / nt,
        "loss/image": sums["image_loss"] / ni,
        "accuracy/text": sums["text_correct"] / nt,
        "accuracy/image": sums["image_correct"] / ni,
        "tokens/text_targets": sums["text_count"],
        "tokens/image_targets": sums["image_count"],
        "tokens/dropped_targets": sums["text_dropped"] + sums["image_dropped"],
    }
