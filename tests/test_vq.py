"""VQ model pieces against hand-computed / NumPy references, and the tokenizer trainer on tiny data."""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvjax.models import vq
from uvjax.models.vq import Downsample, Upsample, VectorQuantizer, VQConfig, VQModel
from uvjax.training import vq_train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import vq_tokenizer  # noqa: E402


def _np_lookup(z, e, l2):
    """Independent reference: explicit loop over codes, cosine argmax (l2) or Euclidean argmin."""
    z = z.reshape(-1, z.shape[-1]).astype(np.float64)
    e = e.astype(np.float64)
    if l2:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        score = np.stack([z @ e[i] for i in range(e.shape[0])], 1)
        return score.argmax(1), e
    dist = np.stack([((z - e[i]) ** 2).sum(1) for i in range(e.shape[0])], 1)
    return dist.argmin(1), e


@pytest.mark.parametrize("l2", [True, False])
def test_quantizer_lookup_matches_numpy(l2):
    rng = np.random.default_rng(0)
    k, d = 37, 8
    e = rng.standard_normal((k, d)).astype(np.float32) * 0.7
    z = rng.standard_normal((2, 3, 5, d)).astype(np.float32)
    q = VectorQuantizer(VQConfig(codebook_size=k, code_dim=d, l2_norm=l2))
    idx, zq, _ = q.apply({"params": {"embedding": e}}, jnp.asarray(z), method=VectorQuantizer.lookup)
    ref_idx, ref_e = _np_lookup(z, e, l2)
    assert idx.shape == (2, 3, 5) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx).ravel(), ref_idx)
    np.testing.assert_allclose(np.asarray(zq).reshape(-1, d), ref_e[ref_idx], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("l2", [True, False])
def test_quantizer_near_ties_match_float64(l2):
    """Points a hair off the midpoint of two codes: the expanded |z|^2 + |e|^2 - 2 z.e alone picked the
    wrong one of the pair at float64 gaps up to 4.1e-5 (Euclidean, D = 256, |e|^2 ~ 87) and 1.2e-6 (unit
    vectors); with the exact re-ranking the largest wrong gap is 1.3e-6 and 3e-8."""
    rng = np.random.default_rng(0)
    k, d, n = 64, 256, 2048
    e = (rng.standard_normal((k, d)) * 0.3 + 0.5).astype(np.float32)
    e64 = e.astype(np.float64)
    if l2:
        e64 = e64 / np.linalg.norm(e64, axis=1, keepdims=True)
    i = rng.integers(0, k, n)
    j = (i + 1 + rng.integers(0, k - 1, n)) % k
    z = ((0.5 * (e64[i] + e64[j])) * (3.0 if l2 else 1.0) + 1e-6 * rng.standard_normal((n, d))).astype(np.float32)
    z64 = z.astype(np.float64)
    if l2:
        z64 = z64 / np.linalg.norm(z64, axis=1, keepdims=True)
    dist = np.stack([((z64 - e64[c]) ** 2).sum(1) for c in range(k)], 1)
    srt = np.sort(dist, 1)
    clear = srt[:, 1] - srt[:, 0] > (1e-7 if l2 else 4e-6)
    assert clear.mean() > 0.4
    q = VectorQuantizer(VQConfig(codebook_size=k, code_dim=d, l2_norm=l2))
    idx, _, _ = jax.jit(lambda zz: q.apply({"params": {"embedding": e}}, zz, method=VectorQuantizer.lookup))(z)
    np.testing.assert_array_equal(np.asarray(idx)[clear], dist.argmin(1)[clear])


def _np_group_norm(x, groups, scale, bias, eps):
    x = x.astype(np.float64)
    b, h, w, c = x.shape
    xr = x.reshape(b, h * w, groups, c // groups)
    mean = xr.mean((1, 3), keepdims=True)
    var = ((xr - mean) ** 2).mean((1, 3), keepdims=True)
    return ((xr - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_group_norm_batched_flat_activations_match_float64():
    """A batch of 4 near-flat activation maps (per-channel constant, one square, 1e-3 noise): flax's
    GroupNorm (use_fast_variance=False) was 8.0e-4 off float64 on XLA:CPU (1.5e-5 one image at a time);
    the own GroupNorm 1.1e-6. Same param tree as flax's, so converted checkpoints load unchanged."""
    rng = np.random.default_rng(0)
    b, s, c, g = 4, 128, 8, 4
    x = np.empty((b, s, s, c))
    for i in range(b):
        x[i] = rng.standard_normal(c) * 2 + 1.5
        x[i, s // 3:s // 2, s // 3:s // 2] += rng.standard_normal(c)
    x = (x + 1e-3 * rng.standard_normal(x.shape)).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(c)).astype(np.float32)
    mod = vq.GroupNorm(num_groups=g, epsilon=1e-6)
    tree = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), mod.init(jax.random.PRNGKey(0), x[:1, :4, :4]))
    flax_tree = nn.GroupNorm(num_groups=g, epsilon=1e-6).init(jax.random.PRNGKey(0), x[:1, :4, :4])
    assert tree == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), flax_tree)
    y = jax.jit(lambda v: mod.apply({"params": {"scale": scale, "bias": bias}}, v))(x)
    want = _np_group_norm(x, g, scale, bias, 1e-6)
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y[1:2]), want[1:2], rtol=0, atol=1e-5)  # same with the image's own stats


def test_straight_through_and_loss_placement():
    """The loss *values* of the two beta placements agree (stop-gradient: codebook == commit in value), so
    the placement shows only in the gradients. Hand-derived (N = number of elements, q = e[idx]):
    d/dz = 2*w_commit*(z - q)/N and d/de_k = 2*w_codebook*sum_{idx=k}(e_k - z)/N, with
    (w_codebook, w_commit) = (1, beta) by default and (beta, 1) for taming's legacy placement."""
    rng = np.random.default_rng(1)
    e = rng.standard_normal((16, 4)).astype(np.float32)
    z = jnp.asarray(rng.standard_normal((1, 2, 2, 4)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((1, 2, 2, 4)).astype(np.float32))
    beta = 0.25
    for legacy in (False, True):
        q = VectorQuantizer(VQConfig(codebook_size=16, code_dim=4, l2_norm=False, legacy_beta=legacy, beta=beta))
        f = lambda zz: jnp.sum(q.apply({"params": {"embedding": e}}, zz)[0] * w)
        np.testing.assert_allclose(np.asarray(jax.grad(f)(z)), np.asarray(w), rtol=1e-6)  # identity gradient
        zst, idx, losses = q.apply({"params": {"embedding": e}}, z)
        idx = np.asarray(idx).ravel()
        np.testing.assert_allclose(np.asarray(zst).reshape(-1, 4), e[idx], rtol=1e-6, atol=1e-6)
        z64, e64 = np.asarray(z, np.float64).reshape(-1, 4), e.astype(np.float64)
        diff = e64[idx] - z64
        mse = np.mean(diff ** 2)
        np.testing.assert_allclose(float(losses["vq"]), (1 + beta) * mse, rtol=1e-5)
        w_codebook, w_commit = (beta, 1.0) if legacy else (1.0, beta)
        n = diff.size
        want_dz = 2 * w_commit * (-diff) / n
        want_de = np.zeros_like(e64)
        np.add.at(want_de, idx, 2 * w_codebook * diff / n)
        assert np.abs(want_de).max() > 0.01 and len(set(idx.tolist())) > 1
        vq_loss = lambda p, zz, q=q: q.apply({"params": {"embedding": p}}, zz)[2]["vq"]
        g_e, g_z = jax.grad(vq_loss, argnums=(0, 1))(jnp.asarray(e), z)
        np.testing.assert_allclose(np.asarray(g_z).reshape(-1, 4), want_dz, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(g_e), want_de, rtol=1e-5, atol=1e-7)


def test_downsample_pads_right_bottom_and_upsample_is_nearest():
    cfg = VQConfig()
    x = jnp.arange(1 * 6 * 6 * 1, dtype=jnp.float32).reshape(1, 6, 6, 1)
    centre = np.zeros((3, 3, 1, 1), np.float32)
    centre[1, 1] = 1.0  # a kernel that picks its centre pixel
    p = {"conv": {"kernel": centre, "bias": np.zeros(1, np.float32)}}
    y = np.asarray(Downsample(cfg).apply({"params": p}, x))[0, :, :, 0]
    # Output (i, j) looks at rows 2i..2i+2 -> centre (2i+1, 2j+1); symmetric SAME padding would give (2i, 2j).
    np.testing.assert_array_equal(y, np.asarray(x)[0, 1::2, 1::2, 0])
    u = np.asarray(Upsample(cfg).apply({"params": p}, x[:, :3, :3]))[0, :, :, 0]
    np.testing.assert_array_equal(u, np.asarray(x)[0, :3, :3, 0].repeat(2, 0).repeat(2, 1))


SMALL = VQConfig(ch=8, ch_mult=(1, 2, 2), enc_res_blocks=1, dec_res_blocks=2, z_channels=16, codebook_size=32,
                 code_dim=4)


def test_encode_decode_shapes_and_ranges():
    params = vq.init_params(SMALL, jax.random.PRNGKey(0), 32)
    model = VQModel(SMALL)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 32, 16, 3)).astype(np.float32))
    ids = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQModel.encode))(params, x)
    assert ids.shape == (3, 8 * 4) and ids.dtype == jnp.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < SMALL.codebook_size
    dec = jax.jit(lambda p, i: model.apply({"params": p}, i, method=VQModel.decode_indices, grid=(8, 4)))
    img = dec(params, ids)
    assert img.shape == (3, 32, 16, 3) and bool(jnp.all(jnp.isfinite(img)))
    with pytest.raises(ValueError, match="square"):
        jax.eval_shape(lambda p, i: model.apply({"params": p}, i, method=VQModel.decode_indices), params, ids)
    emb = model.apply({"params": params}, ids, method=VQModel.embed_codes)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, rtol=1e-5)  # l2 codes
    u8 = vq.to_uint8(np.asarray(img) * 10)  # out-of-range values clamp
    assert u8.dtype == np.uint8 and u8.min() >= 0 and u8.max() <= 255
    assert vq.to_uint8(np.array([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="multiple"):
        SMALL.grid(30)


def test_architecture_flags_change_the_tree():
    def keys(cfg):
        shapes = vq.param_shapes(cfg)
        return {"/".join(str(p.key) for p in path) for path, _ in jax.tree_util.tree_leaves_with_path(shapes)}

    base = dict(ch=8, ch_mult=(1, 2), enc_res_blocks=2, dec_res_blocks=3, z_channels=8, codebook_size=16, code_dim=4)
    lg = keys(VQConfig(**base))
    ch = keys(VQConfig(**base, attn_last_level=False))
    assert "encoder/conv_blocks_1/attn_1/q/kernel" in lg and "decoder/conv_blocks_0/attn_2/q/kernel" in lg
    assert not any("/attn_" in k for k in ch) and "encoder/mid/mid_1/q/kernel" in ch
    assert "encoder/mid/mid_1/q/kernel" not in keys(VQConfig(**base, mid_attn=False))
    cham = vq.chameleon_vqgan()
    assert (cham.codebook_size, cham.code_dim, cham.l2_norm, cham.attn_last_level) == (8192, 256, False, False)


def _blobs(n, size, seed):
    """Tiny synthetic images: a coloured disc with a white bar, on white (thin-line + flat-colour content)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.full((n, size, size, 3), 255, np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(size * 0.3, size * 0.7, 2).tolist() + [rng.uniform(size * 0.2, size * 0.35)]
        out[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        row = int(rng.integers(2, size - 2))
        out[i, row:row + 2, 4:size - 4] = 255
    return out


def _smoke_cfg():
    return vq_tokenizer.get_config("smoke")


def test_training_steps_reduce_loss_on_fixed_batch():
    cfg = _smoke_cfg()
    tc = cfg.train
    vcfg = vq_train.vq_config_from(cfg)
    model = VQModel(vcfg)
    params = vq.init_params(vcfg, jax.random.PRNGKey(0), 32)
    tx = vq_train.make_optimizer(tc)
    opt = tx.init(params)
    step = vq_train.make_train_step(model, tx, tc)
    x = jnp.asarray(vq.from_uint8(_blobs(8, 32, 0)))
    losses = []
    for _ in range(15):
        params, opt, m, idx, z = step(params, opt, x)
        losses.append(float(m["loss"]))
    assert idx.shape == (8, 16, 16) and z.shape == (8, 16, 16, vcfg.code_dim)
    assert losses[-1] < 0.7 * losses[0], losses


def test_dead_code_restart_raises_usage():
    cfg = _smoke_cfg()
    vcfg = vq_train.vq_config_from(cfg)
    model = VQModel(vcfg)
    params = vq.init_params(vcfg, jax.random.PRNGKey(0), 32)
    # Collapse the codebook: every row the same direction -> one code used.
    emb = np.tile(np.asarray(params["quantize"]["embedding"])[:1], (vcfg.codebook_size, 1))
    params = dict(params, quantize={"embedding": jnp.asarray(emb)})
    imgs = _blobs(16, 32, 1)
    before = vq_train.evaluate(model, params, imgs, batch_size=16)
    assert before["codes_used"] == 1
    _, aux = jax.jit(model.apply)({"params": params}, jnp.asarray(vq.from_uint8(imgs)))
    counts = np.bincount(np.asarray(aux["indices"]).ravel(), minlength=vcfg.codebook_size)
    z = np.asarray(aux["z"]).reshape(-1, vcfg.code_dim)
    params2, n = vq_train.restart_dead_codes(params, counts, z, np.random.default_rng(0))
    assert n == vcfg.codebook_size - 1
    after = vq_train.evaluate(model, params2, imgs, batch_size=16)
    assert after["codes_used"] > 8 * before["codes_used"], (before, after)
    assert np.array_equal(np.asarray(params["quantize"]["embedding"]), emb)  # input not mutated


def test_train_vq_writes_outputs(tmp_path):
    cfg = _smoke_cfg()
    imgs = _blobs(cfg.data.num_train + cfg.data.num_eval, 32, 2)
    params, metrics = vq_train.train_vq(imgs, cfg, str(tmp_path), progress=False)
    ev = metrics["eval"]
    assert 0 < ev["usage"] <= 1 and ev["psnr"] > 5 and metrics["steps"] == cfg.train.steps
    for f in (vq_train.PARAMS_FILE, vq_train.METRICS_FILE, vq_train.CONFIG_FILE, vq_train.RECON_FILE):
        assert (tmp_path / f).exists(), f
    assert json.loads((tmp_path / vq_train.METRICS_FILE).read_text())["eval"]["psnr"] == ev["psnr"]
    vcfg, loaded = vq_train.load_trained_vq(str(tmp_path))
    assert vcfg == vq_train.vq_config_from(cfg)
    np.testing.assert_array_equal(loaded["quantize"]["embedding"], np.asarray(params["quantize"]["embedding"]))


def test_config_presets():
    for p in vq_tokenizer.PRESETS:
        c = vq_tokenizer.get_config(p)
        vcfg = vq_train.vq_config_from(c)
        vcfg.grid(c.data.image_size)
    assert vq_tokenizer.get_config("").preset == "tiny"
    with pytest.raises(ValueError, match="preset"):
        vq_tokenizer.get_config("huge")
