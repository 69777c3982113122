"""Logical axis names → mesh axes, for parameters and activations.

The model names every parameter dimension and key activation with a *logical* name ("embed", "mlp",
"act_batch", ...). One rule table (in the config) maps logical names to mesh axes ``(data, fsdp,
tensor)``. Activation constraints are no-ops unless a mesh and rules are active, so the same model runs
unsharded in unit tests and sharded in the trainer.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("uvjax_sharding", default=None)

MESH_AXES = ("data", "fsdp", "tensor")

# The default rule table: FSDP over the embed dimension, tensor parallelism over heads/mlp/vocab.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("codes", "tensor"),
    ("code_dim", None),
    ("features", None),
    ("layers", None),
    # LoRA B [rank, out]: out is often a tensor-parallel dim (heads, mlp), so shard the rank over fsdp,
    # or B is replicated on every FSDP device (2 GB per chip for Vicuna-7B r=128). In A [in, rank] the
    # in dim already uses fsdp, so the rank stays whole there.
    ("lora_rank", "fsdp"),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def rules_from_config(rules) -> tuple:
    """Config rule tables are lists of [name, axis-or-list]; normalise to tuples."""
    out = []
    for name, axes in rules:
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes) if len(axes) else None
        out.append((str(name), axes))
    return tuple(out)


@contextlib.contextmanager
def activation_sharding(mesh, rules):
    """Within this context, ``constrain`` applies sharding constraints on ``mesh`` via ``rules``."""
    token = _ACTIVE.set((mesh, rules_from_config(rules)))
    try:
        with nn.logical_axis_rules(rules_from_config(rules)):
            yield
    finally:
        _ACTIVE.reset(token)


def logical_to_spec(names: Sequence[str | None], rules) -> P:
    table = dict(rules_from_config(rules))
    used: set[str] = set()
    out = []
    for n in names:
        axes = table.get(n) if n is not None else None
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)  # a mesh axis may be used once per array
        used.update(axes_t)
        out.append(axes_t if len(axes_t) > 1 else (axes_t[0] if axes_t else None))
    return P(*out)


def fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (those dims stay replicated)."""
    out = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        kept, size = [], 1
        for a in axes_t:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; identity when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = fit_spec(logical_to_spec(names, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
