"""The Smart Watch UI synthetic dataset, rendered by uvjax (no image files, no network).

Facts follow the reference notebook (224 px canvas, face of a uniformly random colour, three white
hands, a weather icon and a battery bar + percentage in two distinct corners, the same attribute
probabilities and template counts); phrasings are our own. Fixes of the reference's label noise:

- hours are 1..12 (the reference drew 0..12, and 0 and 12 look identical);
- every random choice comes from ``numpy`` generators seeded by ``(seed, image index)``, so image ``i``
  is the same whatever the number of images, and attributes do not depend on the text draws;
- the font is pinned (``ImageFont.load_default(size=...)`` of pillow 13.0.0) and sized so that the
  battery text is >= 9 px tall at the output size; the battery block is laid out inside the canvas
  (the reference clipped "100%" in the right-hand corners);
- drawing happens on the 224 px canvas, then one ``BOX`` (area-average) resize gives the output size:
  no ringing, no values outside the drawn range, identical for identical inputs.

Answers are plain strings re-derivable from ``Record.attributes`` (see :func:`answer`): weather
``sunny|cloudy|raining``; time ``HH:MM`` (``HH:MM:SS`` with ``time_seconds=True``; hours ``01``..``12``);
battery ``NN%`` (no zero padding, ``0%``..``100%``); corners ``top-left|top-right|bottom-left|bottom-right``.
The phrasings live in ``smartwatch_phrasings.py``; task tags and streams in ``tasks.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uvjax.data import storage
from uvjax.data.records import Record, Segment
from uvjax.data.smartwatch_phrasings import (
    CAPTION_PREFIXES,
    CAPTION_QUESTIONS,
    FRAGMENTS,
    GENERATION_ANSWERS,
    GENERATION_PREFIXES,
    QUESTIONS,
)
from uvjax.data.tasks import SMARTWATCH_TASKS, STREAMS, stream_of

CANVAS = 224
WEATHERS = ("sunny", "cloudy", "raining")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
VQA_ATTRIBUTES = ("weather", "time", "battery", "weather_pos", "battery_pos")
# Caption / generation fragment order (sentence order) and inclusion probabilities (time always).
FRAGMENT_ORDER = ("time", "weather", "battery", "weather_pos", "battery_pos")
FRAGMENT_PROB = {"time": 1.0, "weather": 0.5, "battery": 0.5, "weather_pos": 0.5, "battery_pos": 0.5}
EXTRA_TURN_TRIALS, EXTRA_TURN_PROB = 3, 0.4  # turns per VQA record = 1 + Binomial(3, 0.4)


# ----------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class SmartWatchSpec:
    """One split. Images are indices ``start_index .. start_index+num_images-1`` under ``seed``.

    Train and test differ by index range (default test ``start_index`` 10**9), so they never share an
    image stream. ``understanding_fraction`` / ``generation_fraction`` keep the vqa+caption /
    generation records of an image when that image's own uniform draw is below the fraction, so a
    smaller subset is always contained in a larger one (data-scaling curves). ``understanding_keep``
    maps an attribute to a keep rate r: in *understanding* records a VQA turn about it and a caption
    fragment mentioning it survive with probability r (a record left without turns is dropped);
    generation records stay complete (knowledge-transfer experiment).
    """
    name: str = "train"
    seed: int = 0
    num_images: int = 1000
    start_index: int = 0
    image_size: int = 128
    time_seconds: bool = False
    understanding_fraction: float = 1.0
    generation_fraction: float = 1.0
    understanding_keep: tuple[tuple[str, float], ...] = ()
    tasks: tuple[str, ...] = SMARTWATCH_TASKS
    # the share of generation prompts that name every attribute (time, weather, battery and both corners)
    # instead of a random subset (time always, the others with probability 0.5 each): a lever of issue #30.
    # True = 1.0; between 0 and 1 a per-image coin of its own stream decides (the other draws never shift)
    generation_mention_all: float = 0.0
    # the generation answer spells out the image's layout before the image (``plan_text``): the weather and
    # its corner, the battery and its corner. A prompt that names a subset leaves the model to choose the
    # others in text first, so every image it draws follows a full specification (UnifiedVisual's point:
    # text written before an image guides it). A lever of issue #30; it replaces the canned answer.
    generation_plan: bool = False

    def __post_init__(self):
        for k, r in self.understanding_keep:
            if k not in VQA_ATTRIBUTES or not 0.0 <= r <= 1.0:
                raise ValueError(f"understanding_keep entry ({k!r}, {r}) must name one of "
                                 f"{VQA_ATTRIBUTES} with a rate in [0, 1]")
        for t in self.tasks:
            if t not in SMARTWATCH_TASKS:
                raise ValueError(f"unknown Smart Watch task {t!r}")
        if not 0.0 <= float(self.generation_mention_all) <= 1.0:
            raise ValueError(f"generation_mention_all {self.generation_mention_all!r}: expected a share in [0, 1]")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size {self.image_size} outside 16..1024")


def spec_from_config(cfg: Any, name: str) -> SmartWatchSpec:
    """Builds a split spec from a ConfigDict/dict with keys named like the dataclass fields."""
    d = dict(cfg)
    keep = d.pop("understanding_keep", {}) or {}
    keep = tuple(sorted(dict(keep).items()))
    d.pop("name", None)
    fields = {f.name for f in dataclasses.fields(SmartWatchSpec)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"unknown Smart Watch split keys {sorted(unknown)}; expected {sorted(fields)}")
    if "tasks" in d:
        d["tasks"] = tuple(d["tasks"])
    return SmartWatchSpec(name=name, understanding_keep=keep, **d)


def default_splits(seed: int = 0, num_train: int = 4000, num_test: int = 500,
                   image_size: int = 128) -> dict[str, SmartWatchSpec]:
    return {"train": SmartWatchSpec("train", seed, num_train, 0, image_size),
            "test": SmartWatchSpec("test", seed, num_test, 10**9, image_size)}


# ----------------------------------------------------------------------------------------- attributes
def _rngs(seed: int, index: int) -> tuple[np.random.Generator, ...]:
    """Independent streams of one image: (attributes, subset selection, vqa, caption, generation,
    prompt kind), so a config that changes one record (bias, subsets) never shifts the draws of another.
    (``SeedSequence.spawn`` numbers its children, so the first five are the same as when there were five.)"""
    ss = np.random.SeedSequence([int(seed), int(index)])
    return tuple(np.random.default_rng(s) for s in ss.spawn(6))


def sample_attributes(rng: np.random.Generator) -> dict[str, Any]:
    corners = rng.choice(len(CORNERS), size=2, replace=False)
    return {
        "hour": int(rng.integers(1, 13)),
        "minute": int(rng.integers(0, 60)),
        "second": int(rng.integers(0, 60)),
        "weather": WEATHERS[int(rng.integers(0, 3))],
        "battery": int(rng.integers(0, 101)),
        "weather_pos": CORNERS[int(corners[0])],
        "battery_pos": CORNERS[int(corners[1])],
        "face_color": [int(x) for x in rng.integers(0, 256, size=3)],
    }


def answer(attribute: str, attrs: dict[str, Any], time_seconds: bool = False) -> str:
    """The ground-truth answer string of one attribute (what VQA targets and evaluation compare)."""
    if attribute == "time":
        t = f"{attrs['hour']:02d}:{attrs['minute']:02d}"
        return t + f":{attrs['second']:02d}" if time_seconds else t
    if attribute == "battery":
        return f"{attrs['battery']}%"
    if attribute in ("weather", "weather_pos", "battery_pos"):
        return str(attrs[attribute])
    raise ValueError(f"unknown attribute {attribute!r}; expected one of {VQA_ATTRIBUTES}")


def plan_text(attrs: dict[str, Any]) -> str:
    """The layout written before a generated image (``generation_plan``): one fixed template, no
    phrasing variants, so what varies in it is only the attributes themselves."""
    return (f"Layout: {attrs['weather']} weather at the {attrs['weather_pos']}, "
            f"battery {attrs['battery']}% at the {attrs['battery_pos']}.")


# ----------------------------------------------------------------------------------------- rendering
def _corner_xy(corner: str, w: int, h: int, margin: int = 8) -> tuple[int, int]:
    x = margin if corner.endswith("left") else CANVAS - margin - w
    y = margin if corner.startswith("top") else CANVAS - margin - h
    return x, y


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def _font_px(image_size: int) -> int:
    """Canvas font size so the digits are >= ~9 output pixels tall (legible after the resize)."""
    return max(10, math.ceil(9 * CANVAS / image_size))


def _draw_sun(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    for k in range(8):
        a = k * math.pi / 4
        d.line([(cx + 1.3 * r * math.cos(a), cy + 1.3 * r * math.sin(a)),
                (cx + 1.9 * r * math.cos(a), cy + 1.9 * r * math.sin(a))],
               fill=(255, 170, 0), width=max(1, round(r / 3)))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 200, 0), outline=(235, 140, 0))


def _draw_cloud(d: ImageDraw.ImageDraw, x: float, y: float, s: float, color) -> None:
    """A cloud of three overlapping discs on a flat base, inside the box (x, y, x+s, y+0.6s)."""
    d.ellipse([x, y + 0.25 * s, x + 0.45 * s, y + 0.6 * s], fill=color)
    d.ellipse([x + 0.2 * s, y, x + 0.7 * s, y + 0.5 * s], fill=color)
    d.ellipse([x + 0.5 * s, y + 0.15 * s, x + s, y + 0.6 * s], fill=color)
    d.rectangle([x + 0.2 * s, y + 0.35 * s, x + 0.8 * s, y + 0.6 * s], fill=color)


def draw_weather_icon(d: ImageDraw.ImageDraw, weather: str, x: int, y: int, s: int) -> None:
    """Procedural icons in an s x s box: sun; sun behind a light cloud; dark cloud with blue drops."""
    if weather == "sunny":
        _draw_sun(d, x + s / 2, y + s / 2, s * 0.24)
    elif weather == "cloudy":
        _draw_sun(d, x + s * 0.62, y + s * 0.36, s * 0.17)
        _draw_cloud(d, x, y + s * 0.3, s, (200, 200, 205))
    elif weather == "raining":
        _draw_cloud(d, x, y, s, (95, 95, 105))
        for k in range(3):
            dx = x + s * (0.25 + 0.25 * k)
            d.line([(dx, y + s * 0.68), (dx - s * 0.08, y + s * 0.95)], fill=(30, 100, 230),
                   width=max(1, round(s / 12)))
    else:
        raise ValueError(f"unknown weather {weather!r}; expected one of {WEATHERS}")


def battery_block_size(font_px: int) -> tuple[int, int, int, int]:
    """(block width, block height, bar width, bar height); width fits the widest label '100%'."""
    font = _font(font_px)
    text_w = font.getbbox("100%")[2]
    bar_w, bar_h = round(1.7 * font_px), round(0.75 * font_px)
    return bar_w + 3 + text_w, font_px, bar_w, bar_h


def render(attrs: dict[str, Any], image_size: int = 128) -> np.ndarray:
    """Draws one watch as uint8 [image_size, image_size, 3]."""
    img = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    d = ImageDraw.Draw(img)
    c, radius = CANVAS / 2, int(0.4 * CANVAS)
    d.ellipse([c - radius, c - radius, c + radius, c + radius], fill=tuple(attrs["face_color"]))
    h, m, s = attrs["hour"], attrs["minute"], attrs["second"]
    for deg, frac, width in (((h % 12 + m / 60) * 30 - 90, 0.5, 6), (m * 6 - 90, 0.7, 4),
                             (s * 6 - 90, 0.9, 2)):
        a = math.radians(deg)
        d.line([(c, c), (c + frac * radius * math.cos(a), c + frac * radius * math.sin(a))],
               fill=(255, 255, 255), width=width)
    fpx = _font_px(image_size)
    icon = max(30, round(2.0 * fpx))
    x, y = _corner_xy(attrs["weather_pos"], icon, icon)
    draw_weather_icon(d, attrs["weather"], x, y, icon)
    bw, bh, bar_w, bar_h = battery_block_size(fpx)
    x, y = _corner_xy(attrs["battery_pos"], bw, bh)
    by = y + (bh - bar_h) // 2
    d.rectangle([x, by, x + bar_w, by + bar_h], outline=(0, 0, 0), width=1)
    fill_w = round((bar_w - 4) * attrs["battery"] / 100)
    if fill_w > 0:  # 0% shows an empty bar (the reference still drew a 1-px column)
        d.rectangle([x + 2, by + 2, x + 1 + fill_w, by + bar_h - 2], fill=(40, 190, 60))
    d.text((x + bar_w + 3, y + bh / 2), f"{attrs['battery']}%", fill=(0, 0, 0), font=_font(fpx),
           anchor="lm")
    if image_size != CANVAS:
        img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


# ----------------------------------------------------------------------------------------- text
def _sentence(prefix: str, attrs: dict[str, Any], chosen: list[str], rng: np.random.Generator,
              time_seconds: bool) -> str:
    parts = [prefix]
    for k in chosen:
        tmpl = FRAGMENTS[k][int(rng.integers(len(FRAGMENTS[k])))]
        parts.append(tmpl.format(v=answer(k, attrs, time_seconds)))
    text = "".join(parts).strip()
    return text[0].upper() + text[1:] + "."


def _choose_fragments(rng: np.random.Generator, keep: dict[str, float]) -> list[str]:
    chosen = []
    for k in FRAGMENT_ORDER:
        # Draw every coin even when the rate is 0/1 so the stream position never depends on config.
        inc = rng.random() < FRAGMENT_PROB[k]
        kept = rng.random() < keep.get(k, 1.0)
        if inc and kept:
            chosen.append(k)
    return chosen


def records_for_image(index: int, spec: SmartWatchSpec) -> tuple[dict[str, Any], list[Record]]:
    """All records of one image (order vqa, caption, generation), after subset/bias rules."""
    a_rng, s_rng, v_rng, c_rng, g_rng, m_rng = _rngs(spec.seed, index)
    attrs = sample_attributes(a_rng)
    u_draw, g_draw = s_rng.random(2)
    pixels = render(attrs, spec.image_size)
    keep = dict(spec.understanding_keep)
    ts = spec.time_seconds
    base = {**attrs, "index": int(index), "split": spec.name, "image_size": spec.image_size,
            "time_seconds": ts}
    rid = f"smartwatch/{spec.name}/{index}"
    out: list[Record] = []
    n_turns = 1 + int(v_rng.binomial(EXTRA_TURN_TRIALS, EXTRA_TURN_PROB))
    turns = []
    for _ in range(n_turns):
        att = VQA_ATTRIBUTES[int(v_rng.integers(len(VQA_ATTRIBUTES)))]
        q = QUESTIONS[att][int(v_rng.integers(len(QUESTIONS[att])))]
        if v_rng.random() < keep.get(att, 1.0):
            turns.append((att, q))
    cap_q = CAPTION_QUESTIONS[int(c_rng.integers(len(CAPTION_QUESTIONS)))]
    cap_prefix = CAPTION_PREFIXES[int(c_rng.integers(len(CAPTION_PREFIXES)))]
    cap_chosen = _choose_fragments(c_rng, keep)
    cap_text = _sentence(cap_prefix, attrs, cap_chosen, c_rng, ts)
    gen_prefix = GENERATION_PREFIXES[int(g_rng.integers(len(GENERATION_PREFIXES)))]
    gen_chosen = _choose_fragments(g_rng, {})  # drawn either way: the stream does not depend on the option
    share = float(spec.generation_mention_all)
    if share >= 1.0 or (share > 0.0 and m_rng.random() < share):
        gen_chosen = list(FRAGMENT_ORDER)
    gen_text = _sentence(gen_prefix, attrs, gen_chosen, g_rng, ts)
    gen_ans = GENERATION_ANSWERS[int(g_rng.integers(len(GENERATION_ANSWERS)))]
    if spec.generation_plan:  # drawn above either way: the other records never shift
        gen_ans = plan_text(attrs)

    und = u_draw < spec.understanding_fraction
    if und and "vqa" in spec.tasks and turns:
        segs = [Segment("user", "image", pixels=pixels)]
        for att, q in turns:
            segs += [Segment("user", "text", text=q),
                     Segment("assistant", "text", text=answer(att, attrs, ts))]
        out.append(Record(f"{rid}/vqa", "vqa", segs, {**base, "questions": [t[0] for t in turns]}))
    if und and "caption" in spec.tasks:
        out.append(Record(f"{rid}/caption", "caption",
                          [Segment("user", "image", pixels=pixels), Segment("user", "text", text=cap_q),
                           Segment("assistant", "text", text=cap_text)],
                          {**base, "mentioned": cap_chosen}))
    if g_draw < spec.generation_fraction and "generation" in spec.tasks:
        out.append(Record(f"{rid}/generation", "generation",
                          [Segment("user", "text", text=gen_text),
                           Segment("assistant", "text", text=gen_ans),
                           Segment("assistant", "image", pixels=pixels)],
                          {**base, "mentioned": gen_chosen}))
    return attrs, out


def generate(spec: SmartWatchSpec, start: int = 0, stop: int | None = None) -> Iterator[Record]:
    """Records of images ``spec.start_index + [start, stop)`` in index order."""
    stop = spec.num_images if stop is None else min(stop, spec.num_images)
    for i in range(start, stop):
        yield from records_for_image(spec.start_index + i, spec)[1]


def corpus_texts(spec: SmartWatchSpec, num_images: int = 2000) -> Iterator[str]:
    """Text for training the BPE: every template phrasing plus the text of ``num_images`` images."""
    yield from (q for qs in QUESTIONS.values() for q in qs)
    yield from (f for fs in FRAGMENTS.values() for f in fs)
    yield from CAPTION_PREFIXES + GENERATION_PREFIXES + CAPTION_QUESTIONS + GENERATION_ANSWERS
    small = dataclasses.replace(spec, image_size=16)  # text does not depend on pixels; render cheap
    for rec in generate(small, 0, num_images):
        for s in rec.segments:
            if s.kind == "text":
                yield s.text  # type: ignore[misc]


def write_split(spec: SmartWatchSpec, out_dir: str, records_per_shard: int = 2000,
                records: Iterable[Record] | None = None) -> dict[str, list[str]]:
    """Writes the split as ArrayRecord shards, one file set per stream (``tasks.stream_of``):
    ``{out_dir}/{spec.name}-understanding-00000.array_record`` and ``...-generation-...``."""
    writers = {s: storage.ShardWriter(out_dir, f"{spec.name}-{s}", records_per_shard) for s in STREAMS}
    try:
        for rec in (generate(spec) if records is None else records):
            writers[stream_of(rec)].write(rec)
    finally:
        paths = {s: w.close() for s, w in writers.items()}
    return {s: p for s, p in paths.items() if p}
