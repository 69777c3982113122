"""Per-modality loss against an independent float64 NumPy computation."""
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch
from reference import log_softmax
from uvjax.training import loss as L

V, K, E = 11, 7, 5


def _pairs(batch):
    """(b, t, next token) for every position t whose next token t+1 is in the same, non-padding segment."""
    B, T = batch["tokens"].shape
    for b in range(B):
        for t in range(T - 1):
            s0, s1 = batch["segment_ids"][b, t], batch["segment_ids"][b, t + 1]
            if s1 != 0 and s0 == s1:
                yield b, t, batch["tokens"][b, t + 1]


def _reference(batch, h, W_text, W_img, w_text, w_image, z=0.0, image_kind="ce", feats=None):
    """Straight loops over every (t, t+1) pair, float64."""
    text, img = [], []
    zt, zi = [], []
    for b, t, y in _pairs(batch):
        hv = h[b, t].astype(np.float64)
        if batch["text_target"][b, t + 1]:
            lg = hv @ W_text
            text.append(-log_softmax(lg)[y])
            zt.append(np.log(np.exp(lg).sum()) ** 2)
        if batch["image_target"][b, t + 1]:
            lg = hv @ W_img
            if image_kind == "ce":
                img.append(-log_softmax(lg)[y])
                zi.append(np.log(np.exp(lg).sum()) ** 2)
            else:
                tgt = feats[b, t + 1].astype(np.float64)
                if image_kind == "cosine":
                    img.append(1 - lg @ tgt / (np.linalg.norm(lg) * np.linalg.norm(tgt)))
                else:
                    img.append(np.mean((lg - tgt) ** 2))
    tl = np.mean(text) if text else 0.0
    il = np.mean(img) if img else 0.0
    total = w_text * tl + w_image * il
    if z:
        total += z * (w_text * (np.mean(zt) if zt else 0) + w_image * (np.mean(zi) if zi else 0))
    return total, tl, il, len(text), len(img)


def _fns(W_text, W_img):
    return (lambda x: jnp.dot(x, jnp.asarray(W_text, jnp.float32)),
            lambda x: jnp.dot(x, jnp.asarray(W_img, jnp.float32)))


@pytest.mark.parametrize("case", ["mixed", "no_image", "no_text", "empty_rows"])
@pytest.mark.parametrize("dense", [False, True])
def test_loss_matches_float64(case, dense):
    rng = np.random.default_rng(zlib.crc32(case.encode()))  # hash(str) is salted per process
    batch = random_batch(rng, 4, 12, K, V)
    if case == "no_image":
        batch["image_target"][:] = 0
    if case == "no_text":
        batch["text_target"][:] = 0
    if case == "empty_rows":
        batch["text_target"][1:] = 0
        batch["image_target"][:3] = 0
    h = rng.normal(size=(4, 12, E)).astype(np.float32)
    W_text, W_img = rng.normal(size=(E, V)), rng.normal(size=(E, K))
    ft, fi = _fns(W_text, W_img)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    sums = L.loss_sums(jnp.asarray(h), jb, ft, fi, dense=dense)
    counts = L.global_counts(jb)
    got = float(L.total_loss(sums, counts, w_text=1.0, w_image=0.2, z_loss=1e-3))
    want, tl, il, nt, ni = _reference(batch, h, W_text, W_img, 1.0, 0.2, z=1e-3)
    assert (nt > 0) == (case != "no_text") and (ni > 0) == (case != "no_image")  # the case is what it says
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    m = L.metrics_from_sums(sums, w_text=1.0, w_image=0.2)
    assert float(m["tokens/text_targets"]) == nt and float(m["tokens/image_targets"]) == ni
    np.testing.assert_allclose(float(m["loss/text"]), tl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["loss/image"]), il, rtol=1e-5, atol=1e-6)


def test_gathered_equals_dense_and_capacity_overflow_is_reported():
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(v) for k, v in random_batch(rng, 3, 16, K, V).items()}
    h = jnp.asarray(rng.normal(size=(3, 16, E)), jnp.float32)
    ft, fi = _fns(rng.normal(size=(E, V)), rng.normal(size=(E, K)))
    dense = L.loss_sums(h, batch, ft, fi, dense=True)
    n = 3 * 15
    nt = int(dense["text_count"])
    frac = (nt + 1) / n
    gathered = L.loss_sums(h, batch, ft, fi, text_capacity=frac, image_capacity=1.0)
    for k in ("text_loss", "text_count", "image_loss", "image_count", "text_correct"):
        np.testing.assert_allclose(float(gathered[k]), float(dense[k]), rtol=1e-6)
    assert float(gathered["text_dropped"]) == 0
    small = L.loss_sums(h, batch, ft, fi, text_capacity=(nt - 2) / n)
    assert float(small["text_dropped"]) == 2


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_continuous_image_loss(kind):
    rng = np.random.default_rng(1)
    batch = random_batch(rng, 2, 10, K, V)
    F = 6
    feats = rng.normal(size=(2, 10, F)).astype(np.float32)
    h = rng.normal(size=(2, 10, E)).astype(np.float32)
    W_text, W_img = rng.normal(size=(E, V)), rng.normal(size=(E, F))
    ft, fi = _fns(W_text, W_img)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    jb["features"] = jnp.asarray(feats)
    sums = L.loss_sums(jnp.asarray(h), jb, ft, fi, image_output="features", image_loss=kind)
    got = float(L.total_loss(sums, L.global_counts(jb), w_text=1.0, w_image=1.0))
    want = _reference(batch, h, W_text, W_img, 1.0, 1.0, image_kind=kind, feats=feats)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_accumulated_sums_equal_whole_batch():
    rng = np.random.default_rng(4)
    batch = {k: jnp.asarray(v) for k, v in random_batch(rng, 4, 12, K, V).items()}
    h = jnp.asarray(rng.normal(size=(4, 12, E)), jnp.float32)
    ft, fi = _fns(rng.normal(size=(E, V)), rng.normal(size=(E, K)))
    counts = L.global_counts(batch)
    whole = L.total_loss(L.loss_sums(h, batch, ft, fi), counts, w_text=1.0, w_image=0.2)
    parts = sum(L.total_loss(L.loss_sums(h[i:i + 2], {k: v[i:i + 2] for k, v in batch.items()}, ft, fi),
                             counts, w_text=1.0, w_image=0.2) for i in (0, 2))
    np.testing.assert_allclose(float(parts), float(whole), rtol=1e-6)


def test_top1_hits_and_gradient_match_float64():
    """Hits (the label's logit is the maximum) against float64 argmax, and d(text CE sum)/dh against the
    hand-derived W·(softmax − onehot): the loss reuses the logsumexp's max for both."""
    import jax
    rng = np.random.default_rng(7)
    batch = random_batch(rng, 3, 14, K, V)
    h = rng.normal(size=(3, 14, E)).astype(np.float32)
    W_text, W_img = rng.normal(size=(E, V)) * 3, rng.normal(size=(E, K)) * 3
    ft, fi = _fns(W_text, W_img)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    sums = L.loss_sums(jnp.asarray(h), jb, ft, fi)
    grad = np.asarray(jax.grad(lambda x: L.loss_sums(x, jb, ft, fi)["text_loss"])(jnp.asarray(h)))
    hits = {"text": 0, "image": 0}
    want_grad = np.zeros_like(h, dtype=np.float64)
    for b, t, y in _pairs(batch):
        for kind, W in (("text", W_text), ("image", W_img)):
            if batch[f"{kind}_target"][b, t + 1]:
                lg = h[b, t].astype(np.float64) @ W
                hits[kind] += int(np.argmax(lg) == y)
                if kind == "text":
                    p = np.exp(lg - lg.max())
                    p /= p.sum()
                    p[y] -= 1.0
                    want_grad[b, t] += W @ p
    assert hits["text"] + hits["image"] > 0  # the check compares something
    assert float(sums["text_correct"]) == hits["text"] and float(sums["image_correct"]) == hits["image"]
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("transposed,chunk", [(False, 4), (True, 4), (False, 20)])
def test_fused_head_loss_and_gradients_match_float64(transposed, chunk):
    """The chunked head + CE (gradient formed in the forward, uvjax/training/fused_ce.py) against float64
    loops: the total with a z-loss, d/dh and d/dW (hand-derived: (softmax − onehot + 2z·lse·softmax)/N),
    with 4-row chunks over a row count that is not a multiple of 4, for an [E, V] head and a tied [V, E] one,
    and with a 20-row ceiling that the 42 gathered rows split into three equal 16-row chunks."""
    import jax
    rng = np.random.default_rng(11)
    batch = random_batch(rng, 3, 14, K, V)
    h = rng.normal(size=(3, 14, E)).astype(np.float32)
    W_text, W_img = rng.normal(size=(E, V)) * 2, rng.normal(size=(E, K))
    ft, fi = _fns(W_text, W_img)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    counts = L.global_counts(jb)
    z = 1e-2
    w_arg = jnp.asarray(W_text.T if transposed else W_text, jnp.float32)

    def total(hh, ww):
        sums = L.loss_sums(hh, jb, ft, fi, text_head=(ww, transposed), head_chunk=chunk, z_grad=True, head_grad=True)
        return L.total_loss(sums, counts, w_text=1.0, w_image=0.0, z_loss=z), sums  # text only: h's gradient

    (got, sums), (gh, gw) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(jnp.asarray(h), w_arg)
    want, tl, il, nt, ni = _reference(batch, h, W_text, W_img, 1.0, 0.0, z=z)
    assert nt > 4 and nt % 4  # several chunks, the last one padded
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    want_gh = np.zeros_like(h, dtype=np.float64)
    want_gw = np.zeros_like(W_text, dtype=np.float64)
    hits = 0
    for b, t, y in _pairs(batch):
        hv = h[b, t].astype(np.float64)
        if batch["text_target"][b, t + 1]:
            lg = hv @ W_text
            hits += int(np.argmax(lg) == y)
            lse = np.log(np.exp(lg - lg.max()).sum()) + lg.max()
            p = np.exp(lg - lse)
            g = p.copy()
            g[y] -= 1.0
            g = (g + z * 2.0 * lse * p) / nt
            want_gh[b, t] += W_text @ g
            want_gw += np.outer(hv, g)
    assert float(sums["text_correct"]) == hits
    np.testing.assert_allclose(np.asarray(gh), want_gh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), want_gw.T if transposed else want_gw, rtol=1e-4, atol=1e-5)
