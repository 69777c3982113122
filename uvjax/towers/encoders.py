"""The frozen towers as image encoders for pre-tokenisation and inference: ``vq_encoder`` (images -> VQ codes)
and ``tower_encoder`` (images -> SigLIP/CLIP features, from a uvjax tower file or an HF vision directory), each
with the resize rule of the images it was trained on."""
from __future__ import annotations

import os

import numpy as np

from uvjax import storage_paths as sp
from uvjax.models.siglip import FeatureExtractor
from uvjax.towers.vq_codec import VQCodec
from uvjax.weights.hf_siglip import load_hf_vision, load_vit


class Encoder:
    """A frozen tower with its input size and preprocessing: ``kind`` "codes" | "features"."""

    def __init__(self, tower, kind: str, image_size: int, resize: str = "center_crop"):
        if kind not in ("codes", "features"):
            raise ValueError(f"encoder kind {kind!r}; expected 'codes' or 'features'")
        self.tower, self.kind, self.image_size, self.resize = tower, kind, int(image_size), resize

    def encode(self, images_u8: np.ndarray) -> np.ndarray:
        out = np.asarray(self.tower.encode(images_u8))
        return out.astype(np.int32) if self.kind == "codes" else out


def vq_encoder(vq_path: str, image_size: int, resize: str = "center_crop") -> Encoder:
    if sp.is_remote(vq_path):  # safetensors are read from a local copy
        vq_path = sp.local_tree(vq_path, sp.remote_cache_dir("trees")) if sp.isdir(vq_path) else \
            sp.local_copy(vq_path, sp.remote_cache_dir())
    return Encoder(VQCodec(vq_path), "codes", image_size, resize or "center_crop")


class _ViTFeatures:
    def __init__(self, cfg, params):
        self.cfg, self._fx = cfg, FeatureExtractor(cfg, params)

    def encode(self, images_u8: np.ndarray) -> np.ndarray:
        return self._fx(images_u8)


def tower_encoder(path: str, *, kind: str = "siglip", resize: str = "", **overrides) -> Encoder:
    """A SigLIP/CLIP vision tower as a features encoder: a uvjax tower file (``save_vit``: the SigLIP
    stage's ``siglip.safetensors``) or an HF ``SiglipVisionModel``/``CLIPVisionModel`` directory (config.json
    + safetensors, converted on load). Preprocessing is the tower's own unless ``resize`` says otherwise:
    SigLIP squashes to S x S, CLIP resizes the short side and centre-crops; normalisation is the tower's."""
    if sp.is_remote(path):  # read from a local copy
        path = sp.local_tree(path, sp.remote_cache_dir("trees")) if sp.isdir(path) else \
            sp.local_copy(path, sp.remote_cache_dir())
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        cfg, params = load_hf_vision(path, **overrides)
    else:
        f = os.path.join(path, "siglip.safetensors") if os.path.isdir(path) else path
        cfg, params = load_vit(f)
    mode = resize or ("resize_crop" if kind == "clip" else "squash")
    return Encoder(_ViTFeatures(cfg, params), "features", int(cfg.image_size), mode)
