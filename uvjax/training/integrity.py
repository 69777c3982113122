"""Digests that prove a checkpoint reads back as it was written.

tensorstore's OCDBT protects its b-tree nodes with CRC-32C, but orbax (0.12) writes the array chunks
themselves with no checksum: a flipped bit in a chunk decompresses to a wrong value and restores
silently (docs/RELIABILITY.md). So every saved array gets a digest computed on the device at save and
recomputed after restore.

The digest of an array is two 32-bit sums over its elements' bit patterns, each element weighted by its
flat (row-major) index::

    a = Σ bits[i] · (2i + 1)               mod 2³²
    b = Σ mix(bits[i] + i · 0x9E3779B9)     mod 2³²   (mix: xor-shift-multiply, murmur3's finaliser)

Integer addition mod 2³² is associative and commutative, so the result does not depend on how the array
is sharded or in which order XLA reduces it: the same value on one CPU, on a TPU pod, or after a restore
onto another mesh. ``a`` changes under any single-bit flip (the flip adds ±2ᵏ·odd, never 0 mod 2³²);
``b`` makes swapped or shifted elements and multi-bit damage visible too. The index is built from
broadcast iotas (no reshape), so a sharded array is never gathered. :func:`digest_numpy` is the same
definition written with Python integers, the reference the tests check the device version against.
"""
from __future__ import annotations

import hashlib
import json

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B9
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35


def _bits_u32(x):
    """The element bit patterns of ``x`` as uint32 (narrow types widened, 64-bit types folded)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    if size == 8:  # two words per element: fold them (low + high·odd) so either word's flip shows
        w = jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
        return w[..., 0] + w[..., 1] * jnp.uint32(_M1)
    raise TypeError(f"no digest for dtype {x.dtype}")


def _mix(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_M1)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(_M2)
    return h ^ (h >> 16)


def _digest_device(x):
    bits = _bits_u32(x)
    shape = bits.shape
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for ax in range(len(shape) - 1, -1, -1):
        idx = idx + lax.broadcasted_iota(jnp.uint32, shape, ax) * jnp.uint32(stride % 2**32)
        stride *= shape[ax]
    a = jnp.sum(bits * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum(_mix(bits + idx * jnp.uint32(_GOLDEN)), dtype=jnp.uint32)
    return jnp.stack([a, b])


def _leaf_name(x) -> str:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return f"key<{jax.random.key_impl(x)}>{list(x.shape)}"
    return f"{np.dtype(x.dtype).name}{list(x.shape)}"


_JITTED = None


def _digests_fn():
    """One jitted function for every call (jit caches a compilation per tree structure and shapes); a new
    lambda per call would recompile every time (1.2 s for the first run's state)."""
    global _JITTED
    if _JITTED is None:
        _JITTED = jax.jit(lambda xs: [_digest_device(x) for x in xs])
    return _JITTED


def tree_digests(tree) -> dict[str, str]:
    """``{path: "dtype[shape]:aaaaaaaabbbbbbbb"}`` for every array leaf of ``tree`` (one jitted call; on a
    multi-host mesh every process gets the same, replicated, values)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat = [(jax.tree_util.keystr(p), x) for p, x in flat if hasattr(x, "dtype") and hasattr(x, "shape")]
    if not flat:
        return {}
    sums = jax.device_get(_digests_fn()([x for _, x in flat]))
    return {name: f"{_leaf_name(x)}:{int(s[0]):08x}{int(s[1]):08x}" for (name, x), s in zip(flat, sums)}


def digest_numpy(x: np.ndarray) -> tuple[int, int]:
    """The reference: the same two sums with Python integers over a host array (any dtype uvjax saves)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        bits = x.astype(np.uint64).ravel()
    elif x.dtype.itemsize == 8:
        w = x.view(np.uint32).reshape(x.shape + (2,)).astype(np.uint64)
        bits = ((w[..., 0] + w[..., 1] * _M1) % 2**32).ravel()
    else:
        bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64).ravel()
    a = b = 0
    for i, v in enumerate(int(v) for v in bits):
        a = (a + v * (2 * i + 1)) % 2**32
        h = (v + i * _GOLDEN) % 2**32
        h ^= h >> 16
        h = (h * _M1) % 2**32
        h ^= h >> 13
        h = (h * _M2) % 2**32
        h ^= h >> 16
        b = (b + h) % 2**32
    return a, b


def json_digest(value) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no whitespace): the digest of the data
    iterator's state and of the checkpoint's metadata. ``bytes`` (grain's state) are parsed first."""
    if isinstance(value, (bytes, bytearray)):
        value = json.loads(value)
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def compare(expected: dict[str, str], found: dict[str, str], limit: int = 8) -> list[str]:
    """Human-readable differences between two digest maps (empty when they agree)."""
    out = []
    for k in sorted(set(expected) | set(found)):
        if expected.get(k) != found.get(k):
            out.append(f"{k}: saved {expected.get(k, '<absent>')}, read back {found.get(k, '<absent>')}")
            if len(out) >= limit:
                out.append("…")
                break
    return out
