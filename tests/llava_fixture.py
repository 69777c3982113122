"""A LLaVA/ShareGPT4V-format dataset written the way another program would: plain JSON dicts from the
format's own spec (``id``, ``image``, ``conversations`` of ``from``/``value`` with the ``<image>\\n``
prefix, multi-turn, text-only items without ``image``) and PIL-written JPEG/PNG files of mixed sizes.
Nothing here uses uvjax, so a test on it checks uvjax against the format, not against itself."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (240, 210, 20)}
SHAPES = ("square", "circle")


def draw(color: str, shape: str, size: tuple[int, int], bg=(245, 245, 245)) -> Image.Image:
    w, h = size
    im = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(im)
    s = min(w, h)
    box = [w // 2 - s // 3, h // 2 - s // 3, w // 2 + s // 3, h // 2 + s // 3]
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    return im


def write_llava(root: str, n_images: int = 16, seed: int = 0, name: str = "data.json",
                sizes=((224, 224), (320, 240), (200, 300))) -> dict:
    """Writes ``root/images/*.{jpg,png}`` and ``root/<name>``; returns paths and the raw items."""
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(root, "images")
    os.makedirs(os.path.join(img_dir, "sub"), exist_ok=True)
    items = []
    for i in range(n_images):
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = sizes[i % len(sizes)]
        rel = f"sub/img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg"
        draw(color, shape, size).save(os.path.join(img_dir, rel))
        # VQA, two turns (the second turn has no <image>)
        items.append({"id": f"vqa-{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"},
            {"from": "gpt", "value": color},
            {"from": "human", "value": "Which shape is it?"},
            {"from": "gpt", "value": shape}]})
        # caption (no task key, as ShareGPT4V)
        items.append({"id": f"cap-{i}", "image": rel, "conversations": [
            {"from": "human", "value": "Describe the image briefly.\n<image>"},
            {"from": "gpt", "value": f"A {color} {shape} on a light grey background."}]})
        # text-to-image generation: the image in the gpt turn
        items.append({"id": f"gen-{i}", "image": rel, "task": "generation", "conversations": [
            {"from": "human", "value": f"Draw a {color} {shape}."},
            {"from": "gpt", "value": "<image>"}]})
    items.append({"id": "text-0", "conversations": [  # text only: no image key
        {"from": "human", "value": "How many sides does a square have?"},
        {"from": "gpt", "value": "Four."}]})
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump(items, f)
    return {"json": path, "images": img_dir, "items": items}
