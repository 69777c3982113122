"""Batched KV-cache decoding of the unified model: text, images (VQ codes or features), interleaved.

Flow: prompts (sequence arrays, ``encode_prompt``) are left-padded to one length (padding has segment
id 0, so it is never attended to, and each row keeps its own positions), prefilled in one jitted call,
then a compiled ``lax.while_loop`` emits one item per row per step until every row stopped or the
budget ``max_new_tokens`` is spent. No Python runs per token.

Per-row state machine (rows switch modality independently):

- **text mode**: a text token is sampled from the LM head (greedy / temperature / top-k / top-p); in the
  shared-vocabulary layout its image rows are masked.
  A stop id (eos, or ``<|im_end|>`` for ChatML) ends the row. ``<boi>`` switches to image mode; it is
  masked when no complete image fits in the remaining budget (so an image always has exactly N
  codes), when ``max_images`` is reached, or when ``image_tokens`` is 0. ``<eoi>`` is never sampled in
  text mode (it only closes images).
- **image mode**: exactly ``image_tokens`` (N) items come from the generation head (shared vocabulary:
  the LM head's image rows, every other row masked), each fed back
  through ``embed_generated`` as an IMAGE_OUT position: VQ codes are sampled (temperature, top-k),
  continuous outputs take the regressed vector itself. After N items ``<eoi>`` is forced and the row
  returns to text mode, so answers may interleave text and images.
- a prompt that ends with ``<boi>`` starts its row in image mode (the caller placed the image).
- ``force_image_within=k``: a row that has not opened an image after k text tokens gets ``<boi>``
  forced, and cannot stop before its first image (text-to-image prompts of weak models).

Classifier-free guidance: each conditional prompt gets an unconditional twin (its *null prompt*,
:func:`null_prompt_record`) in the same batch, rows ``B..2B-1``. Both streams are fed the same sampled
items; only the image logits are guided, ``cond + s * (cond - uncond)`` (``s = 0`` is exactly the
conditional stream; LlamaGen's ``w`` equals ``1 + s``). Text is sampled from the conditional stream.

Null prompt (training dropout and inference use the same function, so they cannot drift apart): the
record with every user *text* segment emptied and every user *image* removed; system prompt, template
and the assistant side are unchanged. With the Vicuna template the unconditional prompt is thus
``<s>USER:  ASSISTANT:`` (+ the same assistant prefix as the conditional row).

Over ~400 lines on purpose: one generator (batched prefill, KV-cached text and image decoding, CFG, forced
image openings) whose modes share one cache layout.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from uvjax.data import sequence
from uvjax.data.arrays import FEATURE_KEY, IMAGE_OUT, INPUT_KEYS, PAD, TEXT
from uvjax.data.records import Record
from uvjax.data.tokenizer import ChatTemplate, TextTokenizer
from uvjax.inference.sampling import NEG_INF, guide, sample_logits
from uvjax.models.llama import fuse_projections
from uvjax.models.lora import LoRAConfig, merge_lora
from uvjax.models.unified import UnifiedModel
from uvjax.towers.vq_codec import VQ_FILE

TEXT_MODE, IMAGE_MODE = 0, 1


# ============================================================================ settings and ids
@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Static decoding knobs (hashable: one compiled loop per distinct setting and shape).

    ``temperature <= 0`` (text) / ``image_temperature <= 0`` (codes) mean greedy. ``image_tokens`` is N,
    the items per generated image (0 disables images). ``max_images``: images per row."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    image_tokens: int = 0
    image_temperature: float = 1.0
    image_top_k: int = 0
    max_images: int = 1
    force_image_within: int = 0

    def validate(self) -> "DecodeSettings":
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.image_top_k < 0 or self.image_tokens < 0:
            raise ValueError("top_k, image_top_k and image_tokens must be >= 0")
        if self.force_image_within and not self.image_tokens:
            raise ValueError("force_image_within needs image_tokens > 0")
        return self


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    boi: int
    eoi: int
    stop: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tok: TextTokenizer) -> "SpecialIds":
        """Stops at eos and at ``<|im_end|>`` (the ChatML assistant end), whichever the template uses."""
        return cls(tok.boi_id, tok.eoi_id, tuple(sorted({tok.eos_id, tok.im_end_id})))


# ============================================================================ prompts
import os

from uvjax.data.records import null_prompt, null_prompt_record  # noqa: E402  (re-exported)
from uvjax.inference.loading import export_config, is_export_dir
from uvjax.stage_log import stage_dir


def encode_prompt(record: Record, tokenizer: TextTokenizer, template: ChatTemplate, *,
                  assistant_prefix: str = "", open_image: bool = False,
                  feature_dim: int = 0) -> dict[str, np.ndarray]:
    """A conversation ending in a user turn -> prompt arrays (``tokens``, ``modality`` and, with
    ``feature_dim``, ``features``) ending with the assistant opening, as ``data/sequence.py`` lays
    out training sequences. Images must be VQ codes (IMAGE_IN for user images, IMAGE_OUT for earlier
    assistant images) or features. ``assistant_prefix`` starts the answer with given text;
    ``open_image`` ends the prompt with ``<boi>`` (the row starts in image mode)."""
    return sequence.encode_prompt(record, tokenizer, template, assistant_prefix=assistant_prefix,
                                  open_image=open_image, feature_dim=feature_dim)


def left_pad(prompts: Sequence[dict[str, np.ndarray]], bucket: int = 16, feature_dim: int = 0,
             min_length: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Left-pads prompts to one length (a multiple of ``bucket``, to reuse compiled shapes).

    Padding: segment id 0 (never attended to), PAD modality, position 0; real tokens: segment 1 and
    positions 0..L-1 per row. ``min_length`` fixes P across calls (one compile for many batches).
    Returns (arrays [R, P], lengths [R])."""
    lens = np.asarray([len(p["tokens"]) for p in prompts], np.int32)
    if (lens == 0).any():
        raise ValueError("empty prompt")
    P = int(math.ceil(max(int(lens.max()), min_length) / bucket) * bucket)
    R = len(prompts)
    b = {k: np.zeros((R, P), np.int32) for k in INPUT_KEYS}
    if feature_dim:
        b[FEATURE_KEY] = np.zeros((R, P, feature_dim), np.float32)
    for r, (p, n) in enumerate(zip(prompts, lens)):
        b["tokens"][r, P - n:] = p["tokens"]
        b["modality"][r, P - n:] = p["modality"]
        b["segment_ids"][r, P - n:] = 1
        b["positions"][r, P - n:] = np.arange(n)
        if feature_dim and FEATURE_KEY in p:
            b[FEATURE_KEY][r, P - n:] = p[FEATURE_KEY]
    return b, lens


# ============================================================================ outputs
@dataclasses.dataclass
class DecodeOutput:
    """Emitted items per row: ``tokens`` (text id, or VQ code at IMAGE_OUT), ``modality`` (TEXT /
    IMAGE_OUT / PAD after the row stopped), ``features`` [B, M, F] for continuous outputs,
    ``lengths`` (items emitted, stop token included) and ``steps`` (loop iterations run)."""
    tokens: np.ndarray
    modality: np.ndarray
    lengths: np.ndarray
    features: np.ndarray | None
    steps: int

    def parts(self, row: int, ids: SpecialIds) -> list[dict]:
        """Row -> ordered parts: ``{"kind": "text", "ids": [...]}`` (without boi/eoi/stop) and
        ``{"kind": "image", "codes": int32 [N]}`` or ``{"kind": "image", "features": [N, F]}``."""
        n = int(self.lengths[row])
        tok, mod = self.tokens[row, :n], self.modality[row, :n]
        out: list[dict] = []
        i = 0
        while i < n:
            if mod[i] == IMAGE_OUT:
                j = i
                while j < n and mod[j] == IMAGE_OUT:
                    j += 1
                part = {"kind": "image"}
                if self.features is not None:
                    part["features"] = self.features[row, i:j]
                else:
                    part["codes"] = tok[i:j].astype(np.int32)
                out.append(part)
                i = j
                continue
            t = int(tok[i])
            if t not in (ids.boi, ids.eoi) and t not in ids.stop:
                if out and out[-1]["kind"] == "text":
                    out[-1]["ids"].append(t)
                else:
                    out.append({"kind": "text", "ids": [t]})
            i += 1
        return out

    def text(self, row: int, ids: SpecialIds, tokenizer: TextTokenizer) -> str:
        """All text of a row (images left out), decoded."""
        return "".join(tokenizer.decode(p["ids"]) for p in self.parts(row, ids) if p["kind"] == "text")

    def images(self, row: int, ids: SpecialIds) -> list[np.ndarray]:
        return [p.get("codes", p.get("features")) for p in self.parts(row, ids) if p["kind"] == "image"]


# ============================================================================ the decoder
def _dummy(feature_dim: int, batch: int) -> dict:
    b = {k: jnp.zeros((batch, 1), jnp.int32) for k in INPUT_KEYS}
    if feature_dim:
        b[FEATURE_KEY] = jnp.zeros((batch, 1, feature_dim), jnp.float32)
    return b


def zero_cache(dec: UnifiedModel, batch: int):
    """An empty KV cache for ``dec`` (a model with ``max_cache_len`` set): shapes from eval_shape."""
    F = dec.cfg.image.feature_dim
    shapes = jax.eval_shape(lambda: dec.init({"params": jax.random.key(0)}, _dummy(F, batch), decode=True))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def _split_layers(tree) -> dict:
    """Stacked per-layer leaves (under a ``layers`` key) → tuples of per-layer arrays, flat by path.

    Used at the boundary of the decode loop of a decoder without a layer loop: the loop then carries
    (and closes over) one buffer per layer, and :func:`_join_layers` inside the step stacks them back
    only for the model's unrolled layers to slice them apart again. XLA folds that slice-of-stack to
    the per-layer buffer, so the step neither copies every layer's weights out of the stacked
    parameters nor re-stacks the KV cache (both were per-step copies of the whole cache/weights)."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {k: tuple(v[i] for i in range(v.shape[0])) if "/layers/" in f"/{k}/" else v for k, v in flat.items()}


def _join_layers(flat: dict):
    return traverse_util.unflatten_dict({k: jnp.stack(v) if isinstance(v, tuple) else v for k, v in flat.items()},
                                        sep="/")


class Generator:
    """Compiled batched decoding for one model + variables.

    ``generate(prompts, settings, null_prompts=None, cfg_scale=0.0, seed=0) -> DecodeOutput``; compiled
    functions are cached per (rows, prompt length, settings). ``prefill``/``loop`` are exposed for
    benchmarks."""

    def __init__(self, model: UnifiedModel, variables: dict, ids: SpecialIds, *, bucket: int = 16,
                 merge: bool = True, fuse: bool = True):
        self.ids, self.bucket = ids, bucket
        self._given_model, self._merge, self._fuse = model, merge, fuse
        self.model, self.variables = self._prepared(model, variables)
        self.codes_out = self.model.cfg.image.output_kind == "codes"
        # shared vocabulary: image rows are never sampled as text (an image only opens with <boi> and then
        # has exactly N codes, sampled from those rows as ``image_logits``)
        self.image_rows = tuple(self.model.cfg.image.code_token_ids) if self.model.cfg.shared_vocab else ()
        self.feature_dim = self.model.cfg.image.feature_dim
        self._fns: dict = {}

    def set_variables(self, variables: dict) -> None:
        """Other parameters for the same model (a training run's quick evaluations), prepared as in ``__init__``;
        the compiled programs stay valid: parameters are their arguments, not constants."""
        model, self.variables = self._prepared(self._given_model, variables)
        if model.cfg != self.model.cfg:
            raise ValueError("set_variables: the parameters need another decoder than this Generator compiled")

    def _prepared(self, model: UnifiedModel, variables: dict) -> tuple[UnifiedModel, dict]:
        merge, fuse = self._merge, self._fuse
        variables = {k: v for k, v in variables.items() if k != "cache"}
        lora_cfg = model.cfg.decoder.lora
        if merge and lora_cfg.rank and "lora" in variables:
            # Decoding never updates the LoRA factors, so W + scale·A·B is folded into the kernels once
            # here: each step then runs one matmul per projection instead of three (the two thin LoRA
            # matmuls cost more than the merged one at batch 1). Same function up to float rounding.
            mc = model.cfg
            model = UnifiedModel(dataclasses.replace(mc, decoder=dataclasses.replace(mc.decoder, lora=LoRAConfig())))
            variables = {**{k: v for k, v in variables.items() if k != "lora"},
                         "params": merge_lora(variables["params"], variables["lora"], lora_cfg)}
        if fuse and not model.cfg.decoder.lora.rank and not variables.get("lora"):
            # one matmul for q/k/v and one for gate/up (fewer, larger reads of the weights per step:
            # -10% per batch-1 step on config S), the kernels concatenated once here
            mc = model.cfg
            model = UnifiedModel(dataclasses.replace(
                mc, decoder=dataclasses.replace(mc.decoder, fused_projections=True)))
            params = variables["params"]
            variables = {**variables, "params": {**params, "decoder": fuse_projections(params["decoder"])}}
        return model, variables

    def _dec(self, cache_len: int) -> UnifiedModel:
        mc = self.model.cfg
        return UnifiedModel(dataclasses.replace(mc, decoder=dataclasses.replace(mc.decoder, max_cache_len=cache_len)))

    def compiled(self, rows: int, cond_rows: int, prompt_len: int, s: DecodeSettings):
        """(prefill, loop) for this shape; temperatures and top_p are traced arguments of ``loop``
        (one compile serves greedy and sampled decoding), top-p on/off and the rest are static."""
        static = dataclasses.replace(s, temperature=0.0, image_temperature=0.0,
                                     top_p=1.0 if s.top_p >= 1.0 else 0.5)
        key = (rows, cond_rows, prompt_len, static)
        if key not in self._fns:
            self._fns[key] = self._build(rows, cond_rows, prompt_len, static)
        return self._fns[key]

    @staticmethod
    def knobs(s: DecodeSettings) -> jnp.ndarray:
        return jnp.asarray([s.temperature, s.top_p, s.image_temperature], jnp.float32)

    def _build(self, R: int, B: int, P: int, s: DecodeSettings):
        dec = self._dec(P + s.max_new_tokens)
        ids, M, N = self.ids, s.max_new_tokens, s.image_tokens
        codes_out, F = self.codes_out, self.feature_dim
        guided = R != B
        stop = jnp.asarray(ids.stop, jnp.int32)

        def prefill(variables, batch):
            cache = zero_cache(dec, R)
            h, mut = dec.apply({**variables, "cache": cache}, batch, decode=True, mutable=["cache"])
            return h[:, -1], mut["cache"]

        mc = dec.cfg.decoder
        split = mc.scan_unroll == 0 or mc.scan_unroll >= mc.layers  # no layer loop: per-layer buffers

        def loop(variables, cache, h, prompt_len, mode0, rng, cfg_scale, knobs):
            if split:
                variables, cache = _split_layers(variables), _split_layers(cache)
            joined = _join_layers if split else (lambda v: v)
            call = lambda method, *a: dec.apply(joined(variables), *a, method=method)
            state = dict(
                t=jnp.array(0, jnp.int32), h=h, cache=cache, mode=mode0,
                count=jnp.zeros((B,), jnp.int32), nimg=(mode0 == IMAGE_MODE).astype(jnp.int32),
                ntext=jnp.zeros((B,), jnp.int32), done=jnp.zeros((B,), bool),
                length=jnp.zeros((B,), jnp.int32), tokens=jnp.zeros((B, M), jnp.int32),
                modality=jnp.zeros((B, M), jnp.int32))
            if not codes_out:
                state["features"] = jnp.zeros((B, M, F), jnp.float32)

            def body(c):
                t, mode, count, nimg, ntext, done = c["t"], c["mode"], c["count"], c["nimg"], c["ntext"], c["done"]
                tl = call(UnifiedModel.text_logits, c["h"][:B])
                if N:  # images off (N = 0): no row can be in image mode, so the generation head is skipped
                    il = call(UnifiedModel.image_logits, c["h"])
                    if guided:
                        il = guide(il[:B], il[B:], cfg_scale)
                vocab = jnp.arange(tl.shape[-1])
                if self.image_rows:
                    tl = tl.at[:, jnp.asarray(self.image_rows, jnp.int32)].set(NEG_INF)
                can_open = (nimg < s.max_images) & (M - t >= N + 2) if N else jnp.zeros((B,), bool)
                tl = jnp.where((vocab == ids.eoi)[None], NEG_INF, tl)
                tl = jnp.where((vocab == ids.boi)[None] & ~can_open[:, None], NEG_INF, tl)
                want_image = (nimg == 0) & can_open
                if s.force_image_within:
                    tl = jnp.where(jnp.isin(vocab, stop)[None] & want_image[:, None], NEG_INF, tl)
                k_text, k_img = jax.random.split(jax.random.fold_in(rng, t))
                top_p = knobs[1] if s.top_p < 1.0 else 1.0
                text_tok = sample_logits(k_text, tl, knobs[0], s.top_k, top_p)
                if s.force_image_within:
                    text_tok = jnp.where(want_image & (ntext >= s.force_image_within), ids.boi, text_tok)
                if not N:
                    img_tok = jnp.zeros((B,), jnp.int32)
                    img_in = img_tok if codes_out else jnp.zeros((B, F), jnp.float32)
                elif codes_out:
                    img_tok = sample_logits(k_img, il, knobs[2], s.image_top_k)
                    img_in = img_tok
                else:
                    img_tok, img_in = jnp.zeros((B,), jnp.int32), il
                in_img = (mode == IMAGE_MODE) & (count < N)
                close = (mode == IMAGE_MODE) & (count >= N)
                text_step = ~in_img & ~close
                tok = jnp.where(in_img, img_tok, jnp.where(close, ids.eoi, text_tok))
                mod = jnp.where(in_img, IMAGE_OUT, TEXT)
                active = ~done
                opened = active & text_step & (tok == ids.boi)
                out = dict(c)
                out["tokens"] = c["tokens"].at[:, t].set(jnp.where(active, tok, 0))
                out["modality"] = c["modality"].at[:, t].set(jnp.where(active, mod, PAD))
                if not codes_out:
                    out["features"] = c["features"].at[:, t].set(
                        jnp.where((active & in_img)[:, None], img_in, 0.0))
                out["mode"] = jnp.where(opened, IMAGE_MODE, jnp.where(active & close, TEXT_MODE, mode))
                out["count"] = jnp.where(opened, 0, jnp.where(active & in_img, count + 1, count))
                out["nimg"] = nimg + opened
                out["ntext"] = ntext + (active & text_step)
                out["length"] = c["length"] + active
                out["done"] = done | (active & text_step & jnp.isin(tok, stop))
                x = call(UnifiedModel.embed_text, tok)
                if N:
                    e_img = call(UnifiedModel.embed_generated, img_in, count)
                    x = jnp.where((mod == IMAGE_OUT)[:, None], e_img.astype(x.dtype), x)
                if guided:
                    x = jnp.concatenate([x, x], 0)
                pos = (prompt_len + t)[:, None]
                seg = jnp.ones((R, 1), jnp.int32)
                h_new, mut = dec.apply({**joined(variables), "cache": joined(c["cache"])}, x[:, None, :], seg, pos,
                                       True, True, method=UnifiedModel.hidden_from_embeddings, mutable=["cache"])
                new_cache = _split_layers(mut["cache"]) if split else mut["cache"]
                out["h"], out["cache"], out["t"] = h_new[:, 0], new_cache, t + 1
                return out

            final = jax.lax.while_loop(lambda c: (c["t"] < M) & ~jnp.all(c["done"]), body, state)
            res = {k: final[k] for k in ("tokens", "modality", "length", "t")}
            if not codes_out:
                res["features"] = final["features"]
            return res

        return jax.jit(prefill), jax.jit(loop)

    def prepare(self, prompts, settings: DecodeSettings, null_prompts=None, min_length: int = 0):
        """Host-side batch building: (padded arrays, prompt lengths, initial modes, rows, cond rows)."""
        settings.validate()
        B = len(prompts)
        rows = list(prompts) + list(null_prompts or [])
        if null_prompts is not None and len(null_prompts) != B:
            raise ValueError(f"{len(null_prompts)} null prompts for {B} prompts")
        batch, lens = left_pad(rows, self.bucket, self.feature_dim, min_length)
        last = np.asarray([(int(p["tokens"][-1]) == self.ids.boi and int(p["modality"][-1]) == TEXT)
                           for p in prompts])
        if last.any() and not settings.image_tokens:
            raise ValueError("a prompt ends with <boi> but settings.image_tokens is 0")
        mode0 = np.where(last, IMAGE_MODE, TEXT_MODE).astype(np.int32)
        return batch, lens, mode0, len(rows), B

    def generate(self, prompts: Sequence[dict], settings: DecodeSettings, *, null_prompts=None,
                 cfg_scale: float = 0.0, seed: int = 0, min_length: int = 0) -> DecodeOutput:
        """Decodes a batch of prompt arrays (``encode_prompt``). ``null_prompts`` (same count) turns on
        classifier-free guidance with ``cfg_scale``; ``min_length`` pads prompts to at least that many
        tokens (callers decoding many batches pass their longest prompt: one compiled shape)."""
        batch, lens, mode0, R, B = self.prepare(prompts, settings, null_prompts, min_length)
        prefill, loop = self.compiled(R, B, batch["tokens"].shape[1], settings)
        h, cache = prefill(self.variables, {k: jnp.asarray(v) for k, v in batch.items()})
        res = jax.device_get(loop(self.variables, cache, h, jnp.asarray(lens), jnp.asarray(mode0),
                                  jax.random.key(seed), jnp.float32(cfg_scale), self.knobs(settings)))
        return DecodeOutput(np.asarray(res["tokens"]), np.asarray(res["modality"]), np.asarray(res["length"]),
                            np.asarray(res["features"]) if "features" in res else None, int(res["t"]))


def find_vq(workdir: str, cfg=None) -> tuple[str | None, list[str]]:
    """Path of the run's VQ tokenizer (``vq.safetensors`` written by ``uvjax.training.vq_train``) and
    the places looked at: config ``vq.params`` / ``vq.path`` / ``vq.workdir`` / ``data.vq`` (a file or
    a directory holding the file), the last ``vq`` stage in ``<workdir>/stages.jsonl`` (runs built by
    ``uvjax.stages``), then ``<workdir>/vq/`` and ``<workdir>/``. An export directory
    (``uvjax.weights.export``) is looked up by its own record only (``export.vq`` of its ``uvjax_config.json``):
    the training machine's places are not consulted."""
    if "://" not in workdir and is_export_dir(workdir):
        rel = export_config(workdir).export.get("vq")
        if not rel:
            return None, [f"{os.path.join(workdir, 'uvjax_config.json')}: export.vq (exported without a VQ)"]
        path = os.path.join(workdir, rel)
        return (path if os.path.isfile(path) else None), [path]
    cands: list[str] = []
    if cfg is not None:
        for sect, key in (("vq", "params"), ("vq", "path"), ("vq", "workdir"), ("data", "vq")):
            node = cfg.get(sect) if hasattr(cfg, "get") else None
            val = node.get(key) if node is not None and hasattr(node, "get") else None
            if isinstance(val, str) and val:
                cands.append(val if os.path.isabs(val) else os.path.join(workdir, val))
    staged = stage_dir(workdir, "vq")
    cands += [staged] if staged else []
    if "://" not in workdir:
        cands += [os.path.join(workdir, "vq"), workdir]
    looked = []
    for c in cands:
        path = os.path.join(c, VQ_FILE) if os.path.isdir(c) or not c.endswith(".safetensors") else c
        looked.append(path)
        if os.path.isfile(path):
            return path, looked
    return None, looked


__all__ = ["DecodeSettings", "SpecialIds", "DecodeOutput", "Generator", "encode_prompt", "left_pad",
           "null_prompt", "null_prompt_record", "zero_cache", "find_vq", "TEXT_MODE", "IMAGE_MODE"]
