"""LoRA: low-rank deltas in their own ``"lora"`` variable collection.

The frozen base kernel lives in ``"params"``; its low-rank factors A [in, r] and B [r, out] live in
``"lora"`` so the trainer can differentiate and optimise them as a separate pytree. B starts at zero,
so a fresh LoRA model computes exactly its base model. ``merge_lora`` folds ``scale·A@B`` into the
kernels for export (scale = alpha / rank, as in PEFT).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

# Names of the projections LoRA can target (the seven Llama linear layers).
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def applies_to(self, proj: str) -> bool:
        return self.rank > 0 and proj in self.targets


def _lora_a_init(key, shape, dtype):
    # PEFT's default (kaiming_uniform with a=sqrt(5)) is U(±1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Module):
    """A bias-free projection ``x @ W`` with an optional LoRA delta; W named by logical axes."""

    features: int
    axes: tuple[str, str]
    proj: str = ""
    lora: LoRAConfig = LoRAConfig()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        in_features = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (in_features, self.features), self.param_dtype)
        # The matmuls run on a [tokens, features] view: with 3-D activations XLA:CPU lays the weight
        # gradients' operands out token-minor and writes them through slow transposing loop fusions
        # (a quarter of a LoRA training step on CPU, docs/PERFORMANCE.md); a 2-D dot needs no copy.
        lead = x.shape[:-1]
        x = x.reshape(-1, in_features)
        if not self.lora.applies_to(self.proj):
            return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)).reshape(*lead, self.features)
        r = self.lora.rank
        a = self.variable("lora", "a", nn.with_logical_partitioning(
            lambda: _lora_a_init(self.make_rng("params"), (in_features, r), self.param_dtype),
            (self.axes[0], "lora_rank"))).value
        b = self.variable("lora", "b", nn.with_logical_partitioning(
            lambda: jnp.zeros((r, self.features), self.param_dtype),
            ("lora_rank", self.axes[1]))).value
        xl = x
        if self.lora.dropout > 0 and not deterministic:
            xl = nn.Dropout(self.lora.dropout)(x, deterministic=False)
        # scale·(x·A)·B with the scale on B's r×out values: the backward then needs no scaled copy
        # of the whole output gradient (an elementwise pass over tokens × out per projection)
        b_scaled = b.astype(self.dtype) * jnp.asarray(self.lora.scale, self.dtype)
        if xl is x and self.dtype == jnp.float32 and kernel.dtype == jnp.float32:
            y = lora_dense(x.astype(self.dtype), kernel, a.astype(self.dtype), b_scaled)
        else:  # bf16 (a merged kernel would round the small delta away) or LoRA dropout on
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
            y = y + jnp.dot(jnp.dot(xl.astype(self.dtype), a.astype(self.dtype)), b_scaled)
        return y.reshape(*lead, self.features)


@jax.custom_vjp
def lora_dense(x, w, a, bs):
    """``x·W + (x·A)·Bs`` for fp32 training, computed as ``x·(W + A·Bs)``: one GEMM in the forward and one
    for the input gradient, instead of the base GEMM plus two thin ones (K = r, then N = r) and an add
    in each direction; the factors' gradients are the usual ``dBs = (x·A)ᵀ·dy`` and ``dA = xᵀ·(dy·Bsᵀ)``.
    ``W + A·Bs`` costs in·r·out multiply-adds, nothing against tokens·in·out. CPU A/B in one process:
    S step −8%, M −6%, and 86 / 353 MB less XLA temp memory (the thin products are not kept). A frozen
    ``W``'s gradient ``xᵀ·dy`` is dead code that XLA drops."""
    return jnp.dot(x, w + jnp.dot(a, bs))


def _lora_dense_fwd(x, w, a, bs):
    return lora_dense(x, w, a, bs), (x, w, a, bs)


def _lora_dense_bwd(res, dy):
    x, w, a, bs = res
    du = jnp.dot(dy, bs.T)
    return (jnp.dot(dy, (w + jnp.dot(a, bs)).T), jnp.dot(x.T, dy), jnp.dot(x.T, du),
            jnp.dot(jnp.dot(x, a).T, dy))


lora_dense.defvjp(_lora_dense_fwd, _lora_dense_bwd)


def merge_lora(params: dict, lora: dict, cfg: LoRAConfig) -> dict:
    """Returns base params with every ``kernel += scale · A @ B`` folded in (stacked layers too)."""
    flat_p = traverse_util.flatten_dict(params)
    flat_l = traverse_util.flatten_dict(lora)
    out = dict(flat_p)
    groups: dict[tuple, dict[str, Any]] = {}
    for path, v in flat_l.items():
        groups.setdefault(path[:-1], {})[path[-1]] = v
    for prefix, ab in groups.items():
        if set(ab) != {"a", "b"}:
            raise ValueError(f"LoRA entry {'/'.join(prefix)} must hold exactly a and b, got {sorted(ab)}")
        kpath = prefix + ("kernel",)
        if kpath not in out:
            raise ValueError(f"LoRA factors at {'/'.join(prefix)} have no base kernel")
        a, b = ab["a"], ab["b"]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        k = out[kpath]
        out[kpath] = (k.astype(jnp.float32) + cfg.scale * delta).astype(k.dtype)
    return traverse_util.unflatten_dict(out)


def lora_param_count(lora: dict) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(lora)))


def lora_targets_from(names: Sequence[str]) -> tuple[str, ...]:
    bad = [n for n in names if n not in PROJECTIONS]
    if bad:
        raise ValueError(f"unknown LoRA targets {bad}; expected a subset of {PROJECTIONS}")
    return tuple(names)
