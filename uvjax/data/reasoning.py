"""UnifiedVisual's idea (reasoning written into generation) made procedural for the Smart Watch world.

UnifiedVisual's generation subsets put a rationale between the request and the image, and its
reasoning subsets put a generated image inside the answer chain. Here the same four shapes are built
offline from the Smart Watch attribute model, so every inference step is checkable:

- ``gen_reasoning``: an indirect prompt ("two hours after 10:15", "the weather that needs an
  umbrella", "20 points short of full", "the battery in the top-left corner and the weather icon
  diagonally opposite it") -> rationale deriving each attribute -> the watch;
- ``edit``: a watch (user image) + an instruction ("move the battery to the bottom-left", "it starts
  raining") -> rationale -> the edited watch, differing from the input only in the edited attribute;
- ``correct``: a watch contradicting its description -> what is wrong -> the corrected watch;
- ``mm_reasoning``: a watch + a question about another moment ("what will it show in 45 minutes?")
  -> rationale -> the generated watch -> the final text answer.

Phrasings are our own, several per shape (``reasoning_phrasings.py``). ``rationale=False`` drops
exactly the rationale text segments (every random draw still happens), so prompts and images are
identical for the ablation.
Every record stores the attributes of every image it contains (``attributes["images"]``, in segment
order: ``{"role", "attributes"}``) so an evaluator can check inferred attributes;
``attributes["rationale_segments"]`` lists the indices of rationale segments; per task, ``mentioned``
(gen_reasoning: which of time/weather/battery/positions the prompt constrains), ``kind`` + ``edited``
(edit), ``kind`` + ``wrong`` (correct), ``kind`` + ``answer`` (mm_reasoning). All records belong to
the pipeline's ``interleaved`` stream.

Times use the 12-hour dial of the generator (hours 1..12), written ``HH:MM``; arithmetic wraps on the
dial (two hours after 11:30 is 01:30). Seconds never change in an edit.

(Over 400 lines on purpose: the four shapes share the clue helpers and one seeded-stream discipline,
and are checked side by side; the phrasings are apart in ``reasoning_phrasings.py``.)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator

import numpy as np

from uvjax.data import smartwatch as sw
from uvjax.data import storage
from uvjax.data.reasoning_phrasings import (
    CORRECT_ASKS,
    CORRECT_CLOSINGS,
    DESCRIPTIONS,
    EDIT_CLOSINGS,
    EDIT_INSTRUCTIONS,
    GEN_PREFIXES,
    MM_BRIDGES,
    MM_QUESTIONS,
    POSITION_FRAMES,
    RATIONALE_OPENERS,
    RELATION_TEXT,
    SUMMARY_LEADS,
    TIME_FRAMES,
    WEATHER_CLUES,
    WEATHER_FRAMES,
)
from uvjax.data.records import Record, Segment
from uvjax.data.tasks import REASONING_TASKS

TASKS = REASONING_TASKS
STREAM = "interleaved"
CORNER_RC = {"top-left": (0, 0), "top-right": (0, 1), "bottom-left": (1, 0), "bottom-right": (1, 1)}
RC_CORNER = {v: k for k, v in CORNER_RC.items()}
DURATIONS = (10, 15, 20, 25, 30, 40, 45, 50, 60, 75, 90, 120, 150, 180, 240, 300)
_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
ELEMENT_NAMES = {"battery": "battery", "weather": "weather icon"}

# ------------------------------------------------------------------------------------- spec
@dataclasses.dataclass(frozen=True)
class ReasoningSpec:
    """One split: scenes ``start_index .. start_index+num_scenes-1`` under ``seed``, one record per
    scene and task. ``rationale=False`` is the ablation (same prompts and images, no rationales)."""
    name: str = "train"
    seed: int = 0
    num_scenes: int = 1000
    start_index: int = 0
    image_size: int = 128
    rationale: bool = True
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self):
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown reasoning task {t!r}; expected one of {TASKS}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size {self.image_size} outside 16..1024")


# ------------------------------------------------------------------------------------- attribute helpers
def dial_minutes(attrs: dict[str, Any]) -> int:
    """Minutes past 12:00 on the 12-hour dial (0..719)."""
    return (attrs["hour"] % 12) * 60 + attrs["minute"]


def clock(minutes: int) -> str:
    m = minutes % 720
    return f"{(m // 60) or 12:02d}:{m % 60:02d}"


def with_time(attrs: dict[str, Any], minutes: int) -> dict[str, Any]:
    m = minutes % 720
    return {**attrs, "hour": (m // 60) or 12, "minute": m % 60}


def duration_text(minutes: int, variant: int) -> str:
    """A duration in words; ``variant`` picks among equivalent phrasings."""
    h, m = divmod(minutes, 60)
    if minutes == 15:
        forms = ["15 minutes", "a quarter of an hour"]
    elif minutes == 30:
        forms = ["30 minutes", "half an hour"]
    elif minutes == 45:
        forms = ["45 minutes", "three quarters of an hour"]
    elif minutes < 60:
        forms = [f"{minutes} minutes"]
    elif minutes == 60:
        forms = ["one hour", "an hour"]
    elif minutes == 90:
        forms = ["an hour and a half", "one hour and 30 minutes"]
    elif m == 0:
        forms = [f"{_WORDS[h]} hours"]
    else:
        forms = [f"{_WORDS[h]} hour{'s' if h > 1 else ''} and {m} minutes"]
    return forms[variant % len(forms)]


def relation(a: str, b: str) -> str:
    """Where corner ``b`` lies relative to corner ``a`` (distinct corners)."""
    (ra, ca), (rb, cb) = CORNER_RC[a], CORNER_RC[b]
    if ra == rb:
        return "right" if cb > ca else "left"
    if ca == cb:
        return "below" if rb > ra else "above"
    return "diagonal"


def attribute_diff(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _free_corners(attrs: dict[str, Any]) -> list[str]:
    return [c for c in sw.CORNERS if c not in (attrs["weather_pos"], attrs["battery_pos"])]


def _summary(attrs: dict[str, Any], mentioned: list[str]) -> str:
    parts = [sw.answer("time", attrs)]
    if "weather" in mentioned:
        parts.append(f"{attrs['weather']} weather")
    if "battery" in mentioned:
        parts.append(f"the battery at {attrs['battery']}%")
    if "positions" in mentioned:
        parts.append(f"the weather icon in the {attrs['weather_pos']} corner with the battery in the "
                     f"{attrs['battery_pos']} corner")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + (", and " if len(parts) > 2 else " and ") + parts[-1]


# ------------------------------------------------------------------------------------- the four shapes
class _Builder:
    """Collects segments + per-image attributes; rationale segments are dropped when disabled."""

    def __init__(self, rationale: bool, image_size: int):
        self.rationale, self.size = rationale, image_size
        self.segments: list[Segment] = []
        self.images: list[dict[str, Any]] = []
        self.rationale_segments: list[int] = []
        self.rationale_text: list[str] = []

    def text(self, role: str, text: str, *, is_rationale: bool = False) -> None:
        if is_rationale:
            self.rationale_text.append(text)
            if not self.rationale:
                return
            self.rationale_segments.append(len(self.segments))
        self.segments.append(Segment(role, "text", text=text))

    def image(self, role: str, attrs: dict[str, Any]) -> None:
        self.segments.append(Segment(role, "image", pixels=sw.render(attrs, self.size)))
        self.images.append({"role": role, "attributes": dict(attrs)})

    def record(self, rid: str, task: str, base: dict[str, Any], **extra) -> Record:
        attrs = {**base, "task": task, "rationale": self.rationale, "images": self.images,
                 "rationale_segments": self.rationale_segments, **extra}
        if self.rationale:
            attrs["rationale_text"] = self.rationale_text
        return Record(rid, task, self.segments, attrs).validate()


def _time_clue(rng, target: dict[str, Any]) -> tuple[str, str]:
    """(prompt clause, rationale sentence) for the target's time, given relative to another time."""
    d = int(_pick(rng, DURATIONS))
    after = bool(rng.integers(2))
    dtext = duration_text(d, int(rng.integers(2)))
    t = dial_minutes(target)
    base = clock(t - d if after else t + d)
    word = "after" if after else "before"
    frame = _pick(rng, TIME_FRAMES)
    return (f" {frame} {dtext} {word} {base}",
            f"{dtext[0].upper() + dtext[1:]} {word} {base} is {clock(t)}.")


def _weather_clue(rng, weather: str) -> tuple[str, str]:
    clue = _pick(rng, WEATHER_CLUES[weather])
    frame = _pick(rng, WEATHER_FRAMES)
    return frame.format(c=clue), f"{clue[0].upper() + clue[1:]} means the {weather} icon."


def _battery_clue(rng, b: int) -> tuple[str, str]:
    kinds = []
    if b < 100:
        kinds.append("short")
    else:
        kinds.append("full")
    if 0 < b <= 50:
        kinds.append("half")
    if b >= 5:
        kinds.append("plus")
    kind = _pick(rng, kinds)
    k = int(rng.integers(1, min(b, 30) + 1)) if b >= 1 else 0  # drawn always: stable streams
    if kind == "short":
        expr = f"{100 - b} points short of full"
    elif kind == "full":
        expr = "completely full"
    elif kind == "half":
        expr = f"half of {2 * b}%"
    else:
        expr = f"{b - k}% plus {k} points"
    return f", with the battery {expr}", f"{expr[0].upper() + expr[1:]} is {b}%."


def _position_clue(rng, attrs: dict[str, Any]) -> tuple[str, str]:
    anchor = _pick(rng, ("battery", "weather"))
    other = "weather" if anchor == "battery" else "battery"
    ca, cb = attrs[f"{anchor}_pos"], attrs[f"{other}_pos"]
    rel = RELATION_TEXT[relation(ca, cb)]
    a, b = ELEMENT_NAMES[anchor], ELEMENT_NAMES[other]
    frame = _pick(rng, POSITION_FRAMES)
    return (frame.format(a=a, ca=ca, b=b, rel=rel),
            f"The {a} sits in the {ca} corner, and the {b}, {rel}, goes in the {cb} corner.")


def gen_reasoning_record(rng, rid: str, base: dict[str, Any], spec: ReasoningSpec) -> Record:
    """Indirect prompt -> rationale -> watch. Time always; weather, battery and the corner pair each
    with probability 1/2 (like the plain generation prompts)."""
    target = sw.sample_attributes(rng)
    coins = rng.random(3) < 0.5
    mentioned = ["time"] + [k for k, c in zip(("weather", "battery", "positions"), coins) if c]
    prefix = _pick(rng, GEN_PREFIXES)
    clauses, steps = [], []
    for k in mentioned:
        if k == "time":
            c, s = _time_clue(rng, target)
        elif k == "weather":
            c, s = _weather_clue(rng, target["weather"])
        elif k == "battery":
            c, s = _battery_clue(rng, target["battery"])
        else:
            c, s = _position_clue(rng, target)
        clauses.append(c)
        steps.append(s)
    opener, lead = _pick(rng, RATIONALE_OPENERS), _pick(rng, SUMMARY_LEADS)
    b = _Builder(spec.rationale, spec.image_size)
    b.text("user", prefix + "".join(clauses) + ".")
    b.text("assistant", " ".join([opener, *steps, f"{lead} {_summary(target, mentioned)}."]),
           is_rationale=True)
    b.image("assistant", target)
    return b.record(rid, "gen_reasoning", base, mentioned=mentioned)


def edit_record(rng, rid: str, base: dict[str, Any], spec: ReasoningSpec) -> Record:
    """Watch + instruction -> rationale -> the watch with exactly the edited attribute changed."""
    src = sw.sample_attributes(rng)
    kind = _pick(rng, ("move_battery", "move_weather", "weather", "time", "battery"))
    variant = int(rng.integers(3))
    closing = _pick(rng, EDIT_CLOSINGS)
    out = dict(src)
    if kind in ("move_battery", "move_weather"):
        elem = "battery" if kind == "move_battery" else "weather"
        corner = _pick(rng, _free_corners(src))
        out[f"{elem}_pos"] = corner
        instr = EDIT_INSTRUCTIONS[kind][variant].format(c=corner)
        why = (f"The {ELEMENT_NAMES[elem]} is in the {src[f'{elem}_pos']} corner now; the "
               f"{corner} corner is free, so it moves there.")
        edited = [f"{elem}_pos"]
    elif kind == "weather":
        new = _pick(rng, [w for w in sw.WEATHERS if w != src["weather"]])
        out["weather"] = new
        instr = EDIT_INSTRUCTIONS[f"weather_{new}"][variant]
        why = f"The watch shows {src['weather']} weather; after this change the icon becomes {new}."
        edited = ["weather"]
    elif kind == "time":
        d = int(_pick(rng, DURATIONS))
        forward = bool(rng.integers(2))
        dtext = duration_text(d, int(rng.integers(2)))
        t = dial_minutes(src)
        out = with_time(src, t + d if forward else t - d)
        instr = EDIT_INSTRUCTIONS["time_forward" if forward else "time_back"][variant].format(d=dtext)
        why = (f"The watch reads {clock(t)}; {dtext} {'later' if forward else 'earlier'} it is "
               f"{clock(dial_minutes(out))}.")
        edited = ["time"]
    else:
        b0 = src["battery"]
        modes = ([("drain", 5, b0)] if b0 >= 5 else []) + ([("charge", 5, 100 - b0)] if b0 <= 95 else [])
        mode, lo, hi = _pick(rng, modes)
        k = int(rng.integers(lo, min(hi, 40) + 1))
        out["battery"] = b0 - k if mode == "drain" else b0 + k
        instr = EDIT_INSTRUCTIONS[f"battery_{mode}"][variant].format(k=k)
        why = (f"The battery shows {b0}%; {'minus' if mode == 'drain' else 'plus'} {k} points gives "
               f"{out['battery']}%.")
        edited = ["battery"]
    b = _Builder(spec.rationale, spec.image_size)
    b.image("user", src)
    b.text("user", instr)
    b.text("assistant", f"{why} {closing}", is_rationale=True)
    b.image("assistant", out)
    return b.record(rid, "edit", base, kind=kind, edited=edited)


_CORRECT_KINDS = ("weather", "time", "battery", "battery_pos", "weather_pos", "swap")


def correct_record(rng, rid: str, base: dict[str, Any], spec: ReasoningSpec) -> Record:
    """A watch contradicting its (complete) description -> what is wrong -> the corrected watch."""
    good = sw.sample_attributes(rng)
    kind = _pick(rng, _CORRECT_KINDS)
    bad = dict(good)
    if kind == "weather":
        bad["weather"] = _pick(rng, [w for w in sw.WEATHERS if w != good["weather"]])
    elif kind == "time":
        shift = int(rng.integers(20, 701))  # at least 20 minutes off on the dial, either way
        bad = with_time(good, dial_minutes(good) + shift)
    elif kind == "battery":
        choices = [v for v in range(101) if abs(v - good["battery"]) >= 15]
        bad["battery"] = int(_pick(rng, choices))
    elif kind in ("battery_pos", "weather_pos"):
        bad[kind] = _pick(rng, _free_corners(good))
    else:
        bad["battery_pos"], bad["weather_pos"] = good["weather_pos"], good["battery_pos"]
    wrong = sorted(attribute_diff(good, bad))
    desc = _pick(rng, DESCRIPTIONS).format(time=sw.answer("time", good), weather=good["weather"],
                                           wp=good["weather_pos"], b=f"{good['battery']}%",
                                           bp=good["battery_pos"])
    ask, closing = _pick(rng, CORRECT_ASKS), _pick(rng, CORRECT_CLOSINGS)
    if kind == "weather":
        why = f"The description says {good['weather']} weather, but the watch shows {bad['weather']}."
    elif kind == "time":
        why = (f"The description says {clock(dial_minutes(good))}, but the hands show "
               f"{clock(dial_minutes(bad))}.")
    elif kind == "battery":
        why = f"The description says {good['battery']}% battery, but the watch shows {bad['battery']}%."
    elif kind == "swap":
        why = ("The weather icon and the battery have swapped places: the weather icon belongs in the "
               f"{good['weather_pos']} corner and the battery in the {good['battery_pos']} corner.")
    else:
        elem = ELEMENT_NAMES[kind[:-4]]
        why = (f"The {elem} should be in the {good[kind]} corner, but it is in the {bad[kind]} corner.")
    b = _Builder(spec.rationale, spec.image_size)
    b.image("user", bad)
    b.text("user", f"{desc} {ask}")
    b.text("assistant", f"{why} {closing}", is_rationale=True)
    b.image("assistant", good)
    return b.record(rid, "correct", base, kind=kind, wrong=wrong)


def mm_reasoning_record(rng, rid: str, base: dict[str, Any], spec: ReasoningSpec) -> Record:
    """Watch + question about another moment -> rationale -> generated watch -> final answer."""
    now = sw.sample_attributes(rng)
    kinds = ["future", "past"] + (["drain"] if now["battery"] >= 5 else [])
    kind = _pick(rng, kinds)
    q = _pick(rng, MM_QUESTIONS[kind])
    bridge = _pick(rng, MM_BRIDGES)
    t = dial_minutes(now)
    if kind in ("future", "past"):
        d = int(_pick(rng, DURATIONS))
        dtext = duration_text(d, int(rng.integers(2)))
        then = with_time(now, t + d if kind == "future" else t - d)
        question = q.format(d=dtext)
        when = "later it will be" if kind == "future" else "earlier it was"
        why = f"The watch reads {clock(t)} now; {dtext} {when} {clock(dial_minutes(then))}."
        final = sw.answer("time", then)
    else:
        hours = int(rng.integers(1, 4))  # battery >= 5 > hours, so at least 1 point per hour fits
        k = int(rng.integers(1, min(now["battery"] // hours, 30) + 1))
        dtext = duration_text(60 * hours, int(rng.integers(2)))
        then = with_time(now, t + 60 * hours)
        then["battery"] = now["battery"] - k * hours
        question = q.format(k=k, d=dtext)
        why = (f"The battery shows {now['battery']}% at {clock(t)}; after {dtext} it loses "
               f"{k * hours} points, so it reads {then['battery']}% at {clock(dial_minutes(then))}.")
        final = sw.answer("battery", then)
    b = _Builder(spec.rationale, spec.image_size)
    b.image("user", now)
    b.text("user", question)
    b.text("assistant", f"{why} {bridge}", is_rationale=True)
    b.image("assistant", then)
    b.text("assistant", final)
    return b.record(rid, "mm_reasoning", base, kind=kind, answer=final)


_BUILDERS = {"gen_reasoning": gen_reasoning_record, "edit": edit_record, "correct": correct_record,
             "mm_reasoning": mm_reasoning_record}


# ------------------------------------------------------------------------------------- generation and storage
def records_for_scene(index: int, spec: ReasoningSpec) -> list[Record]:
    """The records of one scene index, one per task of ``spec.tasks`` (in :data:`TASKS` order).
    Each task has its own random stream seeded by (seed, index, task), so the tasks selected and the
    rationale switch never change another record."""
    base = {"index": int(index), "split": spec.name, "image_size": spec.image_size}
    out = []
    for t_i, task in enumerate(TASKS):
        if task not in spec.tasks:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([int(spec.seed), int(index), 0x5EA5, t_i]))
        out.append(_BUILDERS[task](rng, f"reasoning/{spec.name}/{index}/{task}", base, spec))
    return out


def generate(spec: ReasoningSpec, start: int = 0, stop: int | None = None) -> Iterator[Record]:
    """Records of scenes ``spec.start_index + [start, stop)`` in index order."""
    stop = spec.num_scenes if stop is None else min(stop, spec.num_scenes)
    for i in range(start, stop):
        yield from records_for_scene(spec.start_index + i, spec)


def stream_of(record: Record) -> str:
    """Every reasoning record goes to the ``interleaved`` stream."""
    if record.task not in TASKS:
        raise ValueError(f"record {record.id!r}: task {record.task!r} is not a reasoning task {TASKS}")
    return STREAM


def corpus_texts(spec: ReasoningSpec, num_scenes: int = 500) -> Iterator[str]:
    """Text for training the BPE: the text of ``num_scenes`` scenes (rendered tiny: text does not
    depend on pixels)."""
    small = dataclasses.replace(spec, image_size=16, rationale=True)
    for rec in generate(small, 0, num_scenes):
        for s in rec.segments:
            if s.kind == "text":
                yield s.text  # type: ignore[misc]


def write_reasoning_split(spec: ReasoningSpec, out_dir: str, records_per_shard: int = 2000,
                          records: Iterable[Record] | None = None) -> dict[str, list[str]]:
    """Writes the split as ``{out_dir}/{spec.name}-interleaved-00000.array_record`` ... (the
    pipeline's interleaved stream); ``records`` replaces the generated ones (e.g. pre-tokenised)."""
    paths = storage.write_records(generate(spec) if records is None else records, out_dir,
                                  f"{spec.name}-{STREAM}", records_per_shard)
    return {STREAM: paths} if paths else {}
