"""Decoder, LoRA and KV cache against independent float64 references."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from reference import decoder_forward, rms_norm, rope
from uvjax.config import lora_preset, model_config
from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT
from uvjax.models.llama import DecoderConfig, apply_rope, rope_frequencies
from uvjax.models.lora import merge_lora
from uvjax.models.unified import UnifiedConfig, UnifiedModel
from uvjax.training.step import dummy_batch


def _init(model, seed=0):
    return nn.unbox(model.init({"params": jax.random.key(seed)}, dummy_batch(model.cfg.image.feature_dim),
                               method=UnifiedModel.init_all))


def _np(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


def _randomise_lora(lora, seed):
    leaves, tdef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tdef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _layers(params, n):
    return [jax.tree_util.tree_map(lambda x: x[i], params) for i in range(n)]


def test_rope_matches_reference():
    cfg = DecoderConfig(hidden=32, heads=2, rope_base=500.0)
    x = np.random.default_rng(0).normal(size=(1, 7, 2, 16))
    pos = np.array([[0, 1, 2, 0, 1, 5, 9]])
    got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), rope_frequencies(cfg))
    want = rope(x[0], pos[0], 500.0)
    np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-5)


def test_llama3_rope_scaling_reduces_low_frequencies():
    base = DecoderConfig(hidden=128, heads=1, rope_base=500000.0)
    scaled = dataclasses.replace(base, rope_scaling=("llama3", 8.0, 1.0, 4.0, 8192))
    f0, f1 = np.asarray(rope_frequencies(base)), np.asarray(rope_frequencies(scaled))
    wavelen = 2 * np.pi / f0
    # hand-derived from the Llama 3.1 rule: short wavelengths untouched, long ones divided by 8
    np.testing.assert_allclose(f1[wavelen < 8192 / 4], f0[wavelen < 8192 / 4], rtol=1e-6)
    np.testing.assert_allclose(f1[wavelen > 8192], f0[wavelen > 8192] / 8, rtol=1e-6)


@pytest.mark.parametrize("tie,unroll", [(False, 1), (True, 1), (False, 0)])
def test_decoder_matches_float64_reference(tie, unroll):
    """``unroll`` 0: the layer stack without its loop (model.scan_unroll), the same parameters and function."""
    c = tiny_config(**{"model.tie_embeddings": tie, "model.rope_base": 1000.0, "model.scan_unroll": unroll})
    lora_preset(c, 4, 8.0)
    model = UnifiedModel(model_config(c).validate())
    v = _init(model)
    v["lora"] = _randomise_lora(v["lora"], 1)
    rng = np.random.default_rng(0)
    batch = random_batch(rng, 2, 12, 24, 96)
    h = np.asarray(model.apply(v, {k: jnp.asarray(x) for k, x in batch.items()}))
    p, lo = _np(v["params"]), _np(v["lora"])
    emb = p["embed"]["embedding"]
    book = p["image_codebook"]

    def adapter(a, x):
        return x @ a["fc1"]["kernel"] + a["fc1"]["bias"]

    for b in range(2):
        toks, mod = batch["tokens"][b], batch["modality"][b]
        x = np.stack([adapter(p["understanding_adapter"], book[t]) if m == IMAGE_IN else
                      adapter(p["generation_adapter"], book[t]) if m == IMAGE_OUT else emb[t]
                      for t, m in zip(toks, mod)])
        want = decoder_forward(x, batch["segment_ids"][b], batch["positions"][b],
                               _layers(p["decoder"]["layers"], 2), p["decoder"]["final_norm"]["scale"],
                               heads=4, kv_heads=2, base=1000.0, eps=1e-5,
                               lora_layers=_layers(lo["decoder"]["layers"], 2), scale=2.0)
        np.testing.assert_allclose(h[b], want, atol=2e-5)
    # tied head uses the embedding transpose; untied its own kernel
    logits = np.asarray(model.apply(v, jnp.asarray(h[0]), method=UnifiedModel.text_logits))
    w = emb.T if tie else p["lm_head"]["kernel"]
    np.testing.assert_allclose(logits, h[0].astype(np.float64) @ w, atol=2e-5)


def test_fresh_lora_model_equals_base_exactly():
    c = tiny_config()
    base = UnifiedModel(model_config(c).validate())
    lora_preset(c, 4, 8.0)
    with_lora = UnifiedModel(model_config(c).validate())
    v = _init(with_lora)
    assert "lora" in v and all(np.all(np.asarray(b) == 0) for b in
                               [x["b"] for x in jax.tree_util.tree_leaves(
                                   v["lora"], is_leaf=lambda d: isinstance(d, dict) and "b" in d)])
    batch = {k: jnp.asarray(x) for k, x in random_batch(np.random.default_rng(1), 2, 16, 24, 96).items()}
    h_base = base.apply({"params": v["params"]}, batch)
    h_lora = with_lora.apply(v, batch)
    assert np.array_equal(np.asarray(h_base), np.asarray(h_lora))


def test_lora_dense_and_its_gradients_match_float64():
    """fp32 LoRA projections run as x·(W + A·Bs) with a hand-written backward (``lora_dense``); the
    reference is the unmerged x·W + (x·A)·Bs and its textbook gradients in float64 numpy."""
    from uvjax.models.lora import lora_dense
    rng = np.random.default_rng(5)
    x, w, a, bs, dy = (rng.standard_normal(s) for s in ((37, 24), (24, 40), (24, 3), (3, 40), (37, 40)))
    f32 = [jnp.asarray(t, jnp.float32) for t in (x, w, a, bs)]
    y, vjp = jax.vjp(lora_dense, *f32)
    got = vjp(jnp.asarray(dy, jnp.float32))
    u = x @ a
    want_y = x @ w + u @ bs
    want = (dy @ w.T + (dy @ bs.T) @ a.T,  # dx
            x.T @ dy,                      # dW (dropped by XLA when the base is frozen)
            x.T @ (dy @ bs.T),             # dA
            u.T @ dy)                      # dBs
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-4)
    for name, g, wg in zip(("dx", "dW", "dA", "dBs"), got, want):
        np.testing.assert_allclose(np.asarray(g), wg, rtol=1e-5, atol=1e-4, err_msg=name)


def test_merged_equals_unmerged():
    c = tiny_config()
    lora_preset(c, 4, 8.0)
    mc = model_config(c).validate()
    model = UnifiedModel(mc)
    v = _init(model)
    v["lora"] = _randomise_lora(v["lora"], 3)
    batch = {k: jnp.asarray(x) for k, x in random_batch(np.random.default_rng(2), 2, 16, 24, 96).items()}
    h = model.apply(v, batch)
    merged = merge_lora(v["params"], v["lora"], mc.decoder.lora)
    base = UnifiedModel(dataclasses.replace(mc, decoder=dataclasses.replace(mc.decoder, lora=dataclasses.replace(
        mc.decoder.lora, rank=0))))
    h2 = base.apply({"params": merged}, batch)
    np.testing.assert_allclose(np.asarray(h2), np.asarray(h), atol=1e-5)
    assert np.abs(np.asarray(h2) - np.asarray(base.apply({"params": v["params"]}, batch))).max() > 1e-3


def _init_cache(model, batch_size):
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, dummy_batch(0, batch_size, 1),
                                               decode=True))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


@pytest.mark.parametrize("unroll", [1, 0])
def test_kv_cache_logits_equal_full_forward(unroll):
    c = tiny_config(**{"model.scan_unroll": unroll})
    lora_preset(c, 4, 8.0)
    mc = model_config(c).validate()
    T = 14
    model = UnifiedModel(mc)
    v = _init(model)
    v["lora"] = _randomise_lora(v["lora"], 5)
    batch = {k: jnp.asarray(x) for k, x in random_batch(np.random.default_rng(3), 3, T, 24, 96, packed=False).items()}
    full = model.apply(v, batch)
    full_logits = model.apply(v, full, method=UnifiedModel.text_logits)
    dec = UnifiedModel(dataclasses.replace(mc, decoder=dataclasses.replace(mc.decoder, max_cache_len=T)))
    cache = _init_cache(dec, 3)
    # prefill 5 tokens, then one token at a time
    outs = []
    for lo, hi in [(0, 5)] + [(t, t + 1) for t in range(5, T)]:
        chunk = {k: x[:, lo:hi] for k, x in batch.items()}
        h, mut = dec.apply({**v, "cache": cache}, chunk, decode=True, mutable=["cache"])
        cache = mut["cache"]
        outs.append(dec.apply(v, h, method=UnifiedModel.text_logits))
    got = np.concatenate([np.asarray(o) for o in outs], 1)
    np.testing.assert_allclose(got, np.asarray(full_logits), atol=1e-4)


def test_rmsnorm_and_attention_mask_never_cross_segments():
    c = tiny_config()
    model = UnifiedModel(model_config(c).validate())
    v = _init(model)
    batch = random_batch(np.random.default_rng(7), 1, 16, 24, 96)
    seg = batch["segment_ids"][0]
    assert seg.max() >= 2
    h = np.asarray(model.apply(v, {k: jnp.asarray(x) for k, x in batch.items()}))
    # changing tokens of segment 2+ must not change hidden states of segment 1
    b2 = {k: x.copy() for k, x in batch.items()}
    later = seg >= 2
    b2["tokens"][0, later] = (b2["tokens"][0, later] + 5) % 24
    h2 = np.asarray(model.apply(v, {k: jnp.asarray(x) for k, x in b2.items()}))
    first = seg == 1
    assert np.array_equal(h[0, first], h2[0, first])
    assert np.abs(h[0, later] - h2[0, later]).max() > 1e-4


def test_rmsnorm_reference():
    from uvjax.models.llama import RMSNorm
    x = np.random.default_rng(0).normal(size=(3, 8))
    m = RMSNorm(eps=1e-6)
    p = m.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    p = jax.tree_util.tree_map(lambda a: a * 1.5, nn.unbox(p))
    np.testing.assert_allclose(np.asarray(m.apply(p, jnp.asarray(x, jnp.float32))),
                               rms_norm(x, 1.5 * np.ones(8), 1e-6), atol=1e-5)


def _attention_reference(q, k, v, mask, d_out):
    """Softmax attention and its gradients in float64 numpy, from the textbook formulas (keys/values
    repeated over each group of query heads; their gradients summed back over the group)."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(D)
    logits = np.where(mask[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", p, vv)
    dp = np.einsum("bthd,bshd->bhts", d_out, vv)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhts,bshd->bthd", ds, kk) / np.sqrt(D)
    dk = np.einsum("bhts,bthd->bshd", ds, q) / np.sqrt(D)
    dv = np.einsum("bhts,bthd->bshd", p, d_out)
    fold = lambda x: x.reshape(B, T, k.shape[2], G, D).sum(3)
    return out, (dq, fold(dk), fold(dv))


@pytest.mark.parametrize("block", [16, 64])
def test_attention_and_its_hand_written_backward_match_float64(block):
    """The training attention (query blocks of 16 = 4 blocks, or one block of 64) with its custom VJP:
    output and dq/dk/dv on packed segments (two documents + padding) with grouped-query heads, against the
    float64 formulas."""
    from uvjax.models import llama
    rng = np.random.default_rng(3)
    B, T, H, K, D = 2, 64, 4, 2, 8
    q, d_out = (rng.standard_normal((B, T, H, D)) for _ in range(2))
    k, v = (rng.standard_normal((B, T, K, D)) for _ in range(2))
    seg = np.array([[1] * 20 + [2] * 30 + [0] * 14, [1] * 64])
    idx = np.arange(T)
    mask = (idx[None, None, :] <= idx[None, :, None]) & (seg[:, :, None] == seg[:, None, :])
    attn = ((lambda q, k, v: llama.causal_blocked_attention(q, k, v, jnp.asarray(mask), block)) if block < T
            else (lambda q, k, v: llama.dot_product_attention(q, k, v, jnp.asarray(mask))))
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    out = jax.jit(attn)(*f32)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(attn(*a) * d_out.astype(np.float32)), argnums=(0, 1, 2)))(*f32)
    ref_out, ref_grads = _attention_reference(q, k, v, mask, d_out)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=0, atol=2e-6)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), r, rtol=0, atol=1e-5, err_msg=f"d{name}")
    # bf16 keeps autodiff of the same forward: same function to bf16 rounding
    g16 = jax.grad(lambda *a: jnp.sum(attn(*a).astype(jnp.float32) * d_out), argnums=(0, 1, 2))(
        *[x.astype(jnp.bfloat16) for x in f32])
    for name, g, r in zip("qkv", g16, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=0, atol=0.15 * np.abs(r).max(),
                                   err_msg=f"bf16 d{name}")


def test_attention_benchmark_runs_and_both_sides_agree(tmp_path):
    """benchmarks/attention.py on the tiny config (one block): writes its JSON/table, and the autodiff and
    hand-written sides give the same gradients (the timing itself is not asserted)."""
    import json
    from benchmarks import attention
    out = tmp_path / "attention.json"
    attention.main(["--config=tiny", "--reps=1", f"--out={out}"])
    res = json.loads(out.read_text())
    assert set(res["median_ms"]) == {"autodiff", "custom"} and res["max_grad_diff"] < 1e-4
    assert (tmp_path / "attention.md").read_text().count("| custom |") == 1
