"""The alignment knob: a fixed affine distortion of the understanding features, y = x·A + b (seed §9).

Why: the paper's alignment experiment asks how much it matters that understanding and generation see the
image in the same space. Distorting only the understanding side by a controlled amount (strength s)
answers it; s = 0 is the unmodified model.

Construction (row vectors, as in the reference ``Affine`` module): A = Q·S with S = diag(u),
u_i ~ U(1−s, 1+s], and Q the orthonormal factor of the QR decomposition of a U[0, 1) matrix (the
reference's choice, which is *not* Haar-uniform; ``haar=True`` uses a Gaussian matrix instead). Because Q
is orthogonal, the singular values of A are exactly the u_i, i.e. in [1−s, 1+s]. Translation
t_i ~ U(−s, s] is optional (``translation``): the historical files used b = 0, the later notebook b = t.
At s = 0, A = I and b = 0 exactly (Q is not applied at all), so the knob is a no-op.

Everything is drawn from ``numpy.random.default_rng(seed)`` with the draws in a fixed order (Q's matrix,
then u, then t), so one seed gives the same rotation at every strength, like the reference (where all
strengths share one draw).

Where it is applied: **in the model**, on the understanding adapter's input (the VQ code vectors — the
8-d codebook rows, not the code ids — or the continuous features), as a constant regenerated from
(seed, strength) and never trained or checkpointed. Why there and not at pre-tokenisation: records store
VQ *ids*, so VQ inputs can only be distorted after the codebook lookup; and keeping the cached dataset
independent of s lets one pre-tokenised dataset serve every strength of the sweep.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def affine(dim: int, strength: float, seed: int = 42, translation: bool = False,
           haar: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(A [dim, dim], b [dim]) float32 for y = x·A + b."""
    s = float(strength)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"alignment strength {s} must be in [0, 1) (scales are drawn from [1-s, 1+s])")
    if dim < 1:
        raise ValueError(f"alignment dim must be >= 1, got {dim}")
    if s == 0.0:
        return np.eye(dim, dtype=np.float32), np.zeros((dim,), np.float32)
    rng = np.random.default_rng(int(seed))
    m = rng.standard_normal((dim, dim)) if haar else rng.random((dim, dim))
    q, r = np.linalg.qr(m)
    if haar:  # sign fix that makes QR of a Gaussian matrix Haar-distributed
        q = q * np.sign(np.diag(r))[None, :]
    u = 1.0 + s - 2.0 * s * rng.random(dim)  # U(1-s, 1+s]
    t = s - 2.0 * s * rng.random(dim)  # U(-s, s]
    a = q @ np.diag(u)
    b = t if translation else np.zeros(dim)
    return a.astype(np.float32), b.astype(np.float32)


def apply(x, a, b):
    """y = x·A + b over the last axis (works on numpy and jax arrays)."""
    return x @ a + b


def apply_config(x, strength: float, seed: int, translation: bool):
    """What ``UnifiedModel.embed_inputs`` calls on the understanding input; identity (no op) at s = 0."""
    if not strength:
        return x
    a, b = affine(int(x.shape[-1]), strength, seed, translation)
    return (jnp.dot(x.astype(jnp.float32), jnp.asarray(a)) + jnp.asarray(b)).astype(x.dtype)


def singular_values(a: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)
