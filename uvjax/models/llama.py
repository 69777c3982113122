"""A Llama-family decoder in Flax Linen: RMSNorm, RoPE, SwiGLU, GQA, scanned layers, KV cache.

The decoder takes input *embeddings* (the unified model decides per position whether they come from
the text embedding or an image adapter) plus ``segment_ids``/``positions`` from the sequence arrays,
and returns final-norm hidden states. Logits are computed by the caller only where needed.

Decoding uses a ``"cache"`` collection: per layer the keys/values ([batch·kv heads, slots, head dim]),
the segment id of every cached slot and a write index. A chunk of C tokens (C = prompt length at
prefill, 1 per decode step) is written at the index and attends to every earlier slot of its segment,
so cached logits equal the full forward.

Over ~400 lines on purpose: one decoder (attention variants, scanned layers, KV cache) that the
parity tests compare against HF/PyTorch as a whole.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from uvjax.models.lora import Dense, LoRAConfig
from uvjax.models.partitioning import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

ATTENTION_IMPLS = ("xla", "cudnn")
NORM_PLACEMENTS = ("pre", "swin")

REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots": "dots_saveable",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 32000
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 0  # 0: hidden // heads
    intermediate: int = 688
    rope_base: float = 10000.0
    rope_scaling: tuple = ()  # () | ("linear", factor) | ("llama3", factor, low, high, original_max_pos)
    norm_eps: float = 1e-5
    # Chameleon (arXiv 2405.09818): a LayerNorm with its own scale and bias per head on queries and keys,
    # before RoPE (``qk_norm``), and "swin" norm placement: each sublayer's *output* is normalised before
    # the residual add, x + norm(f(x)), instead of x + f(norm(x)) (Chameleon-30B; Chameleon-7B is "pre").
    qk_norm: bool = False
    qk_norm_eps: float = 1e-5
    norm_placement: str = "pre"  # pre | swin
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"  # xla: einsum + fp32 softmax (any backend) | cudnn: fused cuDNN kernel (GPU, bf16/fp16)
    # layers per iteration of the scanned stack (0: all, no loop). Same parameters (still stacked) and the
    # same function; unrolling a few small layers saves the loop's stacked activations (CPU: -8%/step)
    scan_unroll: int = 1
    lora: LoRAConfig = LoRAConfig()
    max_cache_len: int = 0  # set by the decoding code when a cache is initialised
    # set by the decoding code: q/k/v as one ``qkv`` kernel and gate/up as one ``gate_up`` kernel
    # (:func:`fuse_projections`, weights with LoRA merged in): a batch-1 step reads them in 2 matmuls, not 5
    fused_projections: bool = False

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def validate(self) -> "DecoderConfig":
        if self.heads % self.kv_heads:
            raise ValueError(f"model.heads={self.heads} must be a multiple of model.kv_heads={self.kv_heads}")
        if self.dim_head % 2:
            raise ValueError(f"head dim {self.dim_head} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r}; expected one of {ATTENTION_IMPLS}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ValueError("model.attention='cudnn' needs model.dtype bfloat16 or float16 (cuDNN's fused "
                             "attention has no fp32 kernel); use attention='xla' for fp32")
        if self.scan_unroll < 0:
            raise ValueError(f"model.scan_unroll={self.scan_unroll} must be >= 0 (0: unroll every layer)")
        if self.fused_projections and self.lora.rank:
            raise ValueError("fused projections need the LoRA factors merged into the kernels first (merge_lora)")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"model.norm_placement={self.norm_placement!r}; expected one of {NORM_PLACEMENTS}")
        if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
            raise ValueError(f"model.dtype/param_dtype must be in {sorted(DTYPES)}")
        return self


def rope_frequencies(cfg: DecoderConfig) -> jnp.ndarray:
    """Inverse frequencies [D/2], with optional linear or Llama-3 scaling."""
    d = cfg.dim_head
    inv = 1.0 / (cfg.rope_base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if not cfg.rope_scaling:
        return inv
    kind = cfg.rope_scaling[0]
    if kind == "linear":
        return inv / float(cfg.rope_scaling[1])
    if kind == "llama3":
        factor, low, high, orig = (float(v) for v in cfg.rope_scaling[1:5])
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = orig / low, orig / high
        scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"unknown rope_scaling {cfg.rope_scaling!r}")


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotate-half RoPE (the HF Llama layout): x [B, T, H, D], positions [B, T]."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rot * sin).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class HeadLayerNorm(nn.Module):
    """Chameleon's query/key norm: LayerNorm statistics over each head's D values, then a scale and a bias
    of their own per head ([heads, D]: Chameleon's model-parallel shards kept one norm per head)."""

    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, H, D]
        H, D = x.shape[-2:]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None, None)), (H, D),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, None)), (H, D),
                          self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class Attention(nn.Module):
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, segment_ids, positions, deterministic=True, decode=False):
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, D = cfg.heads, cfg.kv_heads, cfg.dim_head
        dense = functools.partial(Dense, lora=cfg.lora, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        if cfg.fused_projections:
            qkv = dense((H + 2 * K) * D, ("embed", "heads"), "qkv", name="qkv")(x, deterministic)
            q, k, v = jnp.split(qkv, [H * D, (H + K) * D], axis=-1)
        else:
            q = dense(H * D, ("embed", "heads"), "q", name="q")(x, deterministic)
            k = dense(K * D, ("embed", "kv_heads"), "k", name="k")(x, deterministic)
            v = dense(K * D, ("embed", "kv_heads"), "v", name="v")(x, deterministic)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, K, D), v.reshape(B, T, K, D)
        if cfg.qk_norm:
            q = HeadLayerNorm(cfg.qk_norm_eps, cfg.weight_dtype, name="q_norm")(q)
            k = HeadLayerNorm(cfg.qk_norm_eps, cfg.weight_dtype, name="k_norm")(k)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
        inv = rope_frequencies(cfg)
        q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)

        q_index = jnp.arange(T)
        kv_seg, kv_index = segment_ids, jnp.arange(T)
        if decode:
            # Keys and values are cached [B·K, L, D] (batch and kv heads merged), the layout the decode
            # step's attention matmuls read as stored, so a step writes only its own new keys/values.
            # Stored [B, K, L, D], the matmuls merged (b, k) in a bitcast, XLA fused the cache update once
            # into the loop's new state and once more into that bitcast, and copied every layer's cache
            # two to four times per step to give each its own buffer (~20% of a batch-1 step on config S).
            L = cfg.max_cache_len
            ck = self.variable("cache", "key", jnp.zeros, (B * K, L, D), k.dtype)
            cv = self.variable("cache", "value", jnp.zeros, (B * K, L, D), v.dtype)
            cs = self.variable("cache", "segment", jnp.zeros, (B, L), jnp.int32)
            ci = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
            idx = ci.value
            ck.value = jax.lax.dynamic_update_slice(ck.value, k.transpose(0, 2, 1, 3).reshape(B * K, T, D), (0, idx, 0))
            cv.value = jax.lax.dynamic_update_slice(cv.value, v.transpose(0, 2, 1, 3).reshape(B * K, T, D), (0, idx, 0))
            cs.value = jax.lax.dynamic_update_slice(cs.value, segment_ids.astype(jnp.int32), (0, idx))
            ci.value = idx + T
            kv_seg = cs.value
            q_index, kv_index = idx + jnp.arange(T), jnp.arange(L)

        # mask[b, t, s]: causal within the same (non-padding on the key side) segment
        same_segment = segment_ids[:, :, None] == kv_seg[:, None, :]
        mask = (kv_index[None, None, :] <= q_index[None, :, None]) & same_segment
        if decode:
            out = _token_major(_attend_cache(_q_head_major(q, K), ck.value, cv.value, mask))
        elif cfg.attention == "cudnn" and jax.default_backend() == "gpu":
            # cuDNN's fused kernel applies the causal part itself and never stores T×T probabilities;
            # packed segments enter as a mask (cuDNN turns it into an additive bias). On other backends
            # the XLA path below computes the same function, so a GPU-trained config evaluates on a CPU.
            out = jax.nn.dot_product_attention(q, k, v, mask=same_segment[:, None], is_causal=True,
                                               implementation="cudnn")
        elif T < 2 * ATTN_BLOCK or T % ATTN_BLOCK:
            out = dot_product_attention(q, k, v, mask)
        else:
            out = causal_blocked_attention(q, k, v, mask, ATTN_BLOCK)
        out = constrain(out.reshape(B, T, H * D), ("act_batch", "act_length", "act_heads"))
        return dense(cfg.hidden, ("heads", "embed"), "o", name="o")(out, deterministic)


# Query block of the causal attention of a full sequence (training / scoring, not the cached decode).
ATTN_BLOCK = 128


def causal_blocked_attention(q, k, v, mask, block: int):
    """Self-attention of a whole sequence (q, k, v from the same T positions, ``mask`` causal) in query
    blocks: block i only reads keys [0, (i+1)·block), since every later key is causally masked for it.
    Same result as :func:`dot_product_attention` (masked keys get exactly zero probability); skips the
    masked upper triangle, so the T×T logits/probabilities (and the activations the backward keeps)
    shrink by (n-1)/2n for n blocks — on CPU these memory-bound T×T passes dominate the step.
    q, k and v go head-major once, before the blocks are sliced (slicing first made XLA transpose every
    block's keys separately)."""
    return _token_major(_self_attention(*_head_major(q, k, v), mask, block))


def dot_product_attention(q, k, v, mask):
    """GQA attention with fp32 softmax over a whole sequence (one query block). q [B,T,H,D], k/v [B,T,K,D],
    mask [B,T,T] bool with every query seeing at least itself (causal within its segment)."""
    return _token_major(_self_attention(*_head_major(q, k, v), mask, q.shape[1]))


def _self_attention(qh, kh, vh, mask, block: int):
    """fp32 models take the hand-written backward (:func:`_blocked_attention`); other dtypes (bf16 on
    accelerators) keep autodiff of the same forward."""
    if qh.dtype == jnp.float32:
        return _blocked_attention(qh, kh, vh, mask, block)
    return _blocked_forward(qh, kh, vh, mask, block)[0]


def _block_logits(qh, kh, mask, start: int, end: int):
    """Masked logits of queries [start, end) against keys [0, end)."""
    return _masked_logits(qh[:, :, :, start:end], kh[:, :, :end], mask[:, start:end, :end])


def _blocked_forward(qh, kh, vh, mask, block: int):
    """Query block i against keys [0, (i+1)·block): output [B,K,G,T,D] and the row logsumexps [B,K,G,T,1]."""
    outs, lses = [], []
    for i in range(qh.shape[3] // block):
        start, end = i * block, (i + 1) * block
        out, lse = _softmax_values(_block_logits(qh, kh, mask, start, end), vh[:, :, :end])
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_attention(qh, kh, vh, mask, block: int):
    """:func:`_blocked_forward` with a flash-attention-style backward:

    - it keeps O(T) residuals (the output and each row's logsumexp) instead of every block's T×S
      probabilities, and recomputes a block's probabilities from its logits (one extra Q·Kᵀ GEMM per
      block): the probabilities were 75 MB per layer on the M benchmark, 340 MB per layer for SmolLM2 at
      batch 16 × 1,024;
    - it orients every matmul so the large [t, s] operands (probabilities and their gradients) are read
      as stored: dK and dV are formed transposed, [D, S] = [D, t]·[t, S], which transposes only the
      small [t, D] operands. Autodiff's dK = dSᵀ·Q transposed each block's [t, S] gradient first
      (XLA:CPU's GEMMs read the contracted dimension of the left operand as the minor one).
    On the M benchmark's shapes, forward + backward of one layer's attention: 165–171 → 148–150 ms
    (``benchmarks/attention.py``).
    Needs every query row to see at least one key (true for causal self-attention: the diagonal): masked
    keys then have probability exactly 0, so their gradient is 0."""
    return _blocked_forward(qh, kh, vh, mask, block)[0]


def _blocked_attention_fwd(qh, kh, vh, mask, block):
    out, lse = _blocked_forward(qh, kh, vh, mask, block)
    return out, (qh, kh, vh, mask, out, lse)


def _blocked_attention_bwd(block, res, d_out):
    qh, kh, vh, mask, out, lse = res
    B, K, G, T, D = qh.shape
    # softmax backward: dlogits = p ⊙ (dp − rowsum(d_out ⊙ out))
    row = (d_out * out).sum(axis=-1, keepdims=True)
    dq, dkt, dvt = [], jnp.zeros((B, K, D, T), kh.dtype), jnp.zeros((B, K, D, T), vh.dtype)
    for i in range(T // block):
        start, end = i * block, (i + 1) * block
        p = jnp.exp(_block_logits(qh, kh, mask, start, end) - lse[:, :, :, start:end])
        qi, di = qh[:, :, :, start:end], d_out[:, :, :, start:end]
        dvt = dvt.at[:, :, :, :end].add(jnp.einsum("bkgtd,bkgts->bkds", di, p))
        dp = jnp.einsum("bkgtd,bksd->bkgts", di, vh[:, :, :end])
        ds = p * (dp - row[:, :, :, start:end])
        dq.append(jnp.einsum("bkgts,bksd->bkgtd", ds, kh[:, :, :end]))
        dkt = dkt.at[:, :, :, :end].add(jnp.einsum("bkgtd,bkgts->bkds", qi, ds))
    return jnp.concatenate(dq, axis=3), dkt.transpose(0, 1, 3, 2), dvt.transpose(0, 1, 3, 2), None


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def _head_major(q, k, v):
    """[B,T,H,D] → q [B,K,G,T,D] (pre-scaled by 1/sqrt(D): T·H·D values instead of T×S logits),
    k/v [B,K,S,D]: the layouts the batched matmuls read without further copies."""
    return _q_head_major(q, k.shape[2]), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _q_head_major(q, K: int):
    B, T, H, D = q.shape
    return (q * jnp.asarray(1.0 / math.sqrt(D), q.dtype)).reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)


def _token_major(o):
    B, K, G, T, D = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)


def _attend_cache(qh, kc, vc, mask):
    """Softmax attention of decode-step queries qh [B,K,G,T,D] (pre-scaled) against the cache: keys and
    values [B·K, L, D] (see ``Attention``), mask [B,T,L]; returns [B,K,G,T,D]. The softmax is that of
    :func:`_softmax_values` (normalised after the value product; a row with no visible key averages all
    values); the matmuls run on the merged (b, k) axis so that they read the cache buffers as stored."""
    B, K, G, T, D = qh.shape
    logits = jnp.einsum("ntd,nsd->nts", qh.reshape(B * K, G * T, D), kc, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None], logits.reshape(B, K, G, T, -1), jnp.finfo(jnp.float32).min)
    p = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    total = p.sum(axis=-1, keepdims=True)
    out = jnp.einsum("nts,nsd->ntd", p.reshape(B * K, G * T, -1).astype(vc.dtype), vc,
                     preferred_element_type=jnp.float32)
    return (out.reshape(B, K, G, T, D) / total).astype(vc.dtype)


def _masked_logits(qh, kh, mask):
    """fp32 logits [B,K,G,T,S] of head-major q (pre-scaled) and k, masked keys at the most negative float."""
    logits = jnp.einsum("bkgtd,bksd->bkgts", qh, kh, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)


def _softmax_values(logits, vh):
    """softmax(logits)·V and the row logsumexps. The softmax is normalised *after* the probability-value
    product (one division over T·D values instead of T×S probabilities; the max-shift is a constant of the
    softmax, so it carries no gradient). A row with no visible key (padding in the decode cache) averages
    all values, as a softmax over equal logits does."""
    shift = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    p = jnp.exp(logits - shift)
    total = p.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
    return (out / total).astype(vh.dtype), shift + jnp.log(total)


class MLP(nn.Module):
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, deterministic=True):
        cfg = self.cfg
        dense = functools.partial(Dense, lora=cfg.lora, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        if cfg.fused_projections:
            g, u = jnp.split(dense(2 * cfg.intermediate, ("embed", "mlp"), "gate_up", name="gate_up")(x, deterministic),
                             2, axis=-1)
        else:
            g = dense(cfg.intermediate, ("embed", "mlp"), "gate", name="gate")(x, deterministic)
            u = dense(cfg.intermediate, ("embed", "mlp"), "up", name="up")(x, deterministic)
        h = constrain(nn.silu(g) * u, ("act_batch", "act_length", "act_mlp"))
        return dense(cfg.hidden, ("mlp", "embed"), "down", name="down")(h, deterministic)


FUSED_PROJECTIONS = {"attn": ("qkv", ("q", "k", "v")), "mlp": ("gate_up", ("gate", "up"))}


def fuse_projections(params: dict) -> dict:
    """Params for ``fused_projections=True``: every ``attn/{q,k,v}/kernel`` (and ``mlp/{gate,up}``) in the
    tree, stacked layers too, concatenated along the output axis into ``attn/qkv/kernel``
    (``mlp/gate_up/kernel``), in the order the fused layers split them. Without LoRA factors only."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, v in flat.items():
        group, name = (path[-3], path[-2]) if len(path) >= 3 else (None, None)
        if group in FUSED_PROJECTIONS and name in FUSED_PROJECTIONS[group][1]:
            fused, parts = FUSED_PROJECTIONS[group]
            if name == parts[0]:
                if path[-1] != "kernel":
                    raise ValueError(f"cannot fuse {'/'.join(path)}: only kernels are fused")
                out[path[:-3] + (group, fused, "kernel")] = jnp.concatenate(
                    [flat[path[:-2] + (p, "kernel")] for p in parts], axis=-1)
        else:
            out[path] = v
    return traverse_util.unflatten_dict(out)


class Block(nn.Module):
    """One transformer layer (pre-norm, or Chameleon's swin placement); signature fits ``nn.scan``
    (carry, per-layer nothing)."""

    cfg: DecoderConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, segment_ids, positions):
        cfg = self.cfg
        norm = functools.partial(RMSNorm, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        attn = lambda y: Attention(cfg, name="attn")(y, segment_ids, positions, self.deterministic, self.decode)
        mlp = lambda y: MLP(cfg, name="mlp")(y, self.deterministic)
        if cfg.norm_placement == "swin":  # Chameleon-30B: normalise each sublayer's output
            x = x + norm(name="attn_norm")(attn(x))
            x = x + norm(name="mlp_norm")(mlp(x))
        else:
            x = x + attn(norm(name="attn_norm")(x))
            x = x + mlp(norm(name="mlp_norm")(x))
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        return x, None


class Decoder(nn.Module):
    """Stack of scanned blocks + final norm (no embedding: callers pass input embeddings)."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, segment_ids, positions, deterministic=True, decode=False):
        cfg = self.cfg
        block = Block
        policy = REMAT_POLICIES[cfg.remat]
        if policy is not None:
            block = nn.remat(Block, prevent_cse=False, policy=getattr(jax.checkpoint_policies, policy),
                             static_argnums=())
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.layers,
            unroll=min(cfg.scan_unroll or cfg.layers, cfg.layers),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x = x.astype(cfg.compute_dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        x, _ = stack(cfg, deterministic, decode, name="layers")(x, segment_ids, positions)
        return RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="final_norm")(x)
