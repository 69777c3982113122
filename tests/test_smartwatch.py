"""Smart Watch generator: determinism, answers re-derived from attributes, frequencies, pixels."""
import dataclasses
import re

import numpy as np
import pytest

from uvjax.data import smartwatch as sw

CORNER_NAMES = ["top-left", "top-right", "bottom-left", "bottom-right"]


def expected_answer(att, a, seconds=False):
    """Written independently of the generator: the answer format promised in the module doc."""
    if att == "time":
        s = "%02d:%02d" % (a["hour"], a["minute"])
        return s + (":%02d" % a["second"] if seconds else "")
    if att == "battery":
        return "%d%%" % a["battery"]
    return a[att]


QUESTION_OWNER = {q: att for att, qs in sw.QUESTIONS.items() for q in qs}


def test_template_counts_and_uniqueness():
    assert {k: len(v) for k, v in sw.QUESTIONS.items()} == {
        "weather": 9, "time": 10, "battery": 10, "battery_pos": 10, "weather_pos": 10}
    assert {k: len(v) for k, v in sw.FRAGMENTS.items()} == {
        "time": 4, "weather": 3, "battery": 3, "weather_pos": 3, "battery_pos": 3}
    assert (len(sw.CAPTION_PREFIXES), len(sw.GENERATION_PREFIXES), len(sw.CAPTION_QUESTIONS),
            len(sw.GENERATION_ANSWERS)) == (3, 3, 10, 3)
    assert len(QUESTION_OWNER) == 49  # no phrasing shared between attributes


def _same(r1, r2):
    assert r1.id == r2.id and r1.task == r2.task and r1.attributes == r2.attributes
    for a, b in zip(r1.segments, r2.segments, strict=True):
        assert a.role == b.role and a.kind == b.kind and a.text == b.text
        if a.pixels is not None:
            np.testing.assert_array_equal(a.pixels, b.pixels)


def test_deterministic_per_index_whatever_the_count():
    small = sw.SmartWatchSpec(seed=3, num_images=8)
    big = dataclasses.replace(small, num_images=5000)
    a = list(sw.generate(small))
    b = list(sw.generate(big, 0, 8))
    assert len(a) == len(b) > 8
    for r1, r2 in zip(a, b):
        _same(r1, r2)
    _, again = sw.records_for_image(5, small)
    for r1, r2 in zip([r for r in a if r.attributes["index"] == 5], again, strict=True):
        _same(r1, r2)
    other_seed = sw.records_for_image(5, dataclasses.replace(small, seed=4))[0]
    assert other_seed != sw.records_for_image(5, small)[0]


def test_train_and_test_are_disjoint():
    splits = sw.default_splits(seed=0, num_train=200, num_test=100)
    key = lambda r: (tuple(r.attributes["face_color"]), r.attributes["hour"], r.attributes["minute"])
    train = {key(r) for r in sw.generate(splits["train"])}
    test = {key(r) for r in sw.generate(splits["test"])}
    assert len(train) == 200 and len(test) == 100 and not train & test


def test_answers_and_captions_rederived_from_attributes():
    for seconds in (False, True):
        spec = sw.SmartWatchSpec(seed=1, num_images=150, image_size=32, time_seconds=seconds)
        for rec in sw.generate(spec):
            a = rec.attributes
            assert set(a) >= {"hour", "minute", "second", "weather", "battery", "weather_pos",
                              "battery_pos", "face_color"}
            assert 1 <= a["hour"] <= 12 and 0 <= a["minute"] < 60 and 0 <= a["second"] < 60
            assert 0 <= a["battery"] <= 100 and a["weather"] in ("sunny", "cloudy", "raining")
            assert a["weather_pos"] != a["battery_pos"] and {a["weather_pos"], a["battery_pos"]} <= set(CORNER_NAMES)
            texts = [s.text for s in rec.segments if s.kind == "text"]
            if rec.task == "vqa":
                assert rec.segments[0].kind == "image" and rec.segments[0].role == "user"
                qs, ans = texts[0::2], texts[1::2]
                assert [QUESTION_OWNER[q] for q in qs] == a["questions"]
                assert ans == [expected_answer(QUESTION_OWNER[q], a, seconds) for q in qs]
                continue
            sentence = texts[1] if rec.task == "caption" else texts[0]
            assert "time" in a["mentioned"] and sentence.endswith(".") and sentence[0].isupper()
            for att in sw.FRAGMENT_ORDER:
                value = expected_answer(att, a, seconds)
                if att in a["mentioned"]:
                    assert value in sentence
            if "weather" not in a["mentioned"]:
                assert not any(w in sentence for w in ("sunny", "cloudy", "raining"))
            if "battery" not in a["mentioned"]:
                assert "%" not in sentence
            if rec.task == "generation":
                assert rec.segments[-1].kind == "image" and rec.segments[-1].role == "assistant"
                assert texts[1] in sw.GENERATION_ANSWERS
            else:
                assert texts[0] in sw.CAPTION_QUESTIONS


def _chi2_p(observed, probs):
    observed = np.asarray(observed, float)
    expected = np.asarray(probs, float) * observed.sum()
    stat = float(((observed - expected) ** 2 / expected).sum())
    from scipy.stats import chi2
    return float(chi2.sf(stat, len(observed) - 1))


def test_attribute_frequencies_match_probabilities():
    spec = sw.SmartWatchSpec(seed=11, num_images=3000, image_size=16)
    hours, weather, pairs, turns, qatt = [], [], [], [], []
    include = {k: [] for k in sw.FRAGMENT_ORDER}
    for rec in sw.generate(spec):
        a = rec.attributes
        if rec.task == "vqa":
            hours.append(a["hour"])
            weather.append(a["weather"])
            pairs.append((a["weather_pos"], a["battery_pos"]))
            turns.append(len(a["questions"]))
            qatt += a["questions"]
        else:
            for k in sw.FRAGMENT_ORDER:
                include[k].append(k in a["mentioned"])
    assert len(hours) == 3000
    ps = {"hour": _chi2_p(np.bincount(hours, minlength=13)[1:], [1 / 12] * 12),
          "weather": _chi2_p([weather.count(w) for w in ("sunny", "cloudy", "raining")], [1 / 3] * 3),
          "corner pairs": _chi2_p([pairs.count((x, y)) for x in CORNER_NAMES for y in CORNER_NAMES if x != y],
                                  [1 / 12] * 12),
          "turns": _chi2_p(np.bincount(turns, minlength=5)[1:], [0.216, 0.432, 0.288, 0.064]),
          "question attribute": _chi2_p([qatt.count(k) for k in sw.VQA_ATTRIBUTES], [0.2] * 5)}
    for k in ("weather", "battery", "weather_pos", "battery_pos"):
        n = sum(include[k])
        ps[f"mention {k}"] = _chi2_p([n, len(include[k]) - n], [0.5, 0.5])
    assert all(include["time"])
    bad = {k: p for k, p in ps.items() if p < 1e-3}
    assert not bad, bad


def _box(img, corner, size=48):
    H = img.shape[0]
    y = slice(0, size) if corner.startswith("top") else slice(H - size, H)
    x = slice(0, size) if corner.endswith("left") else slice(H - size, H)
    return img[y, x].reshape(-1, 3).astype(int)


def test_render_pixels_carry_the_attributes():
    base = {"hour": 3, "minute": 0, "second": 30, "weather": "sunny", "battery": 50,
            "weather_pos": "top-left", "battery_pos": "bottom-right", "face_color": [20, 40, 160]}
    img = sw.render(base, 224)
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    white, face = [255, 255, 255], [20, 40, 160]
    assert img[112, 112 + 30].tolist() == white          # hour hand towards 3
    assert img[112 - 55, 112].tolist() == white          # minute hand towards 12
    assert img[112 + 75, 112].tolist() == white          # second hand towards 6 (30 s)
    assert img[112, 112 - 30].tolist() == face           # nothing towards 9
    for deg in range(0, 360, 7):                          # beyond the hand tips: pure face colour
        a = np.radians(deg + 3)
        assert img[int(112 + 86 * np.sin(a)), int(112 + 86 * np.cos(a))].tolist() == face
    orange = lambda b: ((b[:, 0] > 200) & (b[:, 1] > 120) & (b[:, 1] < 215) & (b[:, 2] < 60)).sum()
    black = lambda b: (b.sum(1) < 60).sum()
    green = lambda b: ((b[:, 1] > 150) & (b[:, 0] < 80) & (b[:, 2] < 100)).sum()
    assert orange(_box(img, "top-left")) > 20 and orange(_box(img, "bottom-right")) == 0
    assert black(_box(img, "bottom-right")) > 20
    for c in ("top-left", "top-right", "bottom-left"):
        assert black(_box(img, c)) == 0 and green(_box(img, c)) == 0
    greens = [green(_box(sw.render({**base, "battery": p}, 224), "bottom-right")) for p in (0, 30, 70, 100)]
    assert greens[0] == 0 and greens[1] < greens[2] < greens[3]
    rain = sw.render({**base, "weather": "raining", "weather_pos": "top-right"}, 224)
    blue = lambda b: ((b[:, 2] > 180) & (b[:, 0] < 80)).sum()
    assert blue(_box(rain, "top-right")) > 5 and orange(_box(rain, "top-right")) == 0
    cloudy = sw.render({**base, "weather": "cloudy"}, 224)
    grey = lambda b: ((abs(b[:, 0] - 200) < 8) & (abs(b[:, 2] - 205) < 8)).sum()
    assert grey(_box(cloudy, "top-left")) > 50 and grey(_box(img, "top-left")) == 0
    small = sw.render(base, 128)
    assert small.shape == (128, 128, 3)
    np.testing.assert_array_equal(small, sw.render(base, 128))


def test_attribute_biased_understanding_keeps_generation_complete():
    full = sw.SmartWatchSpec(seed=5, num_images=300, image_size=16)
    biased = dataclasses.replace(full, understanding_keep=(("weather", 0.0),))
    half = dataclasses.replace(full, understanding_keep=(("weather", 0.5),))
    fr, br, hr = list(sw.generate(full)), list(sw.generate(biased)), list(sw.generate(half))
    for r in br:
        if r.task == "vqa":
            assert "weather" not in r.attributes["questions"]
        if r.task == "caption":
            assert "weather" not in r.attributes["mentioned"]
    gen = lambda rs: [r for r in rs if r.task == "generation"]
    for a, b in zip(gen(fr), gen(br), strict=True):
        _same(a, b)
    count = lambda rs: sum(r.attributes["questions"].count("weather") for r in rs if r.task == "vqa")
    assert count(fr) > 100 and 0.35 < count(hr) / count(fr) < 0.65


def test_data_scaling_subsets_are_nested():
    full = sw.SmartWatchSpec(seed=2, num_images=400, image_size=16)
    ids = lambda spec: {r.id for r in sw.generate(spec)}
    u30 = ids(dataclasses.replace(full, understanding_fraction=0.3))
    u60 = ids(dataclasses.replace(full, understanding_fraction=0.6))
    g0 = ids(dataclasses.replace(full, generation_fraction=0.0))
    und = lambda s: {i for i in s if not i.endswith("generation")}
    assert und(u30) < und(u60) and 0.2 < len({i for i in u30 if i.endswith("caption")}) / 400 < 0.4
    assert not any(i.endswith("generation") for i in g0)
    assert {i for i in u30 if i.endswith("generation")} == {i for i in ids(full) if i.endswith("generation")}


def test_spec_validation():
    with pytest.raises(ValueError, match="understanding_keep"):
        sw.SmartWatchSpec(understanding_keep=(("colour", 0.5),))
    with pytest.raises(ValueError, match="unknown Smart Watch split keys"):
        sw.spec_from_config({"num_images": 3, "bogus": 1}, "train")
    spec = sw.spec_from_config({"num_images": 3, "understanding_keep": {"weather": 0.2}}, "x")
    assert spec.understanding_keep == (("weather", 0.2),) and spec.name == "x"


def test_generation_prompts_can_name_every_attribute():
    """``generation_mention_all`` (issue #30's lever): every generation prompt names the time, the weather, the
    battery and both corners, with the values the renderer drew; the understanding records and the images are the
    ones the default renders; the default keeps random subsets (time always, the others about half the time)."""
    base = sw.SmartWatchSpec(seed=3, num_images=120, image_size=32)
    full = dataclasses.replace(base, generation_mention_all=1.0)
    a_recs, b_recs = list(sw.generate(base)), list(sw.generate(full))
    assert [r.id for r in a_recs] == [r.id for r in b_recs]
    mentioned_default = []
    for a, b in zip(a_recs, b_recs):
        if a.task != "generation":
            assert len(a.segments) == len(b.segments) and all(
                (x.role, x.kind, x.text) == (y.role, y.kind, y.text) and
                (x.pixels is None or np.array_equal(x.pixels, y.pixels)) for x, y in zip(a.segments, b.segments))
            continue
        np.testing.assert_array_equal(a.segments[-1].pixels, b.segments[-1].pixels)
        assert b.attributes["mentioned"] == ["time", "weather", "battery", "weather_pos", "battery_pos"]
        prompt = b.segments[0].text
        for att in sw.FRAGMENT_ORDER:
            assert expected_answer(att, b.attributes, False) in prompt, (att, prompt)
        mentioned_default.append(set(a.attributes["mentioned"]))
    assert all("time" in m for m in mentioned_default)
    share = np.mean([("weather" in m) for m in mentioned_default])
    assert 0.3 < share < 0.7 and any(len(m) < 5 for m in mentioned_default)


def test_a_share_of_generation_prompts_names_every_attribute():
    """``generation_mention_all`` = 0.4: about 40% of the generation prompts name all five attributes, the rest
    are exactly the default's random-subset prompts; every other record is the default's, and the choice is a
    per-image draw (the same image gets the same prompt whatever the split's size)."""
    base = sw.SmartWatchSpec(seed=5, num_images=400, image_size=16)
    mixed = dataclasses.replace(base, generation_mention_all=0.4)
    a_recs, b_recs = list(sw.generate(base)), list(sw.generate(mixed))
    assert [r.id for r in a_recs] == [r.id for r in b_recs]
    full = []
    for a, b in zip(a_recs, b_recs):
        if a.task != "generation":
            assert [x.text for x in a.segments] == [y.text for y in b.segments]
            continue
        if b.attributes["mentioned"] == list(sw.FRAGMENT_ORDER) != a.attributes["mentioned"]:
            full.append(True)
        else:
            full.append(False)
            assert b.segments[0].text == a.segments[0].text and b.attributes["mentioned"] == a.attributes["mentioned"]
    # binomial(400, 0.4): mean 160, sd 9.8 (a default prompt that already names all five counts as "not switched")
    assert 110 < sum(full) < 190, sum(full)
    tail = dataclasses.replace(mixed, num_images=50, start_index=350)
    assert [r.segments[0].text for r in sw.generate(tail) if r.task == "generation"] == \
        [r.segments[0].text for r in b_recs if r.task == "generation"][-50:]
    with pytest.raises(ValueError, match="generation_mention_all"):
        dataclasses.replace(base, generation_mention_all=1.5)


def test_the_mention_option_leaves_existing_dataset_fingerprints_alone():
    from uvjax.config import base_config
    from uvjax.stages.specs import data_fp_parts, train_split_spec
    c = base_config()
    assert "generation_mention_all" not in data_fp_parts(c.stages)  # default: the fingerprint of before the key
    assert train_split_spec(c.stages).generation_mention_all == 0.0
    c.stages.data.generation_mention_all = 0.5
    assert data_fp_parts(c.stages)["generation_mention_all"] == 0.5
    assert data_fp_parts(c.stages, for_tokenizer=True)["generation_mention_all"] == 0.5  # the corpus changes too
    assert train_split_spec(c.stages).generation_mention_all == 0.5


def test_generation_answers_can_spell_out_the_layout():
    """``generation_plan`` (issue #30's lever): the generation answer before the image states the weather, the
    battery and both corners of the image that follows, in one fixed sentence, while the prompt (its random
    subset included), the image and every understanding record stay the default's."""
    base = sw.SmartWatchSpec(seed=7, num_images=60, image_size=16)
    plan = dataclasses.replace(base, generation_plan=True)
    a_recs, b_recs = list(sw.generate(base)), list(sw.generate(plan))
    assert [r.id for r in a_recs] == [r.id for r in b_recs]
    pattern = re.compile(r"^Layout: (sunny|cloudy|raining) weather at the (top-left|top-right|bottom-left|bottom-right), "
                         r"battery (\d{1,3})% at the (top-left|top-right|bottom-left|bottom-right)\.$")
    n_gen = 0
    for a, b in zip(a_recs, b_recs):
        assert a.segments[0].text == b.segments[0].text and a.attributes == b.attributes
        if a.task != "generation":
            assert [x.text for x in a.segments] == [y.text for y in b.segments]
            continue
        n_gen += 1
        assert a.segments[1].text in sw.GENERATION_ANSWERS  # the default's canned answer
        m = pattern.match(b.segments[1].text)
        assert m, b.segments[1].text
        at = b.attributes
        assert m.groups() == (at["weather"], at["weather_pos"], str(at["battery"]), at["battery_pos"])
        assert [s.kind for s in b.segments] == ["text", "text", "image"]
        np.testing.assert_array_equal(a.segments[2].pixels, b.segments[2].pixels)
    assert n_gen == 60


def test_the_plan_option_changes_the_dataset_and_tokenizer_fingerprints_only_when_on():
    from uvjax.config import base_config
    from uvjax.stages.specs import data_fp_parts, train_split_spec
    from uvjax.evaluation.run import t2i_text_budget
    c = base_config()
    assert "generation_plan" not in data_fp_parts(c.stages) and not train_split_spec(c.stages).generation_plan
    assert t2i_text_budget(c) == (24, 32)  # text-to-image decoding: <boi> forced after 24 text tokens
    c.stages.data.generation_plan = True
    assert t2i_text_budget(c) == (40, 48)  # room for the ~20-token layout sentence
    assert data_fp_parts(c.stages)["generation_plan"] is True
    assert data_fp_parts(c.stages, for_tokenizer=True)["generation_plan"] is True  # its corpus has the layout sentences
    assert train_split_spec(c.stages).generation_plan
