"""The alignment knob (seed §9): identity at s = 0, singular values in [1-s, 1+s] at s > 0, deterministic."""
import numpy as np
import pytest

from uvjax.models import alignment


@pytest.mark.parametrize("dim", [8, 32])
def test_zero_strength_is_the_identity(dim):
    a, b = alignment.affine(dim, 0.0, seed=7, translation=True)
    np.testing.assert_array_equal(a, np.eye(dim, dtype=np.float32))
    np.testing.assert_array_equal(b, np.zeros(dim, np.float32))
    x = np.random.default_rng(0).normal(size=(3, 5, dim)).astype(np.float32)
    np.testing.assert_array_equal(alignment.apply(x, a, b), x)
    assert alignment.apply_config(x, 0.0, 7, True) is x  # not even a matmul


@pytest.mark.parametrize("s", [0.1, 0.3, 0.6])
@pytest.mark.parametrize("haar", [False, True])
def test_singular_values_lie_in_the_band(s, haar):
    a, b = alignment.affine(8, s, seed=42, haar=haar)
    sv = alignment.singular_values(a)
    assert sv.min() >= 1 - s - 1e-5 and sv.max() <= 1 + s + 1e-5
    assert not np.allclose(a, np.eye(8), atol=1e-3)  # a real distortion, rotation included
    np.testing.assert_array_equal(b, 0)  # no translation unless asked (the historical files had b = 0)
    q = a / np.linalg.norm(a, axis=0, keepdims=True)  # A = Q diag(u): columns of A are scaled columns of Q
    np.testing.assert_allclose(q.T @ q, np.eye(8), atol=1e-5)


def test_translation_and_seed_sharing_across_strengths():
    a1, b1 = alignment.affine(16, 0.2, seed=3, translation=True)
    a2, b2 = alignment.affine(16, 0.2, seed=3, translation=True)
    np.testing.assert_array_equal(a1, a2)
    assert np.all(np.abs(b1) <= 0.2) and np.any(b1 != 0)
    # one seed gives one rotation at every strength (as in the reference, one draw serves all strengths)
    a3, _ = alignment.affine(16, 0.3, seed=3)
    q1 = a1 / np.linalg.norm(a1, axis=0, keepdims=True)
    q3 = a3 / np.linalg.norm(a3, axis=0, keepdims=True)
    np.testing.assert_allclose(q1, q3, atol=1e-5)
    assert not np.allclose(alignment.affine(16, 0.2, seed=4)[0], a1)


def test_jax_application_matches_numpy():
    import jax.numpy as jnp
    x = np.random.default_rng(1).normal(size=(2, 4, 8)).astype(np.float32)
    a, b = alignment.affine(8, 0.3, seed=42, translation=True)
    got = np.asarray(alignment.apply_config(jnp.asarray(x), 0.3, 42, True))
    np.testing.assert_allclose(got, x @ a + b, rtol=1e-5, atol=1e-5)


def test_bad_strength_is_refused():
    with pytest.raises(ValueError, match="strength"):
        alignment.affine(8, 1.0)


def _reference_affine(dim, s, seed):
    """alignment.py's construction, written out in float64: A = Q·diag(u) with Q from the QR of a U[0, 1)
    matrix, u ~ U(1-s, 1+s], translation t ~ U(-s, s], drawn in that order from default_rng(seed)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.random((dim, dim)))
    u = 1.0 + s - 2.0 * s * rng.random(dim)
    t = s - 2.0 * s * rng.random(dim)
    return q * u[None, :], t


def test_model_distorts_only_understanding_inputs():
    """The understanding adapter reads x·A + b of the code vectors, the generation adapter the untouched
    ones: the embedded IMAGE_IN rows equal (codebook[id]·A + b)·W + c computed here in float64 from the
    parameters and the construction above (translation on, adapter bias non-zero)."""
    import dataclasses
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT
    from uvjax.models.unified import ImageConfig, UnifiedConfig, UnifiedModel
    from uvjax.models.llama import DecoderConfig
    dec = DecoderConfig(vocab_size=32, hidden=16, layers=1, heads=2, kv_heads=2, intermediate=32)
    base = ImageConfig(num_codes=12, code_dim=8)
    batch = {"tokens": jnp.array([[1, 3, 4, 5, 2]]), "modality": jnp.array([[1, IMAGE_IN, IMAGE_IN, IMAGE_OUT, 1]]),
             "segment_ids": jnp.ones((1, 5), jnp.int32), "positions": jnp.arange(5)[None]}
    m0 = UnifiedModel(UnifiedConfig(dec, base))
    params = nn.unbox(m0.init(jax.random.PRNGKey(0), batch, method=UnifiedModel.init_all))
    noise = np.random.default_rng(1)  # a non-zero adapter bias (initialised to zeros) so b and c both show
    params = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.1 * noise.standard_normal(x.shape, np.float32),
                                    params)
    s, seed = 0.3, 5
    m1 = UnifiedModel(UnifiedConfig(dec, dataclasses.replace(base, align_strength=s, align_seed=seed,
                                                              align_translation=True)))
    x0 = np.asarray(m0.apply(params, batch, method=UnifiedModel.embed_inputs))
    x1 = np.asarray(m1.apply(params, batch, method=UnifiedModel.embed_inputs))
    mod = np.asarray(batch["modality"][0])
    a64, b64 = _reference_affine(8, s, seed)
    got_a, got_b = alignment.affine(8, s, seed=seed, translation=True)
    np.testing.assert_allclose(got_a, a64, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_b, b64, rtol=0, atol=1e-6)
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params["params"])
    codes = p["image_codebook"][np.asarray(batch["tokens"][0])[mod == IMAGE_IN]]
    und = p["understanding_adapter"]["fc1"]
    want = (codes @ a64 + b64) @ und["kernel"] + und["bias"]
    np.testing.assert_allclose(x1[0, mod == IMAGE_IN], want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - (codes @ und["kernel"] + und["bias"])).max() > 0.05  # the distortion is visible
    np.testing.assert_array_equal(x0[0, mod != IMAGE_IN], x1[0, mod != IMAGE_IN])
    mz = UnifiedModel(UnifiedConfig(dec, dataclasses.replace(base, align_strength=0.0)))
    np.testing.assert_array_equal(np.asarray(mz.apply(params, batch, method=UnifiedModel.embed_inputs)), x0)
