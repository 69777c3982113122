"""The unified model: one decoder, text in/out through the LM embedding/head, images in through the
understanding adapter, images out (teacher forced) through the generation adapter and predicted by the
generation head. Which path a position takes is read from ``modality`` (data/arrays.py), never
re-derived.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT
from uvjax.models.adapters import ADAPTER_KINDS, Adapter, Linear
from uvjax.models.llama import Decoder, DecoderConfig

IMAGE_KINDS = ("codes", "features")
IMAGE_LOSSES = ("ce", "cosine", "mse")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    num_codes: int = 1024  # VQ codebook size (generation-head logits for code outputs)
    code_dim: int = 8  # dimension of a code vector fed to the adapters
    feature_dim: int = 0  # continuous feature size (SigLIP), 0 when unused
    input_kind: str = "codes"  # what understanding images are: VQ codes or continuous features
    output_kind: str = "codes"  # what generated images are
    und_adapter: str = "linear"
    gen_adapter: str = "linear"
    share_adapters: bool = False  # the reference silently shared them; here it is explicit
    # alignment experiment: a fixed affine distortion (strength s, seed) of the understanding features
    align_strength: float = 0.0
    align_seed: int = 42
    align_translation: bool = False
    # Learned embedding of a token's cell within its image (0 = off, else the image's token count), added
    # to both adapters' outputs. RoPE only says how far a token is from the other tokens; a model that must
    # put an icon in "the bottom-left corner" or name the corner an icon is in also needs to know which cell
    # of the raster a code is, and learning that from the distance to <boi> costs a small model many steps.
    image_positions: int = 0

    def validate(self) -> "ImageConfig":
        for k in ("input_kind", "output_kind"):
            if getattr(self, k) not in IMAGE_KINDS:
                raise ValueError(f"model.image.{k}={getattr(self, k)!r}; expected one of {IMAGE_KINDS}")
        for k in ("und_adapter", "gen_adapter"):
            if getattr(self, k) not in ADAPTER_KINDS:
                raise ValueError(f"model.image.{k}={getattr(self, k)!r}; expected one of {ADAPTER_KINDS}")
        if "features" in (self.input_kind, self.output_kind) and self.feature_dim <= 0:
            raise ValueError("model.image.feature_dim must be > 0 for continuous image inputs/outputs")
        if self.share_adapters and self.input_kind != self.output_kind:
            raise ValueError("model.image.share_adapters needs the same input and output kind")
        if self.image_positions < 0:
            raise ValueError(f"model.image.image_positions={self.image_positions} must be >= 0")
        return self


@dataclasses.dataclass(frozen=True)
class UnifiedConfig:
    decoder: DecoderConfig = DecoderConfig()
    image: ImageConfig = ImageConfig()

    def validate(self) -> "UnifiedConfig":
        self.decoder.validate()
        self.image.validate()
        return self


class UnifiedModel(nn.Module):
    cfg: UnifiedConfig

    def setup(self):
        d, im = self.cfg.decoder, self.cfg.image
        kw = dict(dtype=d.compute_dtype, param_dtype=d.weight_dtype)
        self.embed = nn.Embed(d.vocab_size, d.hidden, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), **kw)
        if "codes" in (im.input_kind, im.output_kind):
            # Code vectors (the VQ codebook rows, l2-normalised like LlamaGen's) feed the adapters.
            self.image_codebook = self.param(
                "image_codebook", nn.with_logical_partitioning(_unit_rows, ("codes", "code_dim")),
                (im.num_codes, im.code_dim), d.weight_dtype)
        in_axis = lambda kind: "code_dim" if kind == "codes" else "features"
        self.understanding_adapter = Adapter(im.und_adapter, d.hidden, in_axis(im.input_kind), **kw)
        if not im.share_adapters:
            self.generation_adapter = Adapter(im.gen_adapter, d.hidden, in_axis(im.output_kind), **kw)
        if im.image_positions:
            self.image_position_embed = self.param(
                "image_position_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (im.image_positions, d.hidden), d.weight_dtype)
        self.decoder = Decoder(d)
        if not d.tie_embeddings:
            self.lm_head = _LMHead(d.vocab_size, **kw)
        out = im.num_codes if im.output_kind == "codes" else im.feature_dim
        self.generation_head = Linear(out, ("embed", "codes" if im.output_kind == "codes" else "features"),
                                      kernel_init=nn.initializers.normal(0.02), **kw)

    # -- inputs ---------------------------------------------------------------------------------
    def embed_inputs(self, batch):
        im = self.cfg.image
        tokens, modality = batch["tokens"], batch["modality"]
        is_img_in, is_img_out = modality == IMAGE_IN, modality == IMAGE_OUT
        is_image = is_img_in | is_img_out
        x = self.embed(jnp.where(is_image, 0, tokens))
        code_vec = None
        if "codes" in (im.input_kind, im.output_kind):
            code_vec = jnp.take(self.image_codebook, jnp.where(is_image, tokens, 0), axis=0)
        feats = batch.get("features")
        und_in = code_vec if im.input_kind == "codes" else feats
        gen_in = code_vec if im.output_kind == "codes" else feats
        if im.align_strength and und_in is not None:
            from uvjax.models import alignment
            und_in = alignment.apply_config(und_in, im.align_strength, im.align_seed, im.align_translation)
        und = self.understanding_adapter(und_in)
        gen_adapter = self.understanding_adapter if im.share_adapters else self.generation_adapter
        gen = gen_adapter(gen_in)
        if im.image_positions:
            cell = self.image_cell_embedding(image_cells(is_image))
            und, gen = und + cell, gen + cell
        x = jnp.where(is_img_in[..., None], und.astype(x.dtype), x)
        x = jnp.where(is_img_out[..., None], gen.astype(x.dtype), x)
        return x

    def embed_generated(self, codes_or_features, cells=None):
        """Generation-adapter embedding of sampled image outputs (used when decoding); ``cells``: each
        output's index within its image (needed when ``image_positions`` is on)."""
        im = self.cfg.image
        v = jnp.take(self.image_codebook, codes_or_features, axis=0) if im.output_kind == "codes" \
            else codes_or_features
        gen_adapter = self.understanding_adapter if im.share_adapters else self.generation_adapter
        e = gen_adapter(v)
        if im.image_positions:
            if cells is None:
                raise ValueError("embed_generated needs the cell index of each output when image_positions > 0")
            e = e + self.image_cell_embedding(cells)
        return e

    def image_cell_embedding(self, cells):
        n = self.cfg.image.image_positions
        return jnp.take(self.image_position_embed, jnp.clip(cells, 0, n - 1), axis=0)

    def embed_text(self, tokens):
        return self.embed(tokens)

    # -- trunk ----------------------------------------------------------------------------------
    def __call__(self, batch, deterministic: bool = True, decode: bool = False):
        """Hidden states [B, T, E] after the final norm."""
        x = self.embed_inputs(batch)
        return self.decoder(x, batch["segment_ids"], batch["positions"], deterministic, decode)

    def init_all(self, batch):
        """Touches every submodule (trunk and both heads) so ``init`` creates all parameters."""
        h = self(batch)
        return self.text_logits(h), self.image_logits(h)

    def hidden_from_embeddings(self, x, segment_ids, positions, deterministic=True, decode=False):
        return self.decoder(x, segment_ids, positions, deterministic, decode)

    # -- heads (fp32 logits) -------------------------------------------------------------------
    def text_logits(self, h):
        if self.cfg.decoder.tie_embeddings:
            return self.embed.attend(h.astype(jnp.float32)).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def text_head(self):
        """(weight, transposed): the text logits are ``h @ weight`` ([E, V]), or ``h @ weight.T`` for a tied
        embedding ([V, E]) — for the fused head + cross-entropy of the loss (fp32 models)."""
        if self.cfg.decoder.tie_embeddings:
            return self.embed.embedding, True
        return self.lm_head.variables["params"]["kernel"], False

    def image_logits(self, h):
        """Codebook logits (VQ outputs) or the predicted feature vector (continuous outputs)."""
        return self.generation_head(h).astype(jnp.float32)


def text_head_path(cfg: UnifiedConfig) -> str:
    """Where :meth:`UnifiedModel.text_head`'s weight lives in the variables (flattened with "/")."""
    return "params/embed/embedding" if cfg.decoder.tie_embeddings else "params/lm_head/kernel"


class _LMHead(nn.Module):
    """Bias-free output projection [E, V]; kept as its own module so export can find ``lm_head``."""

    features: int
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, h):
        k = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                       (h.shape[-1], self.features), self.param_dtype)
        return jnp.dot(h.astype(self.dtype), k.astype(self.dtype), preferred_element_type=jnp.float32)


def image_cells(is_image):
    """[B, T] bool -> [B, T] int: each image token's index within its contiguous image span (0 elsewhere).
    Images are always delimited by <boi>/<eoi>, so a span is one image."""
    import jax
    t = jnp.arange(is_image.shape[-1], dtype=jnp.int32)[None]
    prev = jnp.pad(is_image[:, :-1], ((0, 0), (1, 0)))
    start = jax.lax.cummax(jnp.where(is_image & ~prev, t, 0), axis=1)
    return jnp.where(is_image, t - start, 0)


def _unit_rows(key, shape, dtype):
    import jax
    v = jax.random.normal(key, shape, jnp.float32)
    return (v / jnp.linalg.norm(v, axis=-1, keepdims=True)).astype(dtype)
