"""The run's VQ tokenizer as a batched, jitted codec (images <-> codes), one definition for the stages,
the trainer, evaluation and decoding."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from uvjax.models.vq import VQModel, from_uint8, to_uint8
from uvjax.weights.llamagen_vq import VQ_FILE, load_vq

# ============================================================================ the run's image codec


class VQCodec:
    """The run's VQ tokenizer as two batched callables: ``encode(uint8 [B,H,W,3]) -> int32 [B,N]`` and
    ``decode(int [B,N]) -> uint8 [B,H,W,3]`` (jitted; fixed chunk size so shapes compile once)."""

    def __init__(self, path: str, chunk: int = 16):
        """``path``: a ``vq.safetensors`` file, or the directory ``vq_train.train_vq`` wrote it into."""
        if os.path.isdir(path):
            path = os.path.join(path, VQ_FILE)
        self.path, self.chunk = path, chunk
        self.cfg, params = load_vq(path)
        self._model, self._vars = VQModel(self.cfg), {"params": params}
        model = VQModel(self.cfg)
        v = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
        self._enc = jax.jit(lambda x: model.apply(v, x, method=VQModel.encode))
        self._dec = jax.jit(lambda c: model.apply(v, c, method=VQModel.decode_indices))

    def _chunked(self, fn, x):
        outs = []
        for i in range(0, len(x), self.chunk):
            part = x[i:i + self.chunk]
            pad = self.chunk - len(part)
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, 0)])
            outs.append(np.asarray(jax.device_get(fn(jnp.asarray(part))))[:self.chunk - pad])
        return np.concatenate(outs)

    def encode(self, images_u8: np.ndarray) -> np.ndarray:
        return self._chunked(self._enc, from_uint8(np.asarray(images_u8))).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        if "decoder" not in self._vars["params"]:  # an encoder-only VQ (HF's Chameleon port drops the decoder)
            raise ValueError(f"{self.path}: this VQ file has no decoder (its source checkpoint had none), so codes "
                             "cannot be turned into images. Convert a VQGAN with its decoder, e.g. Anole's "
                             "vqgan.ckpt: python -m uvjax.weights.llamagen_vq vqgan.ckpt OUT --naming chameleon")
        return to_uint8(self._chunked(self._dec, np.asarray(codes, np.int32)))

    def codebook(self) -> np.ndarray:
        """The code vectors [K, code_dim] the tokenizer looks up (l2-normalised rows when it normalises)."""
        ids = jnp.arange(self.cfg.codebook_size)[None]
        return np.asarray(self._model.apply(self._vars, ids, method=VQModel.embed_codes)[0])
