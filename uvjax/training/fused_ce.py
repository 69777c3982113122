"""Output projection + cross-entropy in row chunks, with the gradient formed in the forward pass.

For the text head (vocabulary V ≈ 32k–49k) the logits of every target position are the largest tensor of a
LoRA step: 3,072 × 32,000 fp32 = 393 MB on the benchmark configs, written, read by the logsumexp, read again
for the softmax gradient and kept alive for the backward. Here the rows go through in chunks: per chunk the
logits, logsumexp, CE, top-1 hit and the gradient of the two summed outputs with respect to the chunk's
hidden rows (and, when the head trains, to the head) are computed while the chunk's logits are still hot,
and only [rows, E] gradients are kept. The backward is then a scale of those by the incoming cotangents:
the summed CE and summed z-term are linear in their per-row terms, which is what makes precomputing the
gradient exact (same idea as the fused linear-cross-entropy kernels of Liger/Apple's CCE, written in jnp).

Outputs are sums over the rows with ``valid`` (per-row 0/1 weights), matching ``loss._ce`` + masked sums.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def head_ce_sums(h, w, labels, valid, chunk: int, transposed: bool, z_grad: bool, w_grad: bool):
    """(Σ valid·CE, Σ valid·lse², Σ valid·hit) of ``logits = h @ w`` (``w`` [E, V]; [V, E] if ``transposed``).

    h [N, E], labels [N] int (clipped into the vocabulary), valid [N] float 0/1. ``z_grad`` / ``w_grad``
    say whether the z-term's gradient and the head's gradient are wanted (skipped work otherwise; a
    cotangent that is not wanted is treated as zero)."""
    return _forward(h, w, labels, valid, chunk, transposed, z_grad, w_grad)[0]


def _forward(h, w, labels, valid, chunk, transposed, z_grad, w_grad):
    N, E = h.shape
    V = w.shape[0] if transposed else w.shape[1]
    n_chunks = -(-N // chunk)
    # ``chunk`` is a ceiling: the rows are split into equal chunks (rounded up to 8 rows) so that the padding
    # is a few rows, not most of a chunk (3,073 rows at 512 would be 7 chunks of which the last holds 1 row:
    # 14% of the head's GEMMs spent on padding; 7 × 440 pads 7 rows)
    chunk = min(chunk, -(-(-(-N // n_chunks)) // 8) * 8)
    pad = n_chunks * chunk - N
    hp = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk, E)
    lp = jnp.pad(jnp.clip(labels, 0, V - 1), (0, pad)).reshape(n_chunks, chunk)
    vp = jnp.pad(valid.astype(jnp.float32), (0, pad)).reshape(n_chunks, chunk)
    wf = w.astype(jnp.float32)
    w_shape = (V, E) if transposed else (E, V)

    def body(dw_acc, xs):
        hc, lc, vc = xs
        logits = jnp.dot(hc.astype(jnp.float32), wf.T if transposed else wf, preferred_element_type=jnp.float32)
        m = jnp.max(logits, axis=-1, keepdims=True)
        lse = m + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True))
        picked = jnp.take_along_axis(logits, lc[:, None], axis=1)[:, 0]
        sums = jnp.stack([jnp.sum(vc * (lse[:, 0] - picked)), jnp.sum(vc * lse[:, 0] ** 2),
                          jnp.sum(vc * (picked >= m[:, 0]))])
        # the softmax straight from the logits and the logsumexp: no exp(logits − max) buffer kept between
        # the row sum and the gradient, and the label's −1 is a scatter of one value per row (each full
        # pass over a [chunk, V] buffer is memory-bound: 65 MB at 512 × 32k)
        p = jnp.exp(logits - lse)
        gs = [(p * vc[:, None]).at[jnp.arange(lc.shape[0]), lc].add(-vc)]  # d CE / d logits
        if z_grad:
            gs.append(p * (2.0 * lse[:, 0] * vc)[:, None])  # d lse² / d logits
        dh = [jnp.dot(g, wf if transposed else wf.T, preferred_element_type=jnp.float32) for g in gs]
        if w_grad:
            dw = [(jnp.dot(g.T, hc) if transposed else jnp.dot(hc.T, g)) for g in gs]
            dw_acc = tuple(a + b for a, b in zip(dw_acc, dw))
        return dw_acc, (sums, tuple(dh))

    n_g = 2 if z_grad else 1
    dw0 = tuple(jnp.zeros(w_shape, jnp.float32) for _ in range(n_g)) if w_grad else ()
    dw, (sums, dh) = jax.lax.scan(body, dw0, (hp, lp, vp))
    dh = tuple(d.reshape(n_chunks * chunk, E)[:N] for d in dh)
    total = jnp.sum(sums, axis=0)
    return (total[0], total[1], total[2]), dh, dw


def _fwd(h, w, labels, valid, chunk, transposed, z_grad, w_grad):
    out, dh, dw = _forward(h, w, labels, valid, chunk, transposed, z_grad, w_grad)
    return out, (dh, dw, jnp.zeros((0,), h.dtype), w)


def _bwd(chunk, transposed, z_grad, w_grad, res, ct):
    dh, dw, h_proto, w = res
    ct_ce, ct_z, _ = ct  # the hit count has no gradient
    cts = (ct_ce, ct_z)
    gh = sum(c * d for c, d in zip(cts, dh))
    gw = sum(c * d for c, d in zip(cts, dw)) if w_grad else jnp.zeros_like(w)
    return gh.astype(h_proto.dtype), gw.astype(w.dtype), None, None


head_ce_sums.defvjp(_fwd, _bwd)
