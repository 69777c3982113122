"""The unified model: one decoder over text and image positions, in one of two layouts
(``model.image.layout``):

- ``two_heads`` (arXiv 2505.23043): text in/out through the LM embedding/head, images in through the
  understanding adapter, images out (teacher forced) through the generation adapter and predicted by the
  generation head.
- ``shared_vocab`` (Chameleon/Anole, the model of UnifiedVisual): VQ codes are rows of the one text
  vocabulary. An image token enters through the text embedding and is predicted by the LM head; code c is
  vocabulary id ``code_token_ids[c]``, a map read from the tokenizer's ``IMGIMG…Z`` names
  (``data/tokenizer.image_code_ids``), never assumed to be an offset. ``image_logits`` are the LM head's
  image rows, in code order, so the loss, CFG and decoding read codes in both layouts.

The sequence arrays are the same for both: image positions hold code indices. Which path a position takes
is read from ``modality`` (data/arrays.py), never re-derived.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT
from uvjax.models import alignment
from uvjax.models.adapters import ADAPTER_KINDS, Adapter, Linear
from uvjax.models.llama import Decoder, DecoderConfig

IMAGE_KINDS = ("codes", "features")
IMAGE_LOSSES = ("ce", "cosine", "mse")
LAYOUTS = ("two_heads", "shared_vocab")
# shared_vocab: which logits the image CE normalises over at image targets. image_rows: the N image rows
# of the LM head (the code distribution the decoder samples from); full_vocab: the whole vocabulary (what
# Chameleon-style full fine-tuning computes; the text rows then also learn "not here").
IMAGE_CE_ROWS = ("image_rows", "full_vocab")


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
    layout: str = "two_heads"
    code_token_ids: tuple = ()  # shared_vocab: vocabulary id of code 0..num_codes-1 (from the tokenizer)
    image_ce: str = "image_rows"  # shared_vocab: IMAGE_CE_ROWS

    def validate(self) -> "ImageConfig":
        if self.layout not in LAYOUTS:
            raise ValueError(f"model.image.layout={self.layout!r}; expected one of {LAYOUTS}")
        if self.image_ce not in IMAGE_CE_ROWS:
            raise ValueError(f"model.image.image_ce={self.image_ce!r}; expected one of {IMAGE_CE_ROWS}")
        if self.layout == "shared_vocab":
            if (self.input_kind, self.output_kind) != ("codes", "codes"):
                raise ValueError("model.image.layout='shared_vocab' puts VQ codes in the vocabulary: it needs "
                                 f"input_kind and output_kind 'codes', got {self.input_kind!r}/{self.output_kind!r}")
            if self.align_strength:
                raise ValueError("model.image.align_strength distorts adapter inputs; the shared_vocab layout "
                                 "has no understanding adapter")
            if self.code_token_ids and len(self.code_token_ids) != self.num_codes:
                raise ValueError(f"model.image.code_token_ids maps {len(self.code_token_ids)} codes, but "
                                 f"model.image.num_codes={self.num_codes}")
            if len(set(self.code_token_ids)) != len(self.code_token_ids):
                raise ValueError("model.image.code_token_ids: two codes map to the same vocabulary id")
        for k in ("input_kind", "output_kind"):
            if getattr(self, k) not in IMAGE_KINDS:
                raise ValueError(f"model.image.{k}={getattr(self, k)!r}; expected one of {IMAGE_KINDS}")
        for k in ("und_adapter", "gen_adapter"):
            if getattr(self, k) not in ADAPTER_KINDS:
                raise ValueError(f"model.image.{k}={getattr(self, k)!r}; expected one of {ADAPTER_KINDS}")
        if uses_features(self) and self.feature_dim <= 0:
            raise ValueError("model.image.feature_dim must be > 0 for continuous image inputs/outputs")
        if self.share_adapters and self.input_kind != self.output_kind:
            raise ValueError("model.image.share_adapters needs the same input and output kind")
        if self.image_positions < 0:
            raise ValueError(f"model.image.image_positions={self.image_positions} must be >= 0")
        return self


# What kind of images a model reads and writes, asked in one place: ``im`` is ``model.image`` as a config section
# or an ``ImageConfig`` (both have input_kind / output_kind / feature_dim / num_codes).
def uses_codes(im) -> bool:
    """The model reads or writes VQ codes (so it needs the run's VQ tokenizer)."""
    return "codes" in (im.input_kind, im.output_kind)


def uses_features(im) -> bool:
    """The model reads or writes continuous (SigLIP/CLIP) features (so it needs a feature tower)."""
    return "features" in (im.input_kind, im.output_kind)


def sequence_feature_dim(im) -> int:
    """F of the feature rows in a sequence (0: the model has none): what the data pipeline checks records against."""
    return int(im.feature_dim) if uses_features(im) else 0


def sequence_image_facts(im) -> dict:
    """What a sequence's image positions must hold for this model: codes below ``codebook_size`` and feature
    rows of ``feature_dim`` (0: none). The data pipeline checks records against it (``model_images``)."""
    return {"codebook_size": int(im.num_codes), "feature_dim": sequence_feature_dim(im)}


@dataclasses.dataclass(frozen=True)
class UnifiedConfig:
    decoder: DecoderConfig = DecoderConfig()
    image: ImageConfig = ImageConfig()

    def validate(self) -> "UnifiedConfig":
        self.decoder.validate()
        self.image.validate()
        ids = self.image.code_token_ids
        if self.image.layout == "shared_vocab" and ids and not 0 <= min(ids) <= max(ids) < self.decoder.vocab_size:
            raise ValueError(f"model.image.code_token_ids span {min(ids)}..{max(ids)}, outside the vocabulary "
                             f"(model.vocab_size={self.decoder.vocab_size})")
        return self

    @property
    def shared_vocab(self) -> bool:
        return self.image.layout == "shared_vocab"


class UnifiedModel(nn.Module):
    cfg: UnifiedConfig

    def setup(self):
        d, im = self.cfg.decoder, self.cfg.image
        kw = dict(dtype=d.compute_dtype, param_dtype=d.weight_dtype)
        self.embed = nn.Embed(d.vocab_size, d.hidden, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), **kw)
        shared = im.layout == "shared_vocab"
        if shared and len(im.code_token_ids) != im.num_codes:
            raise ValueError("the shared_vocab layout needs model.image.code_token_ids (code -> vocabulary id, "
                             "read from the tokenizer's IMGIMG names by the trainer); it is empty")
        if uses_codes(im) and not shared:
            # Code vectors (the VQ codebook rows, l2-normalised like LlamaGen's) feed the adapters.
            self.image_codebook = self.param(
                "image_codebook", nn.with_logical_partitioning(_unit_rows, ("codes", "code_dim")),
                (im.num_codes, im.code_dim), d.weight_dtype)
        in_axis = lambda kind: "code_dim" if kind == "codes" else "features"
        if not shared:
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
        if not shared:
            out = im.num_codes if im.output_kind == "codes" else im.feature_dim
            self.generation_head = Linear(out, ("embed", "codes" if im.output_kind == "codes" else "features"),
                                          kernel_init=nn.initializers.normal(0.02), **kw)

    def code_ids(self):
        """[num_codes] int32: vocabulary id of each code (shared_vocab)."""
        return jnp.asarray(self.cfg.image.code_token_ids, jnp.int32)

    # -- inputs ---------------------------------------------------------------------------------
    def embed_inputs(self, batch):
        im = self.cfg.image
        tokens, modality = batch["tokens"], batch["modality"]
        is_img_in, is_img_out = modality == IMAGE_IN, modality == IMAGE_OUT
        is_image = is_img_in | is_img_out
        if self.cfg.shared_vocab:  # codes are vocabulary rows: one embedding for every position
            x = self.embed(jnp.where(is_image, jnp.take(self.code_ids(), tokens, mode="clip"), tokens))
            if im.image_positions:
                cell = self.image_cell_embedding(image_cells(is_image))
                x = x + jnp.where(is_image[..., None], cell, 0).astype(x.dtype)
            return x
        x = self.embed(jnp.where(is_image, 0, tokens))
        code_vec = None
        if uses_codes(im):
            code_vec = jnp.take(self.image_codebook, jnp.where(is_image, tokens, 0), axis=0)
        feats = batch.get("features")
        und_in = code_vec if im.input_kind == "codes" else feats
        gen_in = code_vec if im.output_kind == "codes" else feats
        if im.align_strength and und_in is not None:
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
        if self.cfg.shared_vocab:
            e = self.embed(jnp.take(self.code_ids(), codes_or_features, mode="clip"))
            if im.image_positions:
                if cells is None:
                    raise ValueError("embed_generated needs the cell index of each output when image_positions > 0")
                e = e + self.image_cell_embedding(cells).astype(e.dtype)
            return e
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
        """Codebook logits (VQ outputs) or the predicted feature vector (continuous outputs). shared_vocab:
        the LM head's image rows, in code order ([..., num_codes])."""
        if self.cfg.shared_vocab:
            w, transposed = self.image_head()
            hf = h.astype(jnp.float32)
            return (hf @ w.astype(jnp.float32).T if transposed else hf @ w.astype(jnp.float32)).astype(jnp.float32)
        return self.generation_head(h).astype(jnp.float32)

    def image_head(self):
        """shared_vocab: (weight, transposed) of the code logits, the LM head's image rows in code order
        ([E, N], or [N, E] for a tied embedding), for the fused head + cross-entropy of the loss."""
        w, transposed = self.text_head()
        w = nn.unbox(w)  # boxed (logical axes) while ``init`` runs
        return (jnp.take(w, self.code_ids(), axis=0) if transposed else jnp.take(w, self.code_ids(), axis=1)), transposed


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
    t = jnp.arange(is_image.shape[-1], dtype=jnp.int32)[None]
    prev = jnp.pad(is_image[:, :-1], ((0, 0), (1, 0)))
    start = jax.lax.cummax(jnp.where(is_image & ~prev, t, 0), axis=1)
    return jnp.where(is_image, t - start, 0)


def _unit_rows(key, shape, dtype):
    v = jax.random.normal(key, shape, jnp.float32)
    return (v / jnp.linalg.norm(v, axis=-1, keepdims=True)).astype(dtype)
