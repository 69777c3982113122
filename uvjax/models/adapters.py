"""Adapters between image representations and the decoder's hidden space.

The *understanding adapter* maps image inputs (VQ code vectors or SigLIP features) into the LM
embedding space; the *generation adapter* maps teacher-forced image outputs the same way; the
*generation head* maps hidden states to codebook logits (VQ) or a feature vector (continuous).
``linear`` and ``mlp2x_gelu`` are LLaVA's two projector types (exact-erf GELU).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ADAPTER_KINDS = ("linear", "mlp2x_gelu")


class Linear(nn.Module):
    """Dense with bias whose kernel/bias carry logical axis names."""

    features: int
    axes: tuple[str, str]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                       (x.shape[-1], self.features), self.param_dtype)
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                       (self.features,), self.param_dtype)
        return jnp.dot(x.astype(self.dtype), k.astype(self.dtype)) + b.astype(self.dtype)


class Adapter(nn.Module):
    kind: str
    features: int
    in_axis: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind {self.kind!r}; expected one of {ADAPTER_KINDS}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Linear(self.features, (self.in_axis, "embed"), name="fc1", **kw)(x)
        if self.kind == "mlp2x_gelu":
            x = nn.gelu(x, approximate=False)
            x = Linear(self.features, ("embed", "embed"), name="fc2", **kw)(x)
        return x
