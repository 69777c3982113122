"""Independent float64 NumPy references (written from the Llama / LoRA definitions, not from uvjax)."""
from __future__ import annotations

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def rope(x, pos, base):
    # x [T, H, D], pos [T]; rotate-half convention of HF Llama
    D = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, D, 2, dtype=np.float64) / D)
    ang = pos[:, None].astype(np.float64) * inv[None]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]
    rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * cos + rot * sin


def silu(x):
    return x / (1 + np.exp(-x))


def lora_kernel(p, lora, name, scale):
    w = p[name]["kernel"]
    if lora is not None and name in lora:
        w = w + scale * lora[name]["a"] @ lora[name]["b"]
    return w


def head_layer_norm(x, scale, bias, eps=1e-5):
    """Chameleon's q/k norm: LayerNorm over each head's D values, then that head's own scale and bias.
    x [T, H, D], scale/bias [H, D]."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def decoder_forward(x, seg, pos, layers, final_scale, *, heads, kv_heads, base, eps, lora_layers=None, scale=0.0,
                    placement="pre"):
    """x [T, E] (one row); layers: list of per-layer dicts with attn/mlp kernels (float64). A layer with
    ``attn/q_norm`` and ``attn/k_norm`` applies Chameleon's per-head norms before RoPE; ``placement``
    "swin" normalises each sublayer's output (x + norm(f(x))) instead of its input."""
    T, E = x.shape
    for li, p in enumerate(layers):
        lo = lora_layers[li] if lora_layers is not None else None
        h = x if placement == "swin" else rms_norm(x, p["attn_norm"]["scale"], eps)
        q = h @ lora_kernel(p["attn"], lo and lo["attn"], "q", scale)
        k = h @ lora_kernel(p["attn"], lo and lo["attn"], "k", scale)
        v = h @ lora_kernel(p["attn"], lo and lo["attn"], "v", scale)
        D = q.shape[-1] // heads
        q, k, v = q.reshape(T, heads, D), k.reshape(T, kv_heads, D), v.reshape(T, kv_heads, D)
        if "q_norm" in p["attn"]:
            q = head_layer_norm(q, p["attn"]["q_norm"]["scale"], p["attn"]["q_norm"]["bias"])
            k = head_layer_norm(k, p["attn"]["k_norm"]["scale"], p["attn"]["k_norm"]["bias"])
        q, k = rope(q, pos, base), rope(k, pos, base)
        rep = heads // kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        out = np.zeros((T, heads, D))
        for t in range(T):
            allowed = [s for s in range(t + 1) if seg[s] == seg[t]]
            for hh in range(heads):
                logits = np.array([q[t, hh] @ k[s, hh] for s in allowed]) / np.sqrt(D)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[t, hh] = sum(wi * v[s, hh] for wi, s in zip(w, allowed))
        a = out.reshape(T, heads * D) @ lora_kernel(p["attn"], lo and lo["attn"], "o", scale)
        x = x + (rms_norm(a, p["attn_norm"]["scale"], eps) if placement == "swin" else a)
        h = x if placement == "swin" else rms_norm(x, p["mlp_norm"]["scale"], eps)
        g = h @ lora_kernel(p["mlp"], lo and lo["mlp"], "gate", scale)
        u = h @ lora_kernel(p["mlp"], lo and lo["mlp"], "up", scale)
        m = (silu(g) * u) @ lora_kernel(p["mlp"], lo and lo["mlp"], "down", scale)
        x = x + (rms_norm(m, p["mlp_norm"]["scale"], eps) if placement == "swin" else m)
    return rms_norm(x, final_scale, eps)


def log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
