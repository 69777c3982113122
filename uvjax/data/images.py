"""Images from files and bytes into the uint8 RGB arrays a tower encodes: read and checked (size limits,
decompression bombs, mode conversions counted), then resized the way the tower was trained (LlamaGen's
centre crop, CLIP's resize + crop, SigLIP's squash, LLaVA's pad-to-square)."""
from __future__ import annotations

import dataclasses
import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from uvjax import storage_paths as sp
from uvjax.data import storage

# CLIP's image mean (LLaVA pads with it), as uint8 RGB
CLIP_MEAN_RGB = (122, 116, 104)


# center_crop: LlamaGen/ADM (box halvings, bicubic short side, centre crop); resize_crop: CLIP's processor
# (bicubic short side, centre crop); squash: SigLIP's (bicubic to S x S, aspect not kept); pad: LLaVA's
# expand2square with the CLIP mean, then bicubic
RESIZE_MODES = ("center_crop", "resize_crop", "squash", "pad")


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """How images are read and checked. ``min_side``: smaller images (e.g. 1x1 placeholders) are
    refused; ``max_pixels``: larger ones are refused from the header, before decoding (bombs)."""
    min_side: int = 8
    max_pixels: int = storage.MAX_IMAGE_PIXELS
    max_bytes: int = 64 << 20


class ImageError(Exception):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _to_rgb(im) -> tuple[np.ndarray, str | None]:
    """A PIL image -> uint8 RGB and the source mode when it was converted (None for RGB)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, np.uint8), None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16/32-bit grey: scale to 8 bits, not clip
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(a.max()), 1.0)
        g = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1), mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")  # alpha: composite over white, as a viewer shows it
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"), np.uint8), mode
    return np.asarray(im.convert("RGB"), np.uint8), mode  # L, P, CMYK, YCbCr, 1, F ...


def read_image_file(full: str, policy: ImagePolicy) -> tuple[np.ndarray, str | None]:
    """Decodes one image file; raises :class:`ImageError` with a reason key. ``full`` may be a ``gs://`` URL
    (an image root in a bucket): its bytes are read through ``etils.epath``, with the same checks."""
    if sp.is_remote(full):
        try:
            size, _ = sp.remote_fingerprint(full)
        except (FileNotFoundError, IsADirectoryError):
            raise ImageError(f"image file {full!r} not found", "missing_image") from None
        if size > policy.max_bytes:
            raise ImageError(f"image file {full!r} is {size} bytes, more than {policy.max_bytes}", "oversized")
        try:
            data = sp.as_path(full).read_bytes()
        except FileNotFoundError:  # deleted in between
            raise ImageError(f"image file {full!r} not found", "missing_image") from None
        return decode_image(data, full, policy)
    if not os.path.isfile(full):
        raise ImageError(f"image file {full!r} not found", "missing_image")
    size = os.path.getsize(full)
    if size > policy.max_bytes:
        raise ImageError(f"image file {full!r} is {size} bytes, more than {policy.max_bytes}", "oversized")
    with open(full, "rb") as f:
        data = f.read()
    return decode_image(data, full, policy)


def decode_image(data: bytes, name: str, policy: ImagePolicy) -> tuple[np.ndarray, str | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > policy.max_pixels:
                    raise ImageError(f"image {name!r} is {w}x{h} pixels, more than the {policy.max_pixels} "
                                     "allowed (decompression bomb?); refused", "oversized")
                if min(w, h) < policy.min_side:
                    raise ImageError(f"image {name!r} is {w}x{h} pixels, smaller than min_side="
                                     f"{policy.min_side}", "too_small")
                im.load()
                return _to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {name!r}: {e}", "oversized") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"image {name!r} is corrupt, truncated or not an image ({type(e).__name__}: {e})",
                         "corrupt_image") from e


def preprocess(img: np.ndarray, size: int, mode: str = "center_crop", fill=CLIP_MEAN_RGB) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]. ``center_crop``: box-downsample while the short side is
    at least twice ``size``, bicubic-resize the short side to ``size``, crop the centre (LlamaGen's
    preprocessing, from ADM). ``resize_crop``: the same without the box steps (CLIP's processor).
    ``squash``: bicubic to ``size`` x ``size`` (SigLIP's). ``pad``: pad to a square with ``fill`` (LLaVA's
    ``expand2square``), then bicubic-resize."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}; expected one of {RESIZE_MODES}")
    im = Image.fromarray(img)
    if mode == "squash":
        return np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC), np.uint8)
    if mode == "pad":
        w, h = im.size
        if w != h:
            s = max(w, h)
            sq = Image.new("RGB", (s, s), tuple(int(v) for v in fill))
            sq.paste(im, ((s - w) // 2, (s - h) // 2))
            im = sq
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, np.uint8)
    while mode == "center_crop" and min(im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), Image.BOX)
    short = min(im.size)
    if mode == "resize_crop":  # CLIP's processor: the long side is floor(size * long / short), as HF computes it
        new_size = tuple(size if x == short else int(size * x / short) for x in im.size)
    else:  # ADM / LlamaGen round
        new_size = tuple(round(x * size / short) for x in im.size)
    im = im.resize(new_size, Image.BICUBIC)
    a = np.asarray(im, np.uint8)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return np.ascontiguousarray(a[top:top + size, left:left + size])
