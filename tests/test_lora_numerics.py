"""models/lora.py numerics against float64 NumPy: LoRA dropout (train mode drops the LoRA branch's input at
rate p and scales by 1/(1−p); the base path is never dropped; eval is deterministic) and the bf16 branch
(the delta is added after the base matmul, so a delta below the kernel's bf16 resolution still counts)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from uvjax.models.lora import Dense, LoRAConfig

IN, OUT = 64, 48


def _dense(rank, alpha, dropout=0.0, dtype=jnp.float32, param_dtype=jnp.float32):
    return Dense(OUT, ("embed", "mlp"), proj="q", lora=LoRAConfig(rank=rank, alpha=alpha, dropout=dropout),
                 dtype=dtype, param_dtype=param_dtype)


def _vars(w, a, b):
    return {"params": {"kernel": jnp.asarray(w)}, "lora": {"a": jnp.asarray(a), "b": jnp.asarray(b)}}


def _identity_dropout_output(x, p, key):
    """The layer's dropout of x, read off the layer itself: with W = 0, A = I and B = I/scale the output
    is exactly dropout(x) (0 or x/(1−p) per element)."""
    m = Dense(IN, ("embed", "mlp"), proj="q", lora=LoRAConfig(rank=IN, alpha=2.0 * IN, dropout=p))
    v = _vars(np.zeros((IN, IN), np.float32), np.eye(IN, dtype=np.float32), np.eye(IN, dtype=np.float32) / 2.0)
    return np.asarray(m.apply(v, x, deterministic=False, rngs={"dropout": key}), np.float64)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_lora_input_at_rate_p_and_rescales(p):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((128, IN)) + 3.0).astype(np.float32)  # no zeros: a kept element is visible
    y = _identity_dropout_output(x, p, jax.random.PRNGKey(1))
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)  # kept elements scaled by 1/(1−p)
    n = x.size
    drop_rate = 1 - kept.mean()
    assert abs(drop_rate - p) < 5 * np.sqrt(p * (1 - p) / n), drop_rate  # 5 sigma of a binomial
    # per element, not per row or per feature: rows and columns each hold both kept and dropped values
    assert (kept.any(1) & ~kept.all(1)).mean() > 0.9 and (kept.any(0) & ~kept.all(0)).all()
    # the same key draws the same mask, another key another
    np.testing.assert_array_equal(y, _identity_dropout_output(x, p, jax.random.PRNGKey(1)))
    assert not np.array_equal(kept, _identity_dropout_output(x, p, jax.random.PRNGKey(2)) != 0)


def test_dropout_output_matches_float64_with_that_mask():
    """Generic W, A, B: y = x·W + scale·((m ⊙ x)/(1−p))·A·B with the mask m of the same key; the base path
    sees the undropped x."""
    rng = np.random.default_rng(1)
    p, rank, alpha = 0.3, 4, 8.0
    x = (rng.standard_normal((96, IN)) + 3.0).astype(np.float32)
    key = jax.random.PRNGKey(7)
    mask = _identity_dropout_output(x, p, key) != 0  # the mask depends on the key and shape only
    w = rng.standard_normal((IN, OUT)).astype(np.float32) * 0.1
    a = rng.standard_normal((IN, rank)).astype(np.float32) * 0.1
    b = rng.standard_normal((rank, OUT)).astype(np.float32) * 0.1
    m = _dense(rank, alpha, dropout=p)
    got = np.asarray(m.apply(_vars(w, a, b), x, deterministic=False, rngs={"dropout": key}), np.float64)
    x64, w64, a64, b64 = (t.astype(np.float64) for t in (x, w, a, b))
    want = x64 @ w64 + (alpha / rank) * ((mask * x64) / (1 - p)) @ a64 @ b64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    no_drop = x64 @ w64 + (alpha / rank) * x64 @ a64 @ b64
    assert np.abs(got - no_drop).max() > 1e-2  # the mask mattered
    # eval mode: no rng needed, deterministic, no dropout
    ev = np.asarray(m.apply(_vars(w, a, b), x), np.float64)
    np.testing.assert_allclose(ev, no_drop, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ev, np.asarray(m.apply(_vars(w, a, b), x, deterministic=True)))


def test_no_dropout_layer_without_lora_or_with_rate_zero():
    """p = 0 (or no LoRA on this projection): train mode needs no dropout rng and equals eval mode."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, IN)).astype(np.float32)
    w = rng.standard_normal((IN, OUT)).astype(np.float32)
    a, b = rng.standard_normal((IN, 2)).astype(np.float32), rng.standard_normal((2, OUT)).astype(np.float32)
    m = _dense(2, 4.0, dropout=0.0)
    np.testing.assert_allclose(np.asarray(m.apply(_vars(w, a, b), x, deterministic=False)),
                               x.astype(np.float64) @ w + 2.0 * x.astype(np.float64) @ a @ b, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------- bf16
def _bf16(a):
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
def test_bf16_lora_matches_float64_within_bf16_tolerance(param_dtype):
    """Compute dtype bf16: the output is bf16, the LoRA factors are created in ``param_dtype``, and the
    value is the float64 x·W + scale·x·A·B of the bf16-rounded operands within bf16 rounding: each of the
    few roundings (x·A, scale·B, the two products, the sum) is ≤ 2⁻⁸ relative, so 4·2⁻⁸ of the summed
    magnitudes bounds it."""
    rng = np.random.default_rng(3)
    rank, alpha = 4, 8.0
    x = rng.standard_normal((32, IN)).astype(np.float32)
    w = (rng.standard_normal((IN, OUT)) * 0.1).astype(np.float32)
    a = (rng.standard_normal((IN, rank)) * 0.2).astype(np.float32)
    b = (rng.standard_normal((rank, OUT)) * 0.2).astype(np.float32)  # LoRA term of the size of the base
    m = _dense(rank, alpha, dtype=jnp.bfloat16, param_dtype=param_dtype)
    init = m.init(jax.random.PRNGKey(0), jnp.asarray(x))
    assert init["params"]["kernel"].unbox().dtype == param_dtype
    assert init["lora"]["a"].unbox().dtype == init["lora"]["b"].unbox().dtype == param_dtype
    cast = (lambda t: jnp.asarray(_bf16(t))) if param_dtype == jnp.bfloat16 else jnp.asarray
    y = m.apply({"params": {"kernel": cast(w)}, "lora": {"a": cast(a), "b": cast(b)}}, jnp.asarray(x))
    assert y.dtype == jnp.bfloat16 and y.shape == (32, OUT)
    x64, w64, a64, b64 = (_bf16(t).astype(np.float64) for t in (x, w, a, b))
    s = alpha / rank
    want = x64 @ w64 + s * (x64 @ a64) @ b64
    bound = 4 * 2.0 ** -8 * (np.abs(x64) @ np.abs(w64) + s * (np.abs(x64) @ np.abs(a64)) @ np.abs(b64))
    err = np.abs(np.asarray(y, np.float64) - want)
    assert (err <= bound).all(), float((err / bound).max())
    lora_term = np.abs(s * (x64 @ a64) @ b64)
    # the tolerance could not hide a missing branch (nor one with half its scale, for most elements)
    assert (lora_term > bound).mean() > 0.75 and (lora_term / 2 > bound).mean() > 0.6


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
def test_bf16_keeps_a_delta_a_merged_kernel_would_round_away(param_dtype):
    """W = ±1 columns that cancel for x = 1, and scale·A·B = 2⁻¹⁰ everywhere: ±1 + 2⁻¹⁰ rounds back to ±1
    in bf16 (half an ulp at 1 is 2⁻⁸), so x·(W + A·B) in bf16 would give 0; the separate branch gives
    64·2⁻¹⁰ = 2⁻⁴ exactly — the reason the bf16 path does not merge."""
    w = np.ones((IN, OUT), np.float32)
    w[IN // 2:] = -1.0
    a = np.full((IN, 1), 2.0 ** -5, np.float32)
    b = np.full((1, OUT), 2.0 ** -5, np.float32)
    m = _dense(1, 1.0, dtype=jnp.bfloat16, param_dtype=param_dtype)
    x = np.ones((3, IN), np.float32)
    cast = (lambda t: jnp.asarray(_bf16(t))) if param_dtype == jnp.bfloat16 else jnp.asarray
    y = np.asarray(m.apply({"params": {"kernel": cast(w)}, "lora": {"a": cast(a), "b": cast(b)}}, jnp.asarray(x)),
                   np.float64)
    merged = _bf16(w + a @ b).astype(np.float64)
    assert (x @ merged == 0).all()  # what merging in bf16 would compute
    np.testing.assert_array_equal(y, np.full((3, OUT), 2.0 ** -4))  # float64: 64·2⁻¹⁰
