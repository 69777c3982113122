"""The Python API for notebooks and other programs: load a trained model once, then ask and draw.

    import uvjax
    run = uvjax.load("runs/vqvq-tiny")          # a run directory, or an export directory
    run.answer("watch.png", "What is the weather?")      # -> "sunny"
    images = run.generate("a watch face showing rain", n=4, cfg_scale=3.0, seed=0)   # -> 4 PIL images
    parts = run.chat("Draw a watch with a cloud icon, then describe it.")          # -> [str | PIL image, ...]

Why a module of its own: the command line (``uvjax.generate``), the browser demo (``uvjax.demo``) and the
lmms-eval plugin all need the same plumbing (records → ``encode_prompt`` → ``Generator`` → text / VQ decode), and
the prompt must be built exactly as training and evaluation build it, so the three cannot drift apart.

Decoding defaults follow the evaluation (``uvjax.evaluate``): questions are answered greedily; text-to-image
prompts get ``<boi>`` forced if the model has not opened an image after 24 text tokens, and the budget holds one
image. The same arguments and seed give the same output.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image

from uvjax.data import images as image_io
from uvjax.data.records import Record, Segment
from uvjax.data.tokenizer import get_template
from uvjax.evaluation.run import _image_size, t2i_text_budget
from uvjax.inference.decode import DecodeSettings, Generator, SpecialIds, encode_prompt, find_vq, null_prompt
from uvjax.inference.loading import is_export_dir, load_trained
from uvjax.stages.features import TowerEncoder, evaluation_kwargs
from uvjax.towers import encoders
from uvjax.towers.vq_codec import VQCodec

# text-to-image: the evaluation's settings (uvjax/evaluate.py, evaluation.run.t2i_text_budget), so run.generate
# draws what the judge scored; a model trained to write its layout first (generation_plan) gets more room
T2I_FORCE_WITHIN, T2I_TEXT_BUDGET = t2i_text_budget({})  # a model without a layout plan: 24, 32


@dataclasses.dataclass
class _Parts:
    """What every request needs, built once per loaded model."""
    template: object
    ids: object
    generator: object
    feature_dim: int


class Model:
    """A loaded uvjax model (see the module docstring). Build with :func:`load`."""

    def __init__(self, loaded, vq_path: str | None, encode_features=None):
        self.loaded = loaded
        self.cfg, self.tokenizer, self.step, self.path = loaded.cfg, loaded.tokenizer, loaded.step, loaded.workdir
        mc = loaded.model.cfg
        self.input_kind, self.output_kind = mc.image.input_kind, mc.image.output_kind
        self.vq_path = vq_path
        self.codec = VQCodec(vq_path) if vq_path else None
        self._encode_features = encode_features
        self.image_size = image_size_of(loaded.workdir, loaded.cfg, vq_path) if (self.codec or encode_features) else 0
        self.image_tokens = int(np.prod(self.codec.cfg.grid(self.image_size))) if self.codec else 0
        feature_dim = mc.image.feature_dim if "features" in (mc.image.input_kind, mc.image.output_kind) else 0
        template = get_template(self.cfg.data.get("template", "vicuna_v1"), self.cfg.data.get("system_prompt"))
        ids = SpecialIds.from_tokenizer(self.tokenizer)
        self._p = _Parts(template, ids, Generator(loaded.model, loaded.variables, ids), feature_dim)

    def __repr__(self) -> str:
        return (f"uvjax.Model(path={self.path!r}, step={self.step}, image_size={self.image_size}, "
                f"inputs={self.input_kind}, outputs={self.output_kind})")

    @property
    def can_generate(self) -> bool:
        """Whether images can be drawn: the model emits VQ codes and a VQ decoder is at hand."""
        return self.output_kind == "codes" and self.codec is not None and self.image_tokens > 0

    # ------------------------------------------------------------------------------------ inputs
    def _pixels(self, image) -> np.ndarray:
        """A path, PIL image or uint8 array → uint8 [S, S, 3] resized as the run's training images were."""

        if isinstance(image, (str, os.PathLike)):
            try:
                arr, _ = image_io.read_image_file(os.fspath(image), image_io.ImagePolicy(min_side=1))
            except image_io.ImageError as e:
                raise ValueError(f"image {os.fspath(image)!r}: {e}") from None
        elif isinstance(image, Image.Image):
            arr, _ = image_io._to_rgb(image)
        else:
            arr = np.asarray(image)
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=-1)
            if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.dtype != np.uint8:
                raise ValueError(f"image array: expected uint8 [H, W, 3] (or [H, W, 4], [H, W]); got "
                                 f"{arr.dtype} {list(arr.shape)}")
            if arr.shape[-1] == 4:
                arr, _ = image_io._to_rgb(Image.fromarray(arr, "RGBA"))
        # imported data records its resize rule in stages.source.resize; the Smart Watch chain leaves it empty
        resize = str(((self.cfg.get("stages") or {}).get("source") or {}).get("resize") or "center_crop")
        return image_io.preprocess(np.ascontiguousarray(arr), self.image_size, resize)

    def _image_segment(self, image):
        if self.input_kind == "features":
            if self._encode_features is None:
                raise ValueError(f"{self.path}: this model reads images as vision-tower features and no tower was "
                                 "found for it (a run directory with its siglip stage is needed)")
            return Segment("user", "image", features=np.asarray(self._encode_features(self._pixels(image)[None]))[0])
        if self.codec is None:
            raise ValueError(f"{self.path}: no VQ tokenizer was found, so images cannot be read; "
                             "train one into <run>/vq or export the run with its VQ")
        return Segment("user", "image", codes=self.codec.encode(self._pixels(image)[None])[0])

    def _prompt(self, record):
        fd = self._p.feature_dim
        return (encode_prompt(record, self.tokenizer, self._p.template, feature_dim=fd),
                encode_prompt(null_prompt(record), self.tokenizer, self._p.template, feature_dim=fd))

    def _decode(self, records, settings, *, cfg_scale: float, seed: int):
        """One ``Generator`` call over ``records`` (all rows padded to the longest prompt)."""
        pairs = [self._prompt(r) for r in records]
        prompts, nulls = [p for p, _ in pairs], [n for _, n in pairs]
        longest = max(len(p["tokens"]) for p in prompts + (nulls if cfg_scale else []))
        return self._p.generator.generate(prompts, settings, null_prompts=nulls if cfg_scale else None,
                                          cfg_scale=float(cfg_scale), seed=int(seed), min_length=longest)

    def _to_pil(self, codes) -> list:
        if not codes:
            return []
        pixels = self.codec.decode(np.stack([np.asarray(c, np.int32) for c in codes]))
        return [Image.fromarray(np.asarray(p, np.uint8), "RGB") for p in pixels]

    # ------------------------------------------------------------------------------------ requests
    def answer(self, image, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
               seed: int = 0) -> str:
        """The model's answer to ``question`` about ``image`` (a path, PIL image or uint8 array)."""
        return self.answer_batch([image], [question], max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed)[0]

    def answer_batch(self, images: Sequence, questions: Sequence[str], *, max_new_tokens: int = 64,
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 16) -> list[str]:
        """Answers many questions, ``batch_size`` rows per decoding call (the i-th batch uses ``seed + i``)."""
        if len(images) != len(questions):
            raise ValueError(f"answer_batch: {len(images)} images but {len(questions)} questions")
        records = [Record(f"q{i}", "vqa", [self._image_segment(im), Segment("user", "text", text=str(q))])
                   for i, (im, q) in enumerate(zip(images, questions))]
        settings = DecodeSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature))
        out_texts = []
        B = min(int(batch_size), len(records))
        for bi, start in enumerate(range(0, len(records), B)):
            part = records[start:start + B]
            # the last batch is filled with repeats: one compiled shape for every batch (as the evaluation does)
            out = self._decode(part + [part[-1]] * (B - len(part)), settings, cfg_scale=0.0, seed=seed + bi)
            out_texts += [out.text(r, self._p.ids, self.tokenizer).strip() for r in range(len(part))]
        return out_texts

    def generate(self, prompt: str, *, n: int = 1, cfg_scale: float = 0.0, temperature: float = 1.0,
                 top_k: int = 0, seed: int = 0) -> list:
        """``n`` images (PIL, ``image_size`` square) drawn for a text prompt. ``cfg_scale`` s guides the image
        logits: ``cond + s (cond - uncond)`` (0 = off). A row that ends without a complete image gives none, so
        fewer than ``n`` images come back only if the model refused to draw (said in the returned list's length)."""
        if not self.can_generate:
            raise ValueError(f"{self.path}: this model cannot draw images here: "
                             + ("its outputs are continuous features (no pixel decoder)" if self.output_kind != "codes"
                                else "no VQ tokenizer was found"))
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        N = self.image_tokens
        force_within, text_budget = t2i_text_budget(self.cfg)
        settings = DecodeSettings(max_new_tokens=text_budget + N + 2, image_tokens=N, max_images=1,
                                  force_image_within=force_within, image_temperature=float(temperature),
                                  image_top_k=int(top_k))
        rec = Record("prompt", "generation", [Segment("user", "text", text=str(prompt))])
        out = self._decode([rec] * int(n), settings, cfg_scale=cfg_scale, seed=seed)
        codes = [c for r in range(int(n)) for c in out.images(r, self._p.ids)[:1] if len(c) == N]
        return self._to_pil(codes)

    def generate_batch(self, prompts: Sequence[str], *, n: int = 1, cfg_scale: float = 0.0, temperature: float = 1.0,
                       top_k: int = 0, seed: int = 0) -> list[list]:
        """``[generate(p, n=n, seed=seed, ...) for p in prompts]``: each prompt is its own decoding call, so its
        images do not depend on which other prompts were asked with it."""
        return [self.generate(p, n=n, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, seed=seed)
                for p in prompts]

    def chat(self, prompt: str, image=None, *, max_new_tokens: int = 256, max_images: int = 1,
             temperature: float = 0.0, image_temperature: float = 1.0, cfg_scale: float = 0.0, seed: int = 0) -> list:
        """An interleaved answer: its text parts (``str``) and images (PIL) in the order the model wrote them."""
        segs = ([self._image_segment(image)] if image is not None else []) + [Segment("user", "text", text=str(prompt))]
        N = self.image_tokens if self.can_generate else 0
        settings = DecodeSettings(max_new_tokens=int(max_new_tokens) + ((N + 2) * int(max_images) if N else 0),
                                  temperature=float(temperature), image_tokens=N,
                                  image_temperature=float(image_temperature),
                                  max_images=int(max_images) if N else 0)
        out = self._decode([Record("chat", "interleaved", segs)], settings, cfg_scale=cfg_scale, seed=seed)
        parts = []
        for p in out.parts(0, self._p.ids):
            if p["kind"] == "text":
                text = self.tokenizer.decode(p["ids"]).strip()
                if text:
                    parts.append(text)
            elif "codes" in p and len(p["codes"]) == N:
                parts += self._to_pil([p["codes"]])
        return parts


def image_size_of(workdir: str, cfg, vq_path: str | None) -> int:
    """The pixel size the run's images had in training (the stages' data, else the VQ's own config)."""
    return int(_image_size(workdir, cfg, vq_path))


def load(path: str, *, step: int | None = None) -> Model:
    """Loads a run directory (``config.json`` + ``checkpoints/``; ``step`` default: the latest) or an export
    directory (``python -m uvjax.weights.export``), local or ``gs://``, for inference on one device."""
    loaded = load_trained(path, step)
    vq_path, _ = find_vq(loaded.workdir, loaded.cfg)
    encode_features = None
    if loaded.model.cfg.image.input_kind == "features":
        encode_features = _tower_encoder(loaded)
    return Model(loaded, vq_path, encode_features)


def _tower_encoder(loaded):
    """The vision tower that turns a feature run's input images into features: the export's ``tower/`` or the
    run's siglip stage. None when there is none (said when an image is asked about)."""
    if not is_export_dir(loaded.workdir):
        try:
            return evaluation_kwargs(loaded.workdir, loaded.cfg)["encode_images"]
        except (FileNotFoundError, KeyError):
            return None
    info = (loaded.cfg.get("export") or {}).get("tower") or {}
    if not info.get("path"):
        return None
    path = os.path.join(loaded.workdir, str(info["path"]))
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):  # an HF vision directory
        return encoders.tower_encoder(path, kind=str(info.get("kind", "siglip"))).tower.encode
    return TowerEncoder(path).encode


__all__ = ["Model", "load", "image_size_of"]
