"""The image grids of an evaluation (real | generated | prompt) and VQ reconstructions, as PNG."""
from __future__ import annotations

import io
import textwrap
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uvjax import storage_paths as sp


def grid_image(rows: list[tuple[np.ndarray, np.ndarray | None, str]], cell: int = 128,
               text_w: int = 360) -> np.ndarray:
    """uint8 [H, W, 3]: one row per entry: image | image (None: a red "no image" box) | text. Height
    ``rows * (cell + 4) + 4``, width ``2 * (cell + 4) + text_w + 4`` (4 px padding)."""

    pad = 4
    H = len(rows) * (cell + pad) + pad
    W = 2 * (cell + pad) + text_w + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    for r, (real, gen, text) in enumerate(rows):
        y = pad + r * (cell + pad)
        for c, img in enumerate((real, gen)):
            x = pad + c * (cell + pad)
            if img is None:
                d.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(200, 0, 0))
                d.text((x + 8, y + cell // 2), "no image", fill=(200, 0, 0), font=font)
            else:
                canvas.paste(Image.fromarray(img).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        # wrapped to the text column (~7 px per character) and cut to the row's height (13 px a line)
        lines = [w for para in text.split("\n") for w in textwrap.wrap(para, max(20, text_w // 7))]
        d.multiline_text((2 * (cell + pad) + pad, y + 4), "\n".join(lines[:max(1, (cell + pad - 8) // 13)]),
                         fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _grid(rows: list[tuple[np.ndarray, np.ndarray | None, str]], path: str, cell: int = 128) -> np.ndarray:
    """PNG: one row per prompt: real render | generated image | prompt text. Returns its pixels."""
    img = grid_image(rows, cell)
    write_png(img, path)
    return img


def grid_cell(image_size: int) -> int:
    """The grids' cell size: the test image size, clamped to [64, 128] px."""
    return max(64, min(128, int(image_size)))


def vq_reconstruction_rows(records, encode_images: Callable, decode_codes: Callable, n: int) -> list | None:
    """(real, reconstructed, "<index>: PSNR x dB") for the first ``n`` distinct test images, through the run's
    VQ (encode, decode): how much of a generated image's blur the tokenizer alone explains. None when the
    encoder gives features (no pixel decoder)."""
    pix, ids, seen = [], [], set()
    for r in records:
        for s in r.images():
            if s.pixels is not None and id(s.pixels) not in seen and len(pix) < n:
                seen.add(id(s.pixels))
                pix.append(s.pixels)
                ids.append(r.id.rsplit("/", 2)[-2] if r.id.count("/") >= 2 else r.id)  # .../<index>/<task>
    if not pix:
        return []
    codes = np.asarray(encode_images(np.stack(pix)))
    if codes.dtype.kind not in "iu":
        return None
    recon = np.asarray(decode_codes(codes.reshape(len(pix), -1)))
    rows = []
    for real, rec, rid in zip(pix, recon, ids):
        text = rid
        if rec.shape == real.shape:
            mse = float(np.mean((real.astype(np.float64) - rec.astype(np.float64)) ** 2))
            text += f": PSNR {10 * np.log10(255.0 ** 2 / mse):.1f} dB" if mse > 0 else ": exact"
        rows.append((real, rec.astype(np.uint8), text))
    return rows


def write_png(image, path: str) -> None:
    """A PIL image or uint8 [H, W, 3] array as a PNG at a local path or a gs:// URL (one atomic write)."""

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    sp.atomic_write_bytes(path, buf.getvalue())
