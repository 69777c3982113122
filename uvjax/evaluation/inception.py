"""Standard FID: the FID Inception network (pool3, 2048-d) in Flax, loaded from the user's weight file.

The network is the one ``pytorch-fid`` (``pytorch_fid.inception.InceptionV3``, ``use_fid_inception=True``)
computes FID with, which in turn ports TensorFlow's ``inception-2015-12-05`` graph: torchvision's
Inception-v3 layout with four patched block kinds (FID variants):

- ``Mixed_5b..5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E_1): the pool branch averages 3x3
  windows *without* counting the zero padding (``count_include_pad=False``);
- ``Mixed_7c`` (E_2): the pool branch is a 3x3 *max* pool (stride 1, padding 1).

Every convolution is ``conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU``. The
features are the global average pool after ``Mixed_7c``: [N, 2048].

Input handling is pytorch-fid's: pixels in [0, 1] (uint8 images are divided by 255, as
``torchvision.transforms.ToTensor`` does), resized to 299x299 with bilinear interpolation,
``align_corners=False`` and no antialiasing (``F.interpolate``), then scaled to [-1, 1] by ``2x - 1``.
Images are NHWC here (torch is NCHW).

Weights are never downloaded. The user fetches pytorch-fid's release file
``pt_inception-2015-12-05-6726825d.pth`` (a torch state dict, see docs/WEIGHTS.md) and either passes
it directly (needs torch, read with ``torch.load(weights_only=True)``) or converts it once::

    python -m uvjax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth \\
        --out inception_fid.safetensors        # or .npz; neither needs torch to read

Accepted files: ``.pth``/``.pt`` torch state dicts (the release file, or pytorch-fid's
``InceptionV3`` wrapper's ``blocks.i.j.`` keys), and ``.safetensors``/``.npz`` holding either this
module's keys (``Mixed_5b/branch1x1/conv/kernel``, what ``--convert`` writes) or the torch keys.
Errors name the file and the missing or mis-shaped key.

Over ~400 lines on purpose: pytorch-fid's InceptionV3, layer for layer, and its weight reader; split,
the layer-by-layer parity with the reference would span files.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from uvjax.evaluation.metrics import frechet_distance
from uvjax.weights.llamagen_vq import unflatten_params

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
FORMAT = "uvjax-fid-inception"
INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3

# pytorch-fid's InceptionV3 wrapper keeps the network as blocks of an nn.ModuleList
WRAPPER_BLOCKS = {
    (0, 0): "Conv2d_1a_3x3", (0, 1): "Conv2d_2a_3x3", (0, 2): "Conv2d_2b_3x3",
    (1, 0): "Conv2d_3b_1x1", (1, 1): "Conv2d_4a_3x3",
    (2, 0): "Mixed_5b", (2, 1): "Mixed_5c", (2, 2): "Mixed_5d", (2, 3): "Mixed_6a", (2, 4): "Mixed_6b",
    (2, 5): "Mixed_6c", (2, 6): "Mixed_6d", (2, 7): "Mixed_6e",
    (3, 0): "Mixed_7a", (3, 1): "Mixed_7b", (3, 2): "Mixed_7c",
}
# BatchNorm leaves: ours -> torch
BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


# ------------------------------------------------------------------------------------------- network
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nn.Module):
    """torchvision's ``BasicConv2d``: conv without bias, BatchNorm (inference), ReLU."""
    features: int
    kernel: Any = 1
    stride: Any = 1
    padding: Any = 0

    @nn.compact
    def __call__(self, x):
        kh, kw = _pair(self.kernel)
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, (kh, kw), _pair(self.stride), padding=((ph, ph), (pw, pw)), use_bias=False,
                    precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        return jax.nn.relu(_BatchNorm(self.features, name="bn")(x))


class _BatchNorm(nn.Module):
    """Inference BatchNorm from running statistics: all four leaves in ``params`` (no batch_stats)."""
    features: int

    @nn.compact
    def __call__(self, x):
        c = (self.features,)
        scale = self.param("scale", nn.initializers.ones, c)
        bias = self.param("bias", nn.initializers.zeros, c)
        mean = self.param("mean", nn.initializers.zeros, c)
        var = self.param("var", nn.initializers.ones, c)
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


def _avg_pool_same(x):
    """3x3 / stride 1 / padding 1 average over the valid pixels only (TF's pool, FID patch)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride: int, pad: int = 0):
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class BlockA(nn.Module):  # FIDInceptionA
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = ConvBN(64, name="branch1x1")(x)
        b5 = ConvBN(48, name="branch5x5_1")(x)
        b5 = ConvBN(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = ConvBN(64, name="branch3x3dbl_1")(x)
        b3 = ConvBN(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = ConvBN(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = ConvBN(self.pool_features, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class BlockB(nn.Module):  # torchvision InceptionB (Mixed_6a), unpatched
    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(384, 3, stride=2, name="branch3x3")(x)
        bd = ConvBN(64, name="branch3x3dbl_1")(x)
        bd = ConvBN(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 2)], -1)


class BlockC(nn.Module):  # FIDInceptionC
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = ConvBN(192, name="branch1x1")(x)
        b7 = ConvBN(c7, name="branch7x7_1")(x)
        b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = ConvBN(c7, name="branch7x7dbl_1")(x)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = ConvBN(192, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class BlockD(nn.Module):  # torchvision InceptionD (Mixed_7a), unpatched
    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(192, name="branch3x3_1")(x)
        b3 = ConvBN(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = ConvBN(192, name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], -1)


class BlockE(nn.Module):  # FIDInceptionE_1 (pool="avg") / FIDInceptionE_2 (pool="max")
    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = ConvBN(320, name="branch1x1")(x)
        b3 = ConvBN(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = ConvBN(448, name="branch3x3dbl_1")(x)
        bd = ConvBN(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool(x, 1, 1)
        bp = ConvBN(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3 up to pool3. Input: NHWC pixels in [0, 1] of any size (resized
    to 299x299 like pytorch-fid unless ``resize=False``). Output: [N, 2048] float32."""
    resize: bool = True

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x, jnp.float32)
        if self.resize:
            x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
        x = 2.0 * x - 1.0
        x = ConvBN(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = ConvBN(32, 3, name="Conv2d_2a_3x3")(x)
        x = ConvBN(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool(x, 2)
        x = ConvBN(80, 1, name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool(x, 2)
        x = BlockA(32, name="Mixed_5b")(x)
        x = BlockA(64, name="Mixed_5c")(x)
        x = BlockA(64, name="Mixed_5d")(x)
        x = BlockB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = BlockC(c7, name=name)(x)
        x = BlockD(name="Mixed_7a")(x)
        x = BlockE("avg", name="Mixed_7b")(x)
        x = BlockE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's ``F.interpolate(mode="bilinear", align_corners=False)`` along one
    axis (no antialiasing, also when shrinking), in torch's float32 arithmetic: ``scale = in / out``
    (float32), source ``scale * (i + 0.5) - 0.5`` rounded once to float32 (as torch's CPU kernel
    computes it, fused), clamped at 0; neighbours ``floor`` and ``min(floor + 1, in - 1)`` with
    weights ``1 - lambda`` and ``lambda``. Matches torch to 1 ulp (the float64 source would not: at
    128 px the float32 rounding of the source moves lambda by up to 4e-6)."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
    m = np.zeros((out_size, in_size), f32)
    np.add.at(m, (np.arange(out_size), i0), f32(1) - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m


def resize_bilinear(x, height: int, width: int):
    """NHWC bilinear resize with torch's ``align_corners=False`` rule (see :func:`interpolation_matrix`)."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (height, width):
        return x
    rh, rw = jnp.asarray(interpolation_matrix(h, height)), jnp.asarray(interpolation_matrix(w, width))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=hi)
    return jnp.einsum("pw,nowc->nopc", rw, x, precision=hi)


# ---------------------------------------------------------------------------------------- weights
def param_shapes() -> dict[str, tuple[int, ...]]:
    """Our flat keys (``Mixed_5b/branch1x1/conv/kernel``) -> shapes, from the module (no compute)."""
    shapes = jax.eval_shape(lambda: FIDInceptionV3(resize=False).init(
        jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))["params"]
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, prefix + k + "/")
            else:
                flat[prefix + k] = tuple(v.shape)
    walk(shapes, "")
    return flat


def torch_key(key: str) -> str:
    """Our flat key -> the torch state-dict key of the release file."""
    *mods, leaf = key.split("/")
    if leaf == "kernel":
        return ".".join(mods) + ".weight"
    return ".".join(mods) + "." + BN_NAMES[leaf]


def _torch_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if key.endswith("/kernel"):  # flax [kh, kw, in, out] <- torch [out, in, kh, kw]
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    return shape


def _strip_torch_key(k: str) -> str:
    if k.startswith("module."):
        k = k[len("module."):]
    m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", k)
    if m and (int(m.group(1)), int(m.group(2))) in WRAPPER_BLOCKS:
        k = WRAPPER_BLOCKS[int(m.group(1)), int(m.group(2))] + "." + m.group(3)
    return k


def _ignored_torch_key(k: str) -> bool:
    return k.endswith("num_batches_tracked") or k.startswith("fc.")


def convert_state_dict(state_dict: Mapping[str, Any], source: str = "<state dict>") -> dict[str, np.ndarray]:
    """A torch state dict (the release file's keys, or pytorch-fid wrapper's ``blocks.i.j.`` keys)
    -> our flat float32 params. Errors name ``source`` and the key."""
    sd = {_strip_torch_key(k): v for k, v in state_dict.items()}
    if any(k.startswith("AuxLogits.") for k in sd) or ("fc.weight" in sd and tuple(np.shape(sd["fc.weight"]))[0] != 1008):
        raise ValueError(f"{source}: this is torchvision's ImageNet Inception-v3 (AuxLogits / 1000-class fc), not "
                         f"the FID Inception; standard FID needs {FID_WEIGHTS_FILE} (docs/WEIGHTS.md)")
    expected = param_shapes()
    out, missing = {}, []
    for key, shape in expected.items():
        tk = torch_key(key)
        if tk not in sd:
            missing.append(f"{tk} {_torch_shape(key, shape)}")
            continue
        v = _to_numpy(sd[tk])
        if tuple(v.shape) != _torch_shape(key, shape):
            raise ValueError(f"{source}: key {tk!r} has shape {tuple(v.shape)}, expected {_torch_shape(key, shape)}")
        out[key] = np.ascontiguousarray(v.transpose(2, 3, 1, 0) if key.endswith("/kernel") else v, np.float32)
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} of {len(expected)} FID Inception tensors, e.g. "
                         f"{missing[:3]} (is it {FID_WEIGHTS_FILE}?)")
    used = {torch_key(k) for k in expected}
    extra = sorted(k for k in sd if k not in used and not _ignored_torch_key(k))
    if extra:
        raise ValueError(f"{source}: {len(extra)} tensors the FID Inception does not have, e.g. {extra[:3]}")
    return out


def check_params(flat: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """Validates our flat keys/shapes (what ``--convert`` writes); returns float32 arrays."""
    expected = param_shapes()
    missing = [f"{k} {s}" for k, s in expected.items() if k not in flat]
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} of {len(expected)} FID Inception tensors, e.g. "
                         f"{missing[:3]}")
    out = {}
    for k, s in expected.items():
        v = np.asarray(flat[k])
        if tuple(v.shape) != s:
            raise ValueError(f"{source}: key {k!r} has shape {tuple(v.shape)}, expected {s}")
        out[k] = v.astype(np.float32)
    extra = sorted(set(flat) - set(expected))
    if extra:
        raise ValueError(f"{source}: {len(extra)} tensors the FID Inception does not have, e.g. {extra[:3]}")
    return out


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor, without importing torch here
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _looks_torch(keys) -> bool:
    return any(k.endswith((".weight", ".running_mean")) for k in keys)


def _read_torch(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading a torch checkpoint needs torch (pip install -e '.[torch]'); or convert it "
                          f"once where torch exists: python -m uvjax.evaluation.inception --convert {path} "
                          f"--out inception_fid.safetensors") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a corrupt file or a pickle that weights_only refuses)
        raise ValueError(f"{path}: not a readable torch state dict ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return dict(obj)


def load_weights(path: str) -> dict[str, np.ndarray]:
    """Our flat float32 params from ``.pth``/``.pt`` (torch), ``.safetensors`` or ``.npz``."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weight file {path!r} not found; download {FID_WEIGHTS_FILE} yourself "
                                f"from {FID_WEIGHTS_URL} (see docs/WEIGHTS.md)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        try:
            with safe_open(path, framework="numpy") as f:
                flat = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    elif ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                flat = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    elif ext in (".pth", ".pt", ".bin", ".ckpt"):
        return convert_state_dict(_read_torch(path), path)
    else:
        raise ValueError(f"{path}: unknown weight file type {ext!r}; expected .pth/.pt (torch state dict), "
                         ".safetensors or .npz")
    return convert_state_dict(flat, path) if _looks_torch(flat) else check_params(flat, path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(flat: Mapping[str, np.ndarray], out: str, source: str = "") -> str:
    """Writes our flat params as ``.safetensors`` (with metadata) or ``.npz``."""
    flat = {k: np.ascontiguousarray(v, np.float32) for k, v in check_params(flat, "<params>").items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    ext = os.path.splitext(out)[1].lower()
    if ext == ".safetensors":
        meta = {"format": FORMAT, "source": os.path.basename(source)}
        if source and os.path.isfile(source):
            meta["source_sha256"] = file_sha256(source)
        save_file(flat, out, metadata=meta)
    elif ext == ".npz":
        np.savez(out, **flat)
    else:
        raise ValueError(f"{out}: output must end in .safetensors or .npz")
    return out


def convert(src: str, out: str) -> str:
    """The user's weight file (any accepted kind) -> ``out`` (.safetensors or .npz)."""
    return save_weights(load_weights(src), out, source=src)


# ------------------------------------------------------------------------------------- extraction
class InceptionFID:
    """Jitted, batched pool3 features: ``features(images) -> float32 [N, 2048]``.

    ``images``: uint8 NHWC (divided by 255) or float NHWC in [0, 1], any square or rectangular size;
    processed in fixed-size batches (the last one zero-padded) so one compile serves every batch."""

    def __init__(self, flat_params: Mapping[str, np.ndarray], batch_size: int = 32, source: str = ""):
        self.params = jax.device_put(unflatten_params(check_params(flat_params, source or "<params>")))
        self.batch_size = int(batch_size)
        self.source = source
        model = FIDInceptionV3()
        self._fn = jax.jit(lambda p, x: model.apply({"params": p}, x))

    @classmethod
    def load(cls, path: str, batch_size: int = 32) -> "InceptionFID":
        return cls(load_weights(path), batch_size=batch_size, source=os.path.abspath(os.path.expanduser(path)))

    def features(self, images) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images [N, H, W, 3], got shape {x.shape}")
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        n = len(x)
        if n == 0:
            return np.zeros((0, FEATURE_DIM), np.float32)
        bs = min(self.batch_size, n)
        out = []
        for i in range(0, n, bs):
            chunk = x[i:i + bs]
            k = len(chunk)
            if k < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - k,) + chunk.shape[1:], np.float32)])
            out.append(np.asarray(self._fn(self.params, chunk))[:k])
        return np.concatenate(out).astype(np.float32)


_CACHE: dict[tuple, InceptionFID] = {}


def get_extractor(path: str, batch_size: int = 32) -> InceptionFID:
    """:meth:`InceptionFID.load`, cached per (file, mtime, batch size): the train loop's repeated
    evaluations load and compile once."""
    p = os.path.abspath(os.path.expanduser(path))
    key = (p, os.path.getmtime(p) if os.path.exists(p) else None, int(batch_size))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = InceptionFID.load(p, batch_size)
    return _CACHE[key]


# ---------------------------------------------------------------------------------------------- FID
def fid_report(extractor: InceptionFID, generated, real) -> dict:
    """``generated_vs_real``: FID between the generated and the real images; ``real_vs_real``: FID
    between the two halves of the real images (a noise floor, at half the sample size per side, so it
    sits above the floor at ``n``); ``n``: generated images."""
    f_gen, f_real = extractor.features(generated), extractor.features(real)
    h = len(f_real) // 2
    return {"generated_vs_real": frechet_distance(f_gen, f_real),
            "real_vs_real": frechet_distance(f_real[:h], f_real[h:2 * h]) if h >= 2 else None,
            "n": len(f_gen), "n_real": len(f_real), "n_half": h, "feature_dim": FEATURE_DIM,
            "weights": extractor.source}


# ---------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m uvjax.evaluation.inception",
                                 description="Convert the FID Inception weights (pytorch-fid's "
                                             f"{FID_WEIGHTS_FILE}) to a torch-free .safetensors/.npz.")
    ap.add_argument("--convert", required=True, metavar="IN",
                    help="the weight file: .pth/.pt torch state dict, .safetensors or .npz")
    ap.add_argument("--out", required=True, help="output .safetensors or .npz")
    args = ap.parse_args(argv)
    try:
        out = convert(args.convert, args.out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {out}: {len(param_shapes())} tensors, FID Inception pool3 ({FEATURE_DIM}-d)")


if __name__ == "__main__":
    main()
