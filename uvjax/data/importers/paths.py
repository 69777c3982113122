"""Images of untrusted data files: path safety (nothing outside the image folder is read), bounded
decoding of embedded image bytes, and :class:`ImageOptions` (an image reference -> an image segment)."""
from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from uvjax.data import storage
from uvjax.data.importers.common import DEFAULT_LIMITS, FormatError, Limits
from uvjax.data.records import Segment


def resolve_image_path(image_dir: str, rel: Any, where: str, *, check_files: bool = True) -> str:
    """The normalised relative path of an image inside ``image_dir``; refuses anything that could
    read outside it (absolute paths, ``..`` components, symlinks resolving outside)."""
    if not isinstance(rel, str) or not rel.strip():
        raise FormatError(where, f"image path must be a non-empty string, got {rel!r}", "bad_image")
    if "\x00" in rel:
        raise FormatError(where, f"image path {rel!r} contains a NUL byte", "path_escape")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise FormatError(where, f"absolute image path {rel!r} refused; expected a path relative to "
                                 f"the image folder {image_dir!r}", "path_escape")
    if ".." in re.split(r"[\\/]", rel):
        raise FormatError(where, f"image path {rel!r} contains '..' and could escape the image folder "
                                 f"{image_dir!r}; refused", "path_escape")
    norm = os.path.normpath(rel)
    if "://" in str(image_dir):  # an object store (gs://): no symlinks; the pre-tokenisation reads and checks it
        return norm.replace(os.sep, "/")
    root = os.path.realpath(image_dir or ".")
    full = os.path.realpath(os.path.join(root, norm))
    if os.path.commonpath([root, full]) != root:
        raise FormatError(where, f"image path {rel!r} resolves to {full!r}, outside the image folder "
                                 f"{root!r} (symlink?); refused", "path_escape")
    if check_files and not os.path.isfile(full):
        raise FormatError(where, f"image file {os.path.join(image_dir, norm)!r} not found "
                                 f"(record image path {rel!r})", "missing_image")
    return norm


def decode_image_bytes(data: bytes, where: str, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Encoded image bytes (PNG/JPEG ...) -> uint8 RGB, bounded in bytes and pixels."""
    if len(data) > limits.max_image_bytes:
        raise FormatError(where, f"embedded image of {len(data)} bytes exceeds max_image_bytes="
                                 f"{limits.max_image_bytes}", "oversized")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise FormatError(where, f"embedded image of {w}x{h} pixels exceeds max_image_pixels="
                                         f"{limits.max_image_pixels}", "oversized")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FormatError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FormatError(where, f"embedded image bytes are corrupt or not an image ({e})",
                          "bad_image") from e
    return storage.check_pixels(arr, where)


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How image references become segments. ``image_size`` (with ``load_pixels``) checks the
    decoded size; ``check_files`` makes a missing file a record error at import time."""
    image_dir: str = ""
    load_pixels: bool = False
    check_files: bool = True
    image_size: int | None = None

    def segment(self, role: str, ref: Any, where: str, limits: Limits) -> Segment:
        """``ref``: a relative path, encoded bytes, or an HF ``{"bytes", "path"}`` image struct."""
        if isinstance(ref, dict):
            data, path = ref.get("bytes"), ref.get("path")
            ref = data if data is not None else path
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return Segment(role, "image", pixels=decode_image_bytes(bytes(ref), where, limits))
        rel = resolve_image_path(self.image_dir, ref, where,
                                 check_files=self.check_files or self.load_pixels)
        if not self.load_pixels:
            return Segment(role, "image", path=rel)
        try:
            pixels = storage.load_image(rel, self.image_dir, where=where, size=self.image_size,
                                        convert=True, max_pixels=limits.max_image_pixels)
        except ValueError as e:
            raise FormatError(where, f"cannot load image {rel!r}: {e}", "bad_image") from e
        return Segment(role, "image", pixels=pixels)
