"""Vision transformer for the understanding/generation feature towers: SigLIP and CLIP as flags of one module.

Why one module: SigLIP-B/16 and CLIP ViT-L/14-336 differ only in a handful of switches (reference §C and
seed §2.2), and the frozen tower runs once in pre-tokenisation, so a single, simple implementation that
reproduces ``transformers`` to fp32 tolerance is worth more than two specialised ones.

| flag                | SigLIP (``siglip_b16``)     | CLIP (``clip_l14_336``)                     |
|---------------------|-----------------------------|---------------------------------------------|
| ``act``             | ``gelu_tanh`` (HF ``gelu_pytorch_tanh``) | ``quick_gelu`` (x·sigmoid(1.702x)) |
| ``class_token``     | False (196 tokens)          | True (1 + 576 tokens)                       |
| ``pre_norm``        | False                       | True (HF ``pre_layrnorm``, before block 0)  |
| ``patch_bias``      | True                        | False                                       |
| ``norm_eps``        | 1e-6                        | 1e-5                                        |

Both: learned position embeddings added after patchify (after the CLS token is prepended, for CLIP),
pre-LN blocks x + attn(LN1(x)), x + MLP(LN2(x)), a final ``post_norm`` (HF ``post_layernorm``).

**Feature selection** (what the LLM reads, reference §C.2): ``hidden_states[select_layer]`` where
``hidden_states[0]`` is the (pre-normed, for CLIP) embedding output and ``hidden_states[i]`` the output of
block i; default −2 = the output of the second-to-last block, *without* the final LN (HF applies
``post_layernorm`` only to ``last_hidden_state``). ``feature_post_norm=True`` applies it anyway (the
LLaVA-OneVision "deleted last layer" towers). The class token is dropped (CLIP), all patches are kept
(SigLIP has none, so nothing is dropped). :meth:`ViT.features` runs only the blocks it needs.

Layout: images NHWC float, already normalised (:func:`preprocess`); params are plain 2-D kernels
``[in, out]``, names listed in ``uvjax.weights.hf_siglip``. Compute is fp32 with ``highest`` matmul
precision: the tower is frozen and run once offline (seed §11.9: bf16 features drift).
"""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

ACTS = ("gelu_tanh", "quick_gelu", "gelu")
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture + feature selection. Defaults are SigLIP-B/16 at 224 px (196 tokens x 768)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    class_token: bool = False
    pre_norm: bool = False
    patch_bias: bool = True
    select_layer: int = -2  # index into hidden_states (depth + 1 entries)
    drop_class_token: bool = True  # features are patches only
    feature_post_norm: bool = False  # apply post_norm to the selected features
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.class_token)

    @property
    def feature_tokens(self) -> int:
        """Tokens per image the LLM sees."""
        return self.num_patches + int(self.class_token and not self.drop_class_token)

    @property
    def hidden_index(self) -> int:
        """Non-negative index into hidden_states of the selected layer (= blocks to run)."""
        return self.select_layer % (self.depth + 1)

    def validate(self) -> "ViTConfig":
        if self.act not in ACTS:
            raise ValueError(f"vit.act={self.act!r}; expected one of {ACTS}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vit.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vit.width {self.width} is not divisible by heads {self.heads}")
        if not -(self.depth + 1) <= self.select_layer <= self.depth:
            raise ValueError(f"vit.select_layer {self.select_layer} outside [-{self.depth + 1}, {self.depth}]")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d) -> "ViTConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {sorted(unknown)}")
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def siglip_b16(image_size: int = 224) -> ViTConfig:
    """google/siglip-base-patch16-224 (the transformers ``SiglipVisionConfig`` defaults, reference §C.1)."""
    return ViTConfig(image_size=image_size)


def clip_l14_336() -> ViTConfig:
    """openai/clip-vit-large-patch14-336 as LLaVA reads it: layer −2, CLS dropped -> 576 x 1024."""
    return ViTConfig(image_size=336, patch_size=14, width=1024, depth=24, heads=16, mlp=4096, act="quick_gelu",
                     norm_eps=1e-5, class_token=True, pre_norm=True, patch_bias=False, mean=CLIP_MEAN, std=CLIP_STD)


def siglip_small(image_size: int = 128) -> ViTConfig:
    """The embedded default's tower (pretrained by ``uvjax.training.siglip_pretrain``): 8x8 = 64 tokens at
    128 px, the same count as the tiny VQ's codes, so both kinds of image cost the LM the same."""
    return ViTConfig(image_size=image_size, patch_size=16, width=128, depth=4, heads=4, mlp=512)


PRESETS = {"siglip_b16": siglip_b16, "clip_l14_336": clip_l14_336, "siglip_small": siglip_small}


def vit_config(name_or_dict) -> ViTConfig:
    """A preset name or a dict/ConfigDict of ViTConfig fields (``preset`` key optional, then overrides)."""
    if isinstance(name_or_dict, str):
        if name_or_dict not in PRESETS:
            raise ValueError(f"unknown ViT preset {name_or_dict!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name_or_dict]().validate()
    d = name_or_dict.to_dict() if hasattr(name_or_dict, "to_dict") else dict(name_or_dict)
    preset = d.pop("preset", None)
    base = PRESETS[preset]().to_dict() if preset else {}
    base.update(d)
    return ViTConfig.from_dict(base)


# ------------------------------------------------------------------------------------------- modules
def activation(name: str, x):
    if name == "gelu_tanh":
        return nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTS}")


_HI = jax.lax.Precision.HIGHEST


def _dense(features: int, name: str):
    return nn.Dense(features, name=name, precision=_HI)


class Attention(nn.Module):
    width: int
    heads: int

    @nn.compact
    def __call__(self, x, mask=None):
        B, T, D = x.shape
        hd = D // self.heads
        split = lambda y: y.reshape(B, T, self.heads, hd)
        q = split(_dense(D, "q")(x))
        k = split(_dense(D, "k")(x))
        v = split(_dense(D, "v")(x))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HI) * (hd ** -0.5)
        if mask is not None:  # [B, T] key validity (text tower padding)
            s = jnp.where(mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
        p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=_HI).reshape(B, T, D)
        return _dense(D, "out")(o)


class Block(nn.Module):
    """Pre-LN transformer block (shared by the image tower and the pretraining text tower)."""

    width: int
    heads: int
    mlp: int
    act: str
    eps: float

    @nn.compact
    def __call__(self, x, mask=None):
        h = nn.LayerNorm(self.eps, name="norm1")(x)
        x = x + Attention(self.width, self.heads, name="attn")(h, mask)
        h = nn.LayerNorm(self.eps, name="norm2")(x)
        h = _dense(self.mlp, "fc1")(h)
        h = _dense(self.width, "fc2")(activation(self.act, h))
        return x + h


class ViT(nn.Module):
    """``__call__(images) -> {"hidden_states": [depth+1 x [B,T,D]], "last": post_norm(last)}``;
    :meth:`features` -> the selected layer [B, feature_tokens, D]."""

    cfg: ViTConfig

    def setup(self):
        c = self.cfg
        self.embedding = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                                 padding="VALID", use_bias=c.patch_bias, precision=_HI, name="embedding")
        self.pos_embedding = self.param("pos_embedding", nn.initializers.normal(c.width ** -0.5),
                                        (1, c.num_positions, c.width))
        if c.class_token:
            self.cls_token = self.param("cls_token", nn.initializers.normal(c.width ** -0.5), (c.width,))
        if c.pre_norm:
            self.pre_norm_ln = nn.LayerNorm(c.norm_eps, name="pre_norm")
        self.blocks = [Block(c.width, c.heads, c.mlp, c.act, c.norm_eps, name=f"block_{i}") for i in range(c.depth)]
        self.post_norm = nn.LayerNorm(c.norm_eps, name="post_norm")

    def embed(self, images):
        c = self.cfg
        x = self.embedding(images.astype(jnp.float32))
        B = x.shape[0]
        x = x.reshape(B, -1, c.width)  # raster order: row (y) major, like HF flatten(2)
        if c.class_token:
            x = jnp.concatenate([jnp.broadcast_to(self.cls_token, (B, 1, c.width)), x], axis=1)
        x = x + self.pos_embedding
        if c.pre_norm:
            x = self.pre_norm_ln(x)
        return x

    def __call__(self, images, num_blocks: int | None = None):
        x = self.embed(images)
        hs = [x]
        for blk in self.blocks[: len(self.blocks) if num_blocks is None else num_blocks]:
            x = blk(x)
            hs.append(x)
        return {"hidden_states": hs, "last": self.post_norm(x)}

    def features(self, images):
        c = self.cfg
        x = self(images, num_blocks=c.hidden_index)["hidden_states"][-1]
        if c.feature_post_norm:
            x = self.post_norm(x)
        if c.class_token and c.drop_class_token:
            x = x[:, 1:]
        return x


def init_params(cfg: ViTConfig, rng=None) -> dict:
    rng = jax.random.PRNGKey(0) if rng is None else rng
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return ViT(cfg.validate()).init(rng, x)["params"]


def param_shapes(cfg: ViTConfig) -> dict:
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: ViT(cfg.validate()).init(jax.random.PRNGKey(0), x))["params"]


# --------------------------------------------------------------------------------------- preprocessing
def preprocess(images_u8: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    """uint8 [B,H,W,3] -> float32 normalised [B,S,S,3]. SigLIP squashes to S x S with bicubic (§C.4),
    no crop; images already at S (the Smart Watch renders) are not resampled."""
    imgs = np.asarray(images_u8)
    if imgs.ndim == 3:
        imgs = imgs[None]
    S = cfg.image_size
    if imgs.shape[1:3] != (S, S):
        imgs = np.stack([np.asarray(Image.fromarray(im).resize((S, S), Image.Resampling.BICUBIC)) for im in imgs])
    x = imgs.astype(np.float32) / 255.0
    return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


class FeatureExtractor:
    """The frozen tower as one jitted function: uint8 images -> float32 features [B, N, F]."""

    def __init__(self, cfg: ViTConfig, params):
        self.cfg, self.params = cfg.validate(), params
        model = ViT(self.cfg)
        self._fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=ViT.features))

    @property
    def feature_dim(self) -> int:
        return self.cfg.width

    def __call__(self, images_u8: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(self.params, preprocess(images_u8, self.cfg)), np.float32)


def num_params(params) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))

