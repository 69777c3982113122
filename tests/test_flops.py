"""training/flops.py against hand counts: a worked example with every matmul written out, an enumeration of
the matmuls (2·m·n·k each) under the module's convention (backward = activation gradients 1× + weight
gradients 1× for trainable weights only; attention causal-halved and 3×; logits only at targets), and
the forward / backward matmul FLOPs of the real decoder, counted from its jaxpr."""
import functools
import math

import jax
import jax.numpy as jnp
import pytest

from uvjax.models.llama import Decoder, DecoderConfig
from uvjax.training.flops import train_flops_per_step

SMALL = dict(batch=2, seq=8, hidden=16, layers=2, heads=4, kv_heads=2, head_dim=4, intermediate=32, vocab=50,
             num_codes=12, text_targets=5, image_targets=3)


def test_worked_example_by_hand():
    """B=2, T=8 (16 tokens), E=16, 2 layers, H=4, K=2, D=4, I=32, V=50, 12 codes, 5 text / 3 image targets
    per sequence, LoRA r=2 on q and v, base and LM head frozen. Per token and layer, forward:
      q 2·16·16 = 512, k 2·16·8 = 256, v 256, o 512, gate 2·16·32 = 1024, up 1024, down 1024 → 4608;
      LoRA q 2·2·(16+16) = 128, v 2·2·(16+8) = 96 → 224; attention 2·2·8·4·4 / 2 = 256.
    Layer: 16 tokens · (2·4608 + 3·224 + 3·256) = 16 · 10656 = 170496; decoder 2 layers: 340992.
    LM head 2 seqs · 5 · 2·16·50 · 2 = 32000; generation head 2 · 3 · 2·16·12 · 3 = 6912. Total 379904."""
    f = train_flops_per_step(**SMALL, lora_rank=2, lora_targets=("q", "v"))
    assert f["decoder"] == 340992
    assert f["lm_head"] == 32000
    assert f["generation_head"] == 6912
    assert f["total"] == 379904
    assert f["per_token"] == pytest.approx(379904 / 16)


def hand_count(*, batch, seq, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, num_codes,
               text_targets, image_targets, lora_rank=0, lora_targets=(), base_trainable=False,
               lm_head_trainable=False):
    """Every matmul of a step as (rows m, contraction k, cols n, trainable weight?), 2·m·k·n each; a matmul
    costs 1× forward + 1× activation gradient + 1× weight gradient if its weight trains."""
    N = batch * seq
    E, H, K, D, I = hidden, heads, kv_heads, head_dim, intermediate
    mats = []
    for _ in range(layers):
        base = {"q": (E, H * D), "k": (E, K * D), "v": (E, K * D), "o": (H * D, E),
                "gate": (E, I), "up": (E, I), "down": (I, E)}
        for name, (k, n) in base.items():
            mats.append((N, k, n, base_trainable))
            if lora_rank and name in lora_targets:
                mats.append((N, k, lora_rank, True))  # x·A
                mats.append((N, lora_rank, n, True))  # (x·A)·B
        for _b in range(batch):
            for _h in range(H):
                # scores Q·Kᵀ and probabilities·V: T×D×T each, half of the T×T pairs are causal
                mats.append((seq, D, seq / 2, True))
                mats.append((seq, seq / 2, D, True))
    mats.append((batch * text_targets, E, vocab, lm_head_trainable))
    mats.append((batch * image_targets, E, num_codes, True))
    return sum(2 * m * k * n * (3 if trains else 2) for m, k, n, trains in mats)


@pytest.mark.parametrize("over", [
    {}, {"lora_rank": 4}, {"lora_rank": 3, "lora_targets": ("q", "k", "down")}, {"base_trainable": True},
    {"lm_head_trainable": True, "base_trainable": True},
    dict(batch=3, seq=64, hidden=48, layers=3, heads=6, kv_heads=3, head_dim=8, intermediate=96, vocab=300,
         num_codes=64, text_targets=20.5, image_targets=16, lora_rank=8)])
def test_formula_matches_matmul_enumeration(over):
    cfg = {**SMALL, "lora_targets": ("q", "k", "v", "o", "gate", "up", "down"), **over}
    got = train_flops_per_step(**cfg)
    assert got["total"] == pytest.approx(hand_count(**cfg), rel=1e-12)
    assert got["total"] == pytest.approx(got["decoder"] + got["lm_head"] + got["generation_head"], rel=1e-12)


# ------------------------------------------------------------------------------- the decoder's jaxpr
def _dot_flops(jaxpr, batched: bool) -> float:
    """2·(output size)·(contraction size) of every dot_general, recursing into sub-jaxprs (scan bodies
    times their length); ``batched`` selects dots with batch dimensions (attention) or without
    (projections, which run on [tokens, features] views)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), (lb, _) = eqn.params["dimension_numbers"]
            if bool(lb) == batched:
                lhs = eqn.invars[0].aval.shape
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
            continue
        mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        if eqn.primitive.name in ("while", "cond"):
            raise AssertionError(f"{eqn.primitive.name}: trip count unknown to this counter")
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += mult * _dot_flops(inner, batched)
    return total


@functools.cache
def _decoder():
    """The SMALL decoder; only traced (jaxprs), so abstract parameters are enough."""
    cfg = DecoderConfig(vocab_size=50, hidden=16, layers=2, heads=4, kv_heads=2, head_dim=4, intermediate=32)
    B, T = SMALL["batch"], SMALL["seq"]
    x = jax.ShapeDtypeStruct((B, T, 16), jnp.float32)
    seg, pos = jnp.ones((B, T), jnp.int32), jnp.broadcast_to(jnp.arange(T), (B, T))
    dec = Decoder(cfg)
    variables = jax.eval_shape(dec.init, jax.random.PRNGKey(0), x, seg, pos)
    return dec, variables, x, seg, pos


def test_decoder_forward_matmuls_match_the_formula():
    """The forward the model really runs: projections 1× per token and layer, attention over the full T×T
    (the formula's useful count is half of it, causal)."""
    dec, v, x, seg, pos = _decoder()
    jx = jax.make_jaxpr(lambda v, x: dec.apply(v, x, seg, pos))(v, x).jaxpr
    f = train_flops_per_step(**SMALL)
    proj, attn_full = _dot_flops(jx, batched=False), _dot_flops(jx, batched=True)
    assert proj > 0 and attn_full > 0
    # base frozen: decoder = 2·projections + 3·attention, the attention causal-halved
    assert f["decoder"] == pytest.approx(2 * proj + 3 * attn_full / 2, rel=1e-12)


@pytest.mark.parametrize("base_trainable", [False, True])
def test_decoder_backward_projection_matmuls_are_2x_or_3x(base_trainable):
    """jax.grad through the decoder: a frozen projection costs its forward plus the activation gradient
    (2×), a trainable one also its weight gradient (3×) — the module's convention, read off the jaxpr
    that autodiff builds (attention's hand-written backward is excluded: it has batch dimensions)."""
    dec, v, x, seg, pos = _decoder()
    loss = lambda v, x: jnp.sum(dec.apply(v, x, seg, pos) ** 2)
    argnums = (0, 1) if base_trainable else 1
    jx = jax.make_jaxpr(jax.grad(loss, argnums=argnums))(v, x).jaxpr
    fwd = _dot_flops(jax.make_jaxpr(loss)(v, x).jaxpr, batched=False)
    f = train_flops_per_step(**SMALL, base_trainable=base_trainable)
    attn = f["decoder"] - (3 if base_trainable else 2) * fwd  # what the formula leaves for attention
    assert attn == pytest.approx(SMALL["layers"] * 16 * 3 * 2 * 2 * 8 * 4 * 4 / 2, rel=1e-12)
    assert _dot_flops(jx, batched=False) == pytest.approx((3 if base_trainable else 2) * fwd, rel=1e-12)
