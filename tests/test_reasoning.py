"""Procedural reasoning subsets: the clues in the text really determine the stored attributes.

Everything is re-derived here from the *text* with parsers written for this test (durations, clock
arithmetic, weather keywords, corner relations), never from the generator's structured fields.
"""
import dataclasses
import re

import numpy as np
import pytest

from uvjax.data import arrays, pipeline, storage
from uvjax.data import reasoning as R
from uvjax.data import smartwatch as sw
from uvjax.data.records import Segment
from uvjax.data.sequence import SequenceConfig, encode_record
from uvjax.data.tokenizer import get_template, template_texts, train_bpe

SIZE = 32
N = 60
CORNER = r"(top-left|top-right|bottom-left|bottom-right)"
WORDNUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
DUR = (r"(a quarter of an hour|half an hour|three quarters of an hour|an hour and a half|"
       r"(?:one|two|three|four|five|an) hours?(?: and \d+ minutes)?|\d+ minutes)")
WEATHER_WORDS = {"sunny": ("sunglasses", "clear", "beach"), "cloudy": ("overcast", "grey", "clouds hide"),
                 "raining": ("umbrella", "wet", "raincoat")}


def minutes_of(d):
    fixed = {"a quarter of an hour": 15, "half an hour": 30, "three quarters of an hour": 45,
             "an hour and a half": 90}
    if d in fixed:
        return fixed[d]
    m = re.fullmatch(r"(\d+) minutes", d)
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"(\w+) hours?(?: and (\d+) minutes)?", d)
    return 60 * WORDNUM[m.group(1)] + int(m.group(2) or 0)


def shift(hhmm, minutes):
    h, m = (int(x) for x in hhmm.split(":"))
    total = (h * 60 + m + minutes) % 720
    return "%02d:%02d" % (total // 60 or 12, total % 60)


def hhmm(a):
    return "%02d:%02d" % (a["hour"], a["minute"])


def corner_from(anchor, rel):
    row, col = anchor.split("-")
    flip = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
    return {"to its right": f"{row}-right", "to its left": f"{row}-left",
            "directly below it": f"bottom-{col}", "directly above it": f"top-{col}",
            "diagonally opposite it": f"{flip[row]}-{flip[col]}"}[rel]


def weather_in(text):
    hits = [w for w, words in WEATHER_WORDS.items() if any(re.search(rf"\b{k}", text) for k in words)]
    assert len(hits) == 1, (text, hits)
    return hits[0]


def battery_of(expr):
    for pat, f in ((r"(\d+) points short of full", lambda m: 100 - int(m[1])),
                   (r"half of (\d+)%", lambda m: int(m[1]) // 2), (r"completely full", lambda m: 100),
                   (r"(\d+)% plus (\d+) points", lambda m: int(m[1]) + int(m[2]))):
        m = re.fullmatch(pat, expr)
        if m:
            return f(m)
    raise AssertionError(expr)


def texts(rec, role):
    return [s.text for s in rec.segments if s.kind == "text" and s.role == role]


def image_attrs(rec):
    imgs = rec.attributes["images"]
    assert [(i["role"]) for i in imgs] == [s.role for s in rec.segments if s.kind == "image"]
    return [i["attributes"] for i in imgs]


def check_pixels_rerender(rec):
    for seg, a in zip(rec.images(), image_attrs(rec), strict=True):
        np.testing.assert_array_equal(seg.pixels, sw.render(a, SIZE))


@pytest.fixture(scope="module")
def recs():
    spec = R.ReasoningSpec(seed=5, num_scenes=N, image_size=SIZE)
    return {t: [r for r in R.generate(spec) if r.task == t] for t in R.TASKS}


@pytest.fixture(scope="module")
def recs_plain():
    spec = R.ReasoningSpec(seed=5, num_scenes=N, image_size=SIZE, rationale=False)
    return {t: [r for r in R.generate(spec) if r.task == t] for t in R.TASKS}


def test_gen_reasoning_clues_lead_to_the_target(recs):
    seen = set()
    for rec in recs["gen_reasoning"]:
        assert [s.role + ":" + s.kind for s in rec.segments] == ["user:text", "assistant:text",
                                                                   "assistant:image"]
        (prompt,) = texts(rec, "user")
        (target,) = image_attrs(rec)
        check_pixels_rerender(rec)
        found = {"time"}
        m = re.search(rf"the time {DUR} (after|before) (\d\d:\d\d)", prompt)
        d = minutes_of(m[1])
        assert shift(m[3], d if m[2] == "after" else -d) == hhmm(target), prompt
        if re.search(r"weather (icon for|symbol showing)|forecasting", prompt):
            assert weather_in(prompt) == target["weather"]
            found.add("weather")
        m = re.search(r", with the battery (.+?)(?:,|\.$)", prompt)
        if m:
            assert battery_of(m[1]) == target["battery"], prompt
            found.add("battery")
        m = re.search(rf"(battery|weather icon) (?:in|at) the {CORNER} corner (?:and|with) the "
                      rf"(battery|weather icon) (to its right|to its left|directly below it|directly above it|"
                      rf"diagonally opposite it)", prompt)
        if m:
            key = {"battery": "battery_pos", "weather icon": "weather_pos"}
            assert target[key[m[1]]] == m[2] and m[1] != m[3]
            assert target[key[m[3]]] == corner_from(m[2], m[4]), prompt
            found.add("positions")
        assert found == set(rec.attributes["mentioned"]), prompt
        # the rationale ends by stating the derived attributes
        (why,) = texts(rec, "assistant")
        assert hhmm(target) in why and (("weather" not in found) or target["weather"] in why)
        seen |= found
    assert seen == {"time", "weather", "battery", "positions"}


def test_edit_changes_exactly_the_edited_attribute(recs):
    kinds = set()
    for rec in recs["edit"]:
        assert [s.role + ":" + s.kind for s in rec.segments] == ["user:image", "user:text", "assistant:text",
                                                                   "assistant:image"]
        src, out = image_attrs(rec)
        check_pixels_rerender(rec)
        (instr,) = texts(rec, "user")
        diff = {k for k in src if src[k] != out[k]}
        assert diff, instr
        m = re.search(CORNER + " corner", instr)
        if m:
            key = "battery_pos" if re.search(r"battery|charge", instr) else "weather_pos"
            assert diff == {key} and out[key] == m[1] and out[key] not in (src["battery_pos"], src["weather_pos"])
            kinds.add(key)
        elif re.search(r"(\d+) points", instr):
            k = int(re.search(r"(\d+) points", instr)[1])
            sign = -1 if re.search(r"drain|Use up|drop", instr) else 1
            assert diff == {"battery"} and out["battery"] == src["battery"] + sign * k, instr
            kinds.add("battery")
        elif re.search(DUR, instr):
            d = minutes_of(re.search(DUR, instr)[1])
            sign = 1 if re.search(r"forward|later|Advance", instr) else -1
            assert re.search(r"back|earlier", instr) or sign == 1
            assert diff <= {"hour", "minute"} and hhmm(out) == shift(hhmm(src), sign * d), instr
            kinds.add("time")
        else:
            want = "sunny" if "sun" in instr else "raining" if "rain" in instr else "cloudy"
            assert re.search(r"sun|rain|[Cc]loud|overcast", instr)
            assert diff == {"weather"} and out["weather"] == want != src["weather"], instr
            kinds.add("weather")
        assert set(rec.attributes["edited"]) == ({"time"} if diff <= {"hour", "minute"} else diff)
    assert kinds == {"battery_pos", "weather_pos", "battery", "time", "weather"}


def test_correction_targets_the_description(recs):
    kinds = set()
    for rec in recs["correct"]:
        assert [s.role + ":" + s.kind for s in rec.segments] == ["user:image", "user:text", "assistant:text",
                                                                   "assistant:image"]
        bad, good = image_attrs(rec)
        check_pixels_rerender(rec)
        (desc,) = texts(rec, "user")
        wp, bp = re.findall(CORNER, desc)  # every description names the weather corner first
        described = {"time": re.search(r"\d\d:\d\d", desc)[0], "weather": re.search("sunny|cloudy|raining", desc)[0],
                     "battery": int(re.search(r"(\d+)%", desc)[1]), "weather_pos": wp, "battery_pos": bp}
        as_desc = lambda a: {"time": hhmm(a), "weather": a["weather"], "battery": a["battery"],
                             "weather_pos": a["weather_pos"], "battery_pos": a["battery_pos"]}
        assert as_desc(good) == described, desc
        wrong = {k for k in described if as_desc(bad)[k] != described[k]}
        assert wrong and {k for k in bad if bad[k] != good[k]} <= {"hour", "minute", "weather", "battery",
                                                                   "weather_pos", "battery_pos"}
        assert {"time" if k in ("hour", "minute") else k for k in rec.attributes["wrong"]} == wrong
        if "battery" in wrong:
            assert abs(bad["battery"] - good["battery"]) >= 15
        kinds.add(rec.attributes["kind"])
        (why,) = texts(rec, "assistant")  # says what is wrong
        for k in wrong:
            said = {"time": hhmm(bad), "battery": f"{bad['battery']}%", "weather": bad["weather"],
                    "weather_pos": good["weather_pos"], "battery_pos": good["battery_pos"]}[k]
            assert said in why, (why, k)
    assert kinds == set(R._CORRECT_KINDS)


def test_mm_reasoning_image_precedes_the_final_answer(recs):
    kinds = set()
    for rec in recs["mm_reasoning"]:
        assert [s.role + ":" + s.kind for s in rec.segments] == ["user:image", "user:text", "assistant:text",
                                                                   "assistant:image", "assistant:text"]
        now, then = image_attrs(rec)
        check_pixels_rerender(rec)
        (q,) = texts(rec, "user")
        final = rec.segments[-1].text
        d = minutes_of(re.findall(DUR, q)[-1])  # the last duration: "... points of charge an hour"
        m = re.search(r"(\d+) points", q)
        if m:
            k = int(m[1])
            assert d % 60 == 0
            assert then["battery"] == now["battery"] - k * d // 60 >= 0
            assert final == f"{then['battery']}%" and hhmm(then) == shift(hhmm(now), d)
            kinds.add("drain")
        else:
            sign = -1 if re.search(r"ago|Rewind|earlier", q) else 1
            assert final == hhmm(then) == shift(hhmm(now), sign * d), q
            assert {k for k in now if now[k] != then[k]} <= {"hour", "minute"}
            kinds.add("past" if sign < 0 else "future")
        assert rec.attributes["answer"] == final
    assert kinds == {"future", "past", "drain"}


def test_rationale_switch_only_drops_rationale_text(recs, recs_plain):
    for task in R.TASKS:
        assert len(recs[task]) == len(recs_plain[task]) == N
        for a, b in zip(recs[task], recs_plain[task], strict=True):
            idx = a.attributes["rationale_segments"]
            assert idx and all(a.segments[i].kind == "text" and a.segments[i].role == "assistant" for i in idx)
            kept = [s for i, s in enumerate(a.segments) if i not in idx]
            assert a.id == b.id and a.task == b.task
            for s, t in zip(kept, b.segments, strict=True):
                assert (s.role, s.kind, s.text) == (t.role, t.kind, t.text)
                if s.kind == "image":
                    np.testing.assert_array_equal(s.pixels, t.pixels)
            strip = lambda d: {k: v for k, v in d.items()
                               if k not in ("rationale", "rationale_segments", "rationale_text")}
            assert strip(a.attributes) == strip(b.attributes)
            assert b.attributes["rationale"] is False and b.attributes["rationale_segments"] == []
            assert a.attributes["rationale_text"] == [a.segments[i].text for i in idx]


def test_deterministic_and_index_stable():
    spec = R.ReasoningSpec(seed=1, num_scenes=4, image_size=16)
    a = list(R.generate(spec))
    b = list(R.generate(dataclasses.replace(spec, num_scenes=400), 0, 4))
    only = R.records_for_scene(2, dataclasses.replace(spec, tasks=("edit",)))
    key = lambda r: (r.id, r.attributes, [s.text for s in r.segments])
    assert [key(r) for r in a] == [key(r) for r in b]
    assert key(only[0]) == key([r for r in a if r.id.endswith("/2/edit")][0])
    c = list(R.generate(dataclasses.replace(spec, seed=2)))
    assert [key(r) for r in a] != [key(r) for r in c]
    assert [r.task for r in a[:4]] == list(R.TASKS)
    with pytest.raises(ValueError, match="unknown reasoning task"):
        R.ReasoningSpec(tasks=("dream",))


def test_phrasing_coverage(recs):
    prompts = {t: {texts(r, "user")[0] for r in recs[t]} for t in R.TASKS}
    assert all(any(p.startswith(g) for p in prompts["gen_reasoning"]) for g in R.GEN_PREFIXES)
    assert all(any(a in p for p in prompts["correct"]) for a in R.CORRECT_ASKS)
    for family, qs in R.EDIT_INSTRUCTIONS.items():  # every edit family is used
        pats = [re.escape(q).replace(r"\{c\}", CORNER).replace(r"\{d\}", DUR).replace(r"\{k\}", r"\d+")
                for q in qs]
        assert any(re.fullmatch(pt, p) for pt in pats for p in prompts["edit"]), family
    questions = {texts(r, "user")[0] for r in recs["mm_reasoning"]}
    assert len(questions) > 20 and all(len(v) >= 3 for v in R.MM_QUESTIONS.values())


def pretokenise(rec, n=4):
    """Dummy codes in place of pixels (as in tests/test_sequence.py): different per image."""
    segs, k = [], 0
    for s in rec.segments:
        if s.kind == "image":
            s = Segment(s.role, "image", codes=np.arange(k, k + n, dtype=np.int32) % 16)
            k += 1
        segs.append(s)
    return dataclasses.replace(rec, segments=segs)


@pytest.fixture(scope="module")
def tok():
    spec = R.ReasoningSpec(seed=9, num_scenes=80)
    return train_bpe(list(R.corpus_texts(spec, 80)) + template_texts(), vocab_size=500)


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml"])
def test_records_encode_with_targets_only_in_assistant_turns(recs, recs_plain, tok, template):
    tmpl = get_template(template)
    cfg = SequenceConfig(seq_len=512, image_tokens=4, codebook_size=16)
    for group in (recs, recs_plain):
        for task in R.TASKS:
            for rec in group[task][:8]:
                enc = encode_record(pretokenise(rec), tok, tmpl, cfg)
                assert enc.status == "ok", (rec.id, enc.length)
                ex = enc.arrays
                arrays.check_example(ex)
                n_user, n_asst = len(rec.images("user")), len(rec.images("assistant"))
                assert (ex["modality"] == arrays.IMAGE_IN).sum() == 4 * n_user
                assert (ex["modality"] == arrays.IMAGE_OUT).sum() == 4 * n_asst
                assert ex["image_target"].sum() == 4 * n_asst
                target_ids = ex["tokens"][ex["text_target"] == 1]
                decoded = tok.decode(target_ids, skip_special=True)
                assert decoded.split() == " ".join(texts(rec, "assistant")).split(), rec.id
                # one <boi>/<eoi> pair per assistant image is a target, user images' are not
                assert (target_ids == tok.boi_id).sum() == n_asst == (target_ids == tok.eoi_id).sum()


def test_write_split_feeds_the_interleaved_stream(tmp_path, tok):
    spec = R.ReasoningSpec(name="rtrain", seed=3, num_scenes=6, image_size=SIZE)
    recs = [pretokenise(r) for r in R.generate(spec)]
    paths = R.write_reasoning_split(spec, str(tmp_path), records_per_shard=10, records=recs)
    assert list(paths) == ["interleaved"] and [p.rsplit("/", 1)[1] for p in paths["interleaved"]] == \
        ["rtrain-interleaved-00000.array_record", "rtrain-interleaved-00001.array_record",
         "rtrain-interleaved-00002.array_record"]
    back = list(storage.RecordReader(paths["interleaved"]))
    assert [r.id for r in back] == [r.id for r in recs] and {R.stream_of(r) for r in back} == {"interleaved"}
    assert back[0].attributes["images"] == recs[0].attributes["images"]
    c = pipeline.default_data_config()
    c.streams.interleaved.paths = paths["interleaved"]
    c.streams.interleaved.weight = 1.0
    c.image_tokens, c.codebook_size, c.system_prompt = 4, 16, ""
    it = pipeline.make_train_iterator(c, tok, seq_len=256, local_batch_size=2)
    batch = next(it)
    assert batch["tokens"].shape == (2, 256) and batch["image_target"].sum() > 0
    it.close()
