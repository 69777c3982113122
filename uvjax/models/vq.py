"""VQ image tokenizer: LlamaGen VQ-16 architecture (and the Chameleon/Anole VQGAN variant) in Flax Linen.

Layout is NHWC; images are float in [-1, 1]. Module names mirror LlamaGen's state-dict layout
(``encoder/conv_blocks_{i}/res_{j}/conv1/kernel`` <-> ``encoder.conv_blocks.{i}.res.{j}.conv1.weight``) so
the converter in ``uvjax.weights.llamagen_vq`` is a table, not a puzzle. One module with flags covers both
published tokenizers (reference §B.3, §B.7):

* LlamaGen VQ-16: attention after every res block of the lowest level, l2-normalised codes (cosine lookup),
  code dim 8, 16384 codes.
* Chameleon/Anole VQGAN: no attention inside levels (``attn_last_level=False``), raw Euclidean lookup
  (``l2_norm=False``), code dim 256, 8192 codes, taming's "legacy" beta placement in the VQ loss.

Codes come out in raster order (``index = h * W + w``), one row of ``h*w`` ids per image.

Over ~400 lines on purpose: one VQGAN (encoder, quantizer, decoder, both checkpoint families) whose
parameter names the converters and parity tests pin.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Architecture of the VQ tokenizer. Defaults are LlamaGen VQ-16 (``vq_ds16_c2i``)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    enc_res_blocks: int = 2
    dec_res_blocks: int = 3
    z_channels: int = 256
    codebook_size: int = 16384
    code_dim: int = 8
    # LlamaGen: attention after each res block of the lowest-resolution level (encoder and decoder).
    attn_last_level: bool = True
    # Mid block Res-Attn-Res; ``False`` gives Res-Res (small CPU presets).
    mid_attn: bool = True
    l2_norm: bool = True
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.0
    beta: float = 0.25
    # taming "legacy" placement (Chameleon): beta multiplies the codebook term instead of the commitment.
    legacy_beta: bool = False
    # Matmul/conv precision: the reference warns that low-precision encoders flip argmin codes.
    precision: str = "highest"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Code grid (h, w) for an image size; raises if it does not divide."""
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for s in hw:
            if s % self.downsample:
                raise ValueError(f"image size {hw} is not a multiple of the downsample factor {self.downsample}")
        return hw[0] // self.downsample, hw[1] // self.downsample

    def validate(self) -> "VQConfig":
        if self.dropout != 0.0:
            raise ValueError("dropout must be 0 (LlamaGen VQ-16 and Chameleon both use 0; not implemented otherwise)")
        if not self.ch_mult or self.enc_res_blocks < 1 or self.dec_res_blocks < 1:
            raise ValueError(f"need >= 1 level and >= 1 res block per level, got {self}")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError(f"bad codebook {self.codebook_size}x{self.code_dim}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown VQConfig keys: {sorted(unknown)}")
        d = dict(d)
        if "ch_mult" in d:
            d["ch_mult"] = tuple(int(x) for x in d["ch_mult"])
        return cls(**d).validate()


def llamagen_vq16() -> VQConfig:
    """LlamaGen ``vq_ds16_c2i`` / ``vq_ds16_t2i`` (reference §B.2)."""
    return VQConfig()


def chameleon_vqgan() -> VQConfig:
    """Chameleon / Anole VQGAN (reference §B.7): no level attention, Euclidean 8192x256 codebook."""
    return VQConfig(
        ch=128, ch_mult=(1, 1, 2, 2, 4), enc_res_blocks=2, dec_res_blocks=3, z_channels=256,
        codebook_size=8192, code_dim=256, attn_last_level=False, mid_attn=True, l2_norm=False,
        legacy_beta=True,
    )


def _precision(cfg: VQConfig):
    return None if cfg.precision in (None, "", "default") else jax.lax.Precision[cfg.precision.upper()]


def _groups(cfg: VQConfig, channels: int) -> int:
    """32 groups as in the reference; gcd with the width when a small preset has fewer channels.

    Narrow presets should lower ``norm_groups`` itself: with one channel per group GroupNorm is
    instance norm, which erases a flat region's colour (its per-channel mean) -- measured on 64 px
    Smart Watch crops at width 16 (downsample 8): held-out PSNR 16.0 dB after 2000 steps with 32 groups
    (training PSNR flat at 12-14 dB throughout), 18.6 dB after 300 steps with 1 group."""
    return math.gcd(cfg.norm_groups, channels)


class GroupNorm(nn.Module):
    """GroupNorm over NHWC (statistics per image and group over H, W and the group's channels), fp32.

    Same parameters as ``flax.linen.GroupNorm`` (``scale``, ``bias``: [C]), so converted checkpoints load
    unchanged, but the statistics are computed so that XLA:CPU cannot lose them. Flax reduces the 5-D
    view [B, H, W, G, C/G] over (H, W, C/G) in one reduction; for B > 1 XLA:CPU lowers that to a plain
    sequential fp32 accumulation (measured here, jax 0.10: at [4, 256, 256, 32, 4] the group mean is off by
    6e-4 of its value on a near-constant image, 2e-3 of the group's standard deviation, against 1e-7 with
    B = 1), and on flat-background images the mean is large against the spread, so normalised activations
    were off by up to 3e-3 and the VQ-16 encoder's latents by 6e-3 at batch 4 (4e-5 one image at a time).
    Here each statistic is a per-channel reduction over (H, W) of the 4-D array -- the layout XLA reduces
    accurately (relative error < 1e-6 at every batch, size and width tried) -- summed over the group's
    channels afterwards; and the variance pass is centred on that first mean *and* corrects it
    (mean = m0 + E[x - m0], var = E[(x - m0)^2] - E[x - m0]^2, the shifted-data formula: the correction is
    O(error of m0), so its square is negligible), which keeps the mean's error proportional to the spread,
    not to the mean, whatever order a backend sums in. Two passes over the activation, like flax's
    ``use_fast_variance=False``.
    """

    num_groups: int
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        g = self.num_groups
        if c % g:
            raise ValueError(f"{g} groups do not divide {c} channels")
        gs = c // g
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x = x.astype(jnp.float32)
        axes = tuple(range(1, x.ndim - 1))
        n = math.prod(x.shape[1:-1]) * gs
        b = x.shape[0]
        bshape = (b,) + (1,) * len(axes) + (c,)

        def group_mean(per_channel_sum):  # [B, C] sums over (H, W) -> [B, 1.., C] mean of each channel's group
            s = per_channel_sum.reshape(b, g, gs).sum(-1) / n
            return jnp.repeat(s, gs, axis=-1).reshape(bshape)

        m0 = group_mean(jnp.sum(x, axes))
        d = x - m0
        # Zero in exact arithmetic, and so is its derivative: no gradient path (saves backward work).
        shift = jax.lax.stop_gradient(group_mean(jnp.sum(d, axes)))
        var = jnp.maximum(group_mean(jnp.sum(d * d, axes)) - shift * shift, 0.0)
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        return (d - shift) * mul + bias


def _norm(cfg: VQConfig, channels: int, name: str) -> GroupNorm:
    return GroupNorm(num_groups=_groups(cfg, channels), epsilon=cfg.norm_eps, name=name)


def _conv(cfg: VQConfig, features: int, k: int, name: str, stride: int = 1, padding: Any = None) -> nn.Conv:
    if padding is None:
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=padding, precision=_precision(cfg), name=name)


class ResnetBlock(nn.Module):
    cfg: VQConfig
    out_ch: int

    @nn.compact
    def __call__(self, x):
        in_ch = x.shape[-1]
        h = nn.swish(_norm(self.cfg, in_ch, "norm1")(x))
        h = _conv(self.cfg, self.out_ch, 3, "conv1")(h)
        h = nn.swish(_norm(self.cfg, self.out_ch, "norm2")(h))
        h = _conv(self.cfg, self.out_ch, 3, "conv2")(h)
        if in_ch != self.out_ch:
            x = _conv(self.cfg, self.out_ch, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions (global, so any resolution works)."""

    cfg: VQConfig

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _norm(self.cfg, c, "norm")(x)
        q = _conv(self.cfg, c, 1, "q")(h).reshape(b, hh * ww, c)
        k = _conv(self.cfg, c, 1, "k")(h).reshape(b, hh * ww, c)
        v = _conv(self.cfg, c, 1, "v")(h).reshape(b, hh * ww, c)
        prec = _precision(self.cfg)
        w = jnp.einsum("bqc,bkc->bqk", q, k, precision=prec) * (c ** -0.5)
        w = jax.nn.softmax(w, axis=-1)
        h = jnp.einsum("bqk,bkc->bqc", w, v, precision=prec).reshape(b, hh, ww, c)
        return x + _conv(self.cfg, c, 1, "proj_out")(h)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a VALID stride-2 3x3 conv (SAME padding would shift the grid)."""

    cfg: VQConfig

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.cfg, x.shape[-1], 3, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest x2 (repeat on H then W), then a 3x3 conv."""

    cfg: VQConfig

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.cfg, x.shape[-1], 3, "conv")(x)


class _Level(nn.Module):
    """One resolution level: res blocks (each optionally followed by attention), then a resample."""

    cfg: VQConfig
    out_ch: int
    num_res: int
    attn: bool
    resample: str | None  # "down", "up" or None

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_res):
            x = ResnetBlock(self.cfg, self.out_ch, name=f"res_{j}")(x)
            if self.attn:
                x = AttnBlock(self.cfg, name=f"attn_{j}")(x)
        if self.resample == "down":
            x = Downsample(self.cfg, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.cfg, name="upsample")(x)
        return x


class _Mid(nn.Module):
    cfg: VQConfig

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        # Named mid_0 / mid_1 / mid_2 after LlamaGen's nn.ModuleList indices (mid_1 absent without attention).
        x = ResnetBlock(self.cfg, c, name="mid_0")(x)
        if self.cfg.mid_attn:
            x = AttnBlock(self.cfg, name="mid_1")(x)
        return ResnetBlock(self.cfg, c, name="mid_2")(x)


class Encoder(nn.Module):
    cfg: VQConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        n = len(cfg.ch_mult)
        x = _conv(cfg, cfg.ch, 3, "conv_in")(x)
        for i, m in enumerate(cfg.ch_mult):
            last = i == n - 1
            x = _Level(cfg, cfg.ch * m, cfg.enc_res_blocks, cfg.attn_last_level and last,
                       None if last else "down", name=f"conv_blocks_{i}")(x)
        x = _Mid(cfg, name="mid")(x)
        x = nn.swish(_norm(cfg, x.shape[-1], "norm_out")(x))
        return _conv(cfg, cfg.z_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
    cfg: VQConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.cfg
        n = len(cfg.ch_mult)
        x = _conv(cfg, cfg.ch * cfg.ch_mult[-1], 3, "conv_in")(z)
        x = _Mid(cfg, name="mid")(x)
        # conv_blocks_0 is the lowest resolution (LlamaGen order; Chameleon's up.{n-1-k}).
        for k, m in enumerate(reversed(cfg.ch_mult)):
            last = k == n - 1
            x = _Level(cfg, cfg.ch * m, cfg.dec_res_blocks, cfg.attn_last_level and k == 0,
                       None if last else "up", name=f"conv_blocks_{k}")(x)
        x = nn.swish(_norm(cfg, x.shape[-1], "norm_out")(x))
        return _conv(cfg, 3, 3, "conv_out")(x)


def _l2n(x, axis=-1, eps=1e-12):
    # torch F.normalize semantics: x / max(||x||, eps).
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


_REFINE = 4  # candidates re-ranked by exact distance


def _nearest(z, e):
    """Index of the nearest row of ``e`` [K, D] for each row of ``z`` [N, D] (first index on exact ties).

    Ranks all codes by ``|e|^2 - 2 z.e`` (one matmul; ``|z|^2`` is constant per row and left out), then
    re-ranks the best ``_REFINE`` by ``sum((z - e)^2)`` computed from differences. The expanded form alone
    cancels: its rounding is ~eps*(|z|^2 + |e|^2), not eps*|z - e|^2, so two codes that close to a tie could
    come out in either order (measured against float64 at D = 256: wrong picks at distance gaps up to 2e-5
    with |e|^2 ~ 23, 4e-5 with |e|^2 ~ 87; unit vectors 1e-6); re-ranked, the largest wrong gaps are 2e-6
    and 3e-8 (fp32 rounding of the differences). One top_k over the distances replaces the argmin: measured
    1.3x an argmin's time, small against the matmul and far below the encoder's."""
    k = e.shape[0]
    if k <= 1:
        return jnp.zeros((z.shape[0],), jnp.int32)
    approx = jnp.sum(e * e, -1)[None, :] - 2.0 * jnp.matmul(z, e.T, precision=jax.lax.Precision.HIGHEST)
    _, cand = jax.lax.top_k(-approx, min(_REFINE, k))  # [N, R]
    exact = jnp.sum((z[:, None, :] - jnp.take(e, cand, axis=0)) ** 2, -1)
    best = exact == jnp.min(exact, -1, keepdims=True)
    return jnp.min(jnp.where(best, cand, k), -1).astype(jnp.int32)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-row lookup with straight-through gradients.

    With ``l2_norm`` both z and the codebook rows are unit vectors, so argmin distance = argmax cosine;
    the stored table need not be unit-norm (LlamaGen's is not), normalisation happens at lookup time.
    """

    cfg: VQConfig

    def setup(self):
        k, d = self.cfg.codebook_size, self.cfg.code_dim
        # Random directions; scale is irrelevant for l2 codes and ~|z| for Euclidean ones.
        self.embedding = self.param("embedding", nn.initializers.normal(1.0 / math.sqrt(d)), (k, d), jnp.float32)

    def codebook(self):
        e = self.embedding.astype(jnp.float32)
        return _l2n(e) if self.cfg.l2_norm else e

    def lookup(self, z):
        """z [..., D] -> (indices [...], z_q [...,D] (no gradient path), z as used for the distance)."""
        z = z.astype(jnp.float32)
        if self.cfg.l2_norm:
            z = _l2n(z)
        e = self.codebook()
        flat = z.reshape(-1, z.shape[-1])
        idx = _nearest(flat, e)
        return idx.reshape(z.shape[:-1]), jnp.take(e, idx, axis=0).reshape(z.shape), z

    def __call__(self, z):
        """Returns (z_q straight-through, indices, losses dict)."""
        idx, zq, zn = self.lookup(z)
        sg = jax.lax.stop_gradient
        codebook = jnp.mean((zq - sg(zn)) ** 2)
        commit = jnp.mean((sg(zq) - zn) ** 2)
        if self.cfg.legacy_beta:
            loss = self.cfg.beta * codebook + commit
        else:
            loss = codebook + self.cfg.beta * commit
        z_st = zn + sg(zq - zn)
        return z_st, idx, {"codebook": codebook, "commit": commit, "vq": loss}

    def embed(self, indices):
        return jnp.take(self.codebook(), indices, axis=0)


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantize -> post_quant_conv -> decoder.

    Methods (use with ``model.apply(vars, x, method=...)``): ``encode``, ``decode_indices``, ``embed_codes``,
    ``encode_latent``, ``decode_latent``; ``__call__`` is the training forward.
    """

    cfg: VQConfig

    def setup(self):
        cfg = self.cfg.validate()
        self.encoder = Encoder(cfg)
        self.quant_conv = _conv(cfg, cfg.code_dim, 1, "quant_conv")
        self.quantize = VectorQuantizer(cfg)
        self.post_quant_conv = _conv(cfg, cfg.z_channels, 1, "post_quant_conv")
        self.decoder = Decoder(cfg)

    def encode_latent(self, images):
        """Images [B,H,W,3] in [-1,1] -> pre-quantisation latents [B,h,w,code_dim] (fp32)."""
        return self.quant_conv(self.encoder(images.astype(jnp.float32)))

    def encode(self, images):
        """Images [B,H,W,3] in [-1,1] -> code ids [B, h*w] int32, raster (row-major) order."""
        idx, _, _ = self.quantize.lookup(self.encode_latent(images))
        return idx.reshape(idx.shape[0], -1)

    def embed_codes(self, indices):
        """Code ids [..., N] -> quantised code vectors [..., N, code_dim] (normalised rows if l2_norm)."""
        return self.quantize.embed(indices)

    def decode_latent(self, zq):
        return self.decoder(self.post_quant_conv(zq))

    def decode_indices(self, indices, grid: tuple[int, int] | None = None):
        """Code ids [B, h*w] -> images [B, H, W, 3] in (about) [-1, 1]. Square grid unless ``grid`` given."""
        b, n = indices.shape
        if grid is None:
            s = int(round(math.sqrt(n)))
            if s * s != n:
                raise ValueError(f"{n} codes is not a square grid; pass grid=(h, w)")
            grid = (s, s)
        zq = self.embed_codes(indices).reshape(b, grid[0], grid[1], self.cfg.code_dim)
        return self.decode_latent(zq)

    def __call__(self, images):
        """Training forward: (reconstruction, aux) with aux = vq losses + ``indices`` [B,h,w] and ``z``
        [B,h,w,D] (the latent as compared with the codebook; dead-code restarts re-seed from it)."""
        z = self.encode_latent(images)
        z_st, idx, losses = self.quantize(z)
        aux = dict(losses, indices=idx, z=jax.lax.stop_gradient(_l2n(z) if self.cfg.l2_norm else z))
        return self.decode_latent(z_st), aux


def param_shapes(cfg: VQConfig, image_size: int = 0):
    """Param tree of ShapeDtypeStructs (no compute, no memory)."""
    s = max(image_size, cfg.downsample)
    return jax.eval_shape(lambda: VQModel(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))["params"])


def init_params(cfg: VQConfig, rng, image_size: int = 64):
    """Random params, drawn on the host with NumPy from shapes traced by ``eval_shape``.

    Like ``VQModel(cfg).init`` (LeCun-normal conv kernels, untruncated here; zero biases; unit GroupNorm
    scales; N(0, 1/D) codebook), but compiling the jitted Flax init of this many threefry streams takes
    ~20 s on CPU (measured) and the eager init longer: host init is well under a second. ``rng`` is a JAX
    key or an int seed. The spatial size only matters for tracing (the model is fully convolutional).
    """
    shapes = param_shapes(cfg, image_size)
    if isinstance(rng, (int, np.integer)):
        seed = int(rng)
    else:
        seed = int(np.asarray(jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
                              else rng).ravel()[-1])
    gen = np.random.default_rng(seed)

    def make(path, leaf):
        name = str(path[-1].key)
        shape = tuple(leaf.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            x = gen.standard_normal(shape) / math.sqrt(fan_in)
        elif name == "embedding":
            x = gen.standard_normal(shape) / math.sqrt(shape[-1])
        elif name == "scale":
            x = np.ones(shape)
        elif name == "bias":
            x = np.zeros(shape)
        else:
            raise ValueError(f"no host initialiser for param {'/'.join(str(p.key) for p in path)}")
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(make, shapes)


def to_uint8(images) -> np.ndarray:
    """[-1,1] float images -> uint8 the way LlamaGen does: clamp(127.5 x + 128, 0, 255)."""
    x = np.asarray(images, np.float32)
    return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)


def from_uint8(images) -> np.ndarray:
    """uint8 [.., 3] -> float32 in [-1, 1] (2 x/255 - 1, LlamaGen preprocessing)."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def image_grid(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """Stack rows of uint8 images [N,H,W,3] (equal N per row) into one uint8 grid with white padding."""
    rows = [np.asarray(r) for r in rows]
    n, h, w, _ = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, imgs in enumerate(rows):
        for c in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = imgs[c]
    return grid


def save_png(images_or_grid, path: str) -> None:
    """Write one uint8 (or [-1,1] float) image [H,W,3], or a batch [N,H,W,3] as a single row, to a PNG."""

    x = np.asarray(images_or_grid)
    if x.dtype != np.uint8:
        x = to_uint8(x)
    if x.ndim == 4:
        x = image_grid([x])
    Image.fromarray(x).save(path)
