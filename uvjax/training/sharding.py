"""The mesh ``(data, fsdp, tensor)`` and the shardings of state and batches.

Parameter shardings come from the model's logical axis names through the config's single rule table
(``sharding.rules``); a mesh axis that does not divide a dimension is dropped for that array (that
dimension stays replicated) instead of failing. Batches are sharded over ``(data, fsdp)`` on the
batch dimension and assembled from each host's local rows with ``make_array_from_process_local_data``.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from uvjax.models.partitioning import MESH_AXES, fit_spec, logical_to_spec


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, int, int]:
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise ValueError(f"mesh.shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if sum(s == -1 for s in shape) > 1:
        raise ValueError(f"mesh.shape {shape}: at most one entry may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ValueError(f"mesh.shape {shape} does not divide the {n_devices} devices")
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh.shape {shape} uses {math.prod(shape)} devices but {n_devices} are available")
    return tuple(shape)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-TPU topologies with odd shapes: plain reshape
        arr = np.asarray(devices).reshape(shape)
    # Auto axis types: classic GSPMD propagation (see platform notes).
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def variable_shardings(boxed_abstract, mesh: Mesh, rules):
    """NamedSharding per leaf of an eval_shape'd (still logically boxed) variable tree."""
    logical = nn.get_partition_spec(boxed_abstract)
    abstract = nn.unbox(boxed_abstract)

    def one(spec, leaf):
        names = tuple(spec) if spec is not None else ()
        names = names + (None,) * (len(leaf.shape) - len(names))
        mesh_spec = fit_spec(logical_to_spec(names, rules), leaf.shape, mesh)
        return NamedSharding(mesh, mesh_spec)

    return jax.tree_util.tree_map(one, logical, abstract, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divisibility(global_batch: int, grad_accum: int, mesh: Mesh, process_count: int) -> int:
    """Validates batch vs mesh/hosts; returns the per-host batch."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % grad_accum:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by train.grad_accum={grad_accum}")
    micro = global_batch // grad_accum
    if micro % shards:
        raise ValueError(f"the microbatch ({global_batch}/{grad_accum}={micro}) must be divisible by "
                         f"data×fsdp={shards} of mesh {dict(mesh.shape)}")
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count


def global_batch_from_local(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}
