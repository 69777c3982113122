"""Training losses against float64 formulas written here: the SigLIP pairwise sigmoid loss
(training/siglip_pretrain.py), the VQ trainer's pixel losses (training/vq_train.py ``recon_losses``: l1, l2,
edge) and the VQ codebook / commitment terms with their gradient placement (models/vq.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvjax.models.vq import VectorQuantizer, VQConfig
from uvjax.training import siglip_pretrain as sp
from uvjax.training.vq_train import recon_losses


def np_sigmoid_loss(logits):
    """−(1/B) Σ_ij log σ(z_ij·l_ij), z = +1 on the diagonal and −1 elsewhere: big_vision's SigLIP loss,
    summed over all B² pairs and divided by the batch size B (not by B²). log σ(u) = −log(1 + e^−u),
    written with logaddexp so ±60 logits do not overflow."""
    l = np.asarray(logits, np.float64)
    b = l.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            total += -np.logaddexp(0.0, -z * l[i, j])
    return -total / b


@pytest.mark.parametrize("b,scale", [(4, 1.0), (7, 10.0), (16, 60.0)])
def test_sigmoid_loss_matches_float64(b, scale):
    rng = np.random.default_rng(b)
    logits = (scale * rng.standard_normal((b, b))).astype(np.float32)
    got = float(sp.sigmoid_loss(jnp.asarray(logits)))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, np_sigmoid_loss(logits), rtol=2e-6)
    # its gradient: d/dl_ij = −z_ij·σ(−z_ij·l_ij)/B
    z = 2 * np.eye(b) - 1
    l64 = logits.astype(np.float64)
    want = -z / (1 + np.exp(z * l64)) / b
    np.testing.assert_allclose(np.asarray(jax.grad(sp.sigmoid_loss)(jnp.asarray(logits))), want, rtol=1e-5, atol=1e-9)


def test_sigmoid_loss_by_hand_two_pairs():
    """B = 2, logits [[2, −1], [0, 3]]: −(log σ(2) + log σ(1) + log σ(0) + log σ(3)) / 2."""
    sig = lambda u: 1 / (1 + np.exp(-u))
    want = -(np.log(sig(2.0)) + np.log(sig(1.0)) + np.log(sig(0.0)) + np.log(sig(3.0))) / 2
    assert float(sp.sigmoid_loss(jnp.asarray([[2.0, -1.0], [0.0, 3.0]]))) == pytest.approx(want, rel=1e-6)


def test_two_tower_logits_are_scaled_cosines_plus_bias():
    """logits_ij = exp(t)·<img_i, txt_j> + b with unit-norm embeddings, t = log 10 and b = −10 at init."""
    from uvjax.models.siglip import vit_config
    vit = vit_config(dict(preset="siglip_small", image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp=32))
    model = sp.TwoTower(vit, dict(width=16, depth=1, heads=2, mlp=32, max_len=16), 8)
    rng = np.random.default_rng(0)
    imgs = jnp.asarray(rng.standard_normal((3, 16, 16, 3)), jnp.float32)
    ids = jnp.asarray(sp.encode_bytes(["a red watch", "blue", "twelve"], 16))
    # random parameters of the right shapes (a real init costs seconds of small ops on a busy CPU); t and
    # b's init values are read from their initialisers
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), imgs, ids)["params"]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), shapes)
    tb = model.init(jax.random.PRNGKey(0), method=lambda m: (m.t, m.b))["params"]
    assert float(tb["t"]) == pytest.approx(np.log(10.0)) and float(tb["b"]) == pytest.approx(-10.0)
    assert params["t"].shape == params["b"].shape == ()
    params = dict(params, t=jnp.float32(0.7), b=jnp.float32(-2.5))
    parts = jax.jit(lambda p: model.apply({"params": p}, imgs, ids,
                                          method=lambda m, i, t: (m.embed_images(i), m.embed_texts(t), m(i, t))))
    zi, zt, got = (np.asarray(a, np.float64) for a in parts(params))
    np.testing.assert_allclose(np.linalg.norm(zi, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(zt, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, np.exp(0.7) * zi @ zt.T - 2.5, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ VQ pixel losses
def np_recon_losses(recon, target):
    """Loops over pixels in float64: l1 = mean |r − t|, l2 = mean (r − t)², edge = ½(mean over vertical
    neighbour pairs of |Δr − Δt| + the same over horizontal pairs)."""
    r, t = np.asarray(recon, np.float64), np.asarray(target, np.float64)
    b, h, w, c = r.shape
    d = r - t
    vert = [abs((r[n, y + 1, x, k] - r[n, y, x, k]) - (t[n, y + 1, x, k] - t[n, y, x, k]))
            for n in range(b) for y in range(h - 1) for x in range(w) for k in range(c)]
    horiz = [abs((r[n, y, x + 1, k] - r[n, y, x, k]) - (t[n, y, x + 1, k] - t[n, y, x, k]))
             for n in range(b) for y in range(h) for x in range(w - 1) for k in range(c)]
    return {"l1": np.abs(d).mean(), "l2": (d ** 2).mean(), "edge": 0.5 * (np.mean(vert) + np.mean(horiz))}


@pytest.mark.parametrize("shape", [(2, 6, 5, 3), (1, 4, 9, 1)])
def test_recon_losses_match_float64(shape):
    rng = np.random.default_rng(sum(shape))
    target = rng.uniform(-1, 1, shape).astype(np.float32)
    recon = np.clip(target + 0.3 * rng.standard_normal(shape), -1, 1).astype(np.float32)
    got = {k: float(v) for k, v in recon_losses(jnp.asarray(recon), jnp.asarray(target)).items()}
    want = np_recon_losses(recon, target)
    assert got == pytest.approx(want, rel=1e-5)


def test_edge_loss_ignores_offsets_and_sees_structure_by_hand():
    """A constant offset has no edges (edge 0, l1 = |offset|); a one-pixel vertical line in a 1×3×3×1
    image: horizontal differences of the line [0,1,−1] per row mismatch by 1 twice in each of 3 rows
    (6 of 6 pairs → mean 1), vertical ones never (0): edge = ½(0 + 1) = 0.5."""
    t = jnp.zeros((1, 3, 3, 1))
    out = recon_losses(t + 0.25, t)
    assert float(out["edge"]) == 0.0 and float(out["l1"]) == pytest.approx(0.25) and float(out["l2"]) == pytest.approx(0.0625)
    line = t.at[:, :, 1, :].set(1.0)
    out = recon_losses(line, t)
    assert float(out["edge"]) == pytest.approx(0.5) and float(out["l1"]) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------- VQ codebook terms
def _vq(legacy, beta=0.25, l2=False, k=16, d=4):
    return VectorQuantizer(VQConfig(codebook_size=k, code_dim=d, l2_norm=l2, legacy_beta=legacy, beta=beta))


@pytest.mark.parametrize("l2", [False, True])
def test_codebook_and_commit_values_match_float64(l2):
    rng = np.random.default_rng(5)
    e = rng.standard_normal((16, 4)).astype(np.float32)
    z = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    _, idx, losses = _vq(False, l2=l2).apply({"params": {"embedding": e}}, jnp.asarray(z))
    z64, e64 = z.astype(np.float64).reshape(-1, 4), e.astype(np.float64)
    if l2:
        z64 = z64 / np.linalg.norm(z64, axis=1, keepdims=True)
        e64 = e64 / np.linalg.norm(e64, axis=1, keepdims=True)
    ref_idx = np.argmin(((z64[:, None] - e64[None]) ** 2).sum(-1), 1)
    np.testing.assert_array_equal(np.asarray(idx).ravel(), ref_idx)
    mse = np.mean((e64[ref_idx] - z64) ** 2)  # both terms have this value; they differ in their gradients
    assert float(losses["codebook"]) == pytest.approx(mse, rel=1e-5)
    assert float(losses["commit"]) == pytest.approx(mse, rel=1e-5)
    assert float(losses["vq"]) == pytest.approx(1.25 * mse, rel=1e-5)


@pytest.mark.parametrize("legacy", [False, True])
def test_vq_loss_gradients_put_beta_where_documented(legacy):
    """Euclidean codes, n = numel(z). The codebook term moves only the chosen rows, towards z:
    ∂/∂e_c = (2/n)·Σ_{i→c}(e_c − z_i); the commitment term moves only z: ∂/∂z_i = (2/n)(z_i − e_c(i)).
    β (0.4 here, so the two placements differ) scales the commitment term, or with ``legacy_beta``
    (taming/Chameleon) the codebook term."""
    beta = 0.4
    rng = np.random.default_rng(6)
    e = rng.standard_normal((16, 4)).astype(np.float32)
    z = rng.standard_normal((1, 4, 5, 4)).astype(np.float32)
    q = _vq(legacy, beta=beta)

    def vq_loss(emb, zz):
        return q.apply({"params": {"embedding": emb}}, zz)[2]["vq"]

    ge, gz = jax.grad(vq_loss, argnums=(0, 1))(jnp.asarray(e), jnp.asarray(z))
    z64, e64 = z.astype(np.float64).reshape(-1, 4), e.astype(np.float64)
    idx = np.argmin(((z64[:, None] - e64[None]) ** 2).sum(-1), 1)
    n = z64.size
    want_e = np.zeros_like(e64)
    for i, c in enumerate(idx):
        want_e[c] += 2.0 / n * (e64[c] - z64[i])
    want_z = 2.0 / n * (z64 - e64[idx])
    cb_w, commit_w = (beta, 1.0) if legacy else (1.0, beta)
    np.testing.assert_allclose(np.asarray(ge, np.float64), cb_w * want_e, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gz, np.float64).reshape(-1, 4), commit_w * want_z, rtol=1e-5, atol=1e-7)
    assert len(set(idx.tolist())) < 16  # some rows unused: their gradient is exactly 0
    unused = np.setdiff1d(np.arange(16), idx)
    assert (np.asarray(ge)[unused] == 0).all()
