"""Importers: LLaVA/ShareGPT4V JSON, caption->generation, UnifiedVisual-style parquet, conversion.

Fixture files are written by the tests into tmp dirs; expected segments are written out by hand.
"""
import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from uvjax.data import formats, storage
from uvjax.data.importers.captions import (ACKNOWLEDGEMENTS, REQUEST_PHRASINGS, explicit_task,
                                           iter_caption_generation, skip_paths)
from uvjax.data.importers.common import ImportStats, Limits, summary_line
from uvjax.data.importers.convert import convert
from uvjax.data.importers.llava import iter_llava, llava_record
from uvjax.data.importers.manifest import read_manifest
from uvjax.data.importers.parquet_layout import describe, read_layout
from uvjax.data.importers.paths import ImageOptions
from uvjax.data.importers.unifiedvisual import iter_unifiedvisual
from uvjax.data.tasks import stream_of
from uvjax.data.records import Record


# ------------------------------------------------------------------------------------- fixtures
def _png(path, value):
    arr = np.full((8, 8, 3), value, np.uint8)
    arr[0, 0] = (1, 2, 3)
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    out = tmp_path / "outside"
    out.mkdir()
    px = {"a.png": _png(d / "a.png", 10), "b.png": _png(d / "b.png", 20),
          "sub/d.png": _png(d / "sub" / "d.png", 30)}
    _png(out / "secret.png", 99)
    os.symlink(out / "secret.png", d / "link.png")          # points outside: refused
    os.symlink(d / "a.png", d / "sub" / "inner_link.png")   # points inside: allowed
    return {"dir": str(d), "outside": str(out), "pixels": px}


def write_json(path, items, jsonl=False):
    with open(path, "w") as f:
        if jsonl:
            for it in items:
                f.write((it if isinstance(it, str) else json.dumps(it)) + "\n")
        else:
            json.dump(items, f, indent=2)
    return str(path)


def seg_tuple(s):
    val = s.text if s.kind == "text" else (s.path if s.path is not None else "<pixels>")
    return (s.role, s.kind, val)


def turn(frm, value):
    return {"from": frm, "value": value}


LLAVA_ITEMS = [
    {"id": "u1", "image": "a.png",
     "conversations": [turn("human", "<image>\nWhat is this?"), turn("gpt", "A watch."),
                       turn("human", "And the time?"), turn("gpt", "10:15")]},
    {"id": "t1", "conversations": [turn("system", "Be brief."), turn("human", "hi"), turn("gpt", "hello")]},
    {"id": "g1", "task": "generation", "image": "sub/d.png",
     "conversations": [turn("human", "Draw a red watch."), turn("gpt", "Here it is. \n<image>")]},
    {"id": 7, "image": ["a.png", "b.png"],
     "conversations": [turn("human", "Compare <image> with <image>"), turn("gpt", "Same.")]},
    {"id": "i1", "image": ["a.png", "sub/inner_link.png"],
     "conversations": [turn("human", "<image>\nEdit it."), turn("gpt", "Before:\n<image>\nDone.")]},
]
LLAVA_EXPECTED = [
    ("u1", "conversation", [("user", "image", "a.png"), ("user", "text", "What is this?"),
                            ("assistant", "text", "A watch."), ("user", "text", "And the time?"),
                            ("assistant", "text", "10:15")]),
    ("t1", "text", [("system", "text", "Be brief."), ("user", "text", "hi"), ("assistant", "text", "hello")]),
    ("g1", "generation", [("user", "text", "Draw a red watch."), ("assistant", "text", "Here it is."),
                          ("assistant", "image", "sub/d.png")]),
    ("7", "conversation", [("user", "text", "Compare"), ("user", "image", "a.png"), ("user", "text", "with"),
                           ("user", "image", "b.png"), ("assistant", "text", "Same.")]),
    ("i1", "interleaved", [("user", "image", "a.png"), ("user", "text", "Edit it."),
                           ("assistant", "text", "Before:"), ("assistant", "image", "sub/inner_link.png"),
                           ("assistant", "text", "Done.")]),
]
STREAMS = ["understanding", "understanding", "generation", "understanding", "interleaved"]


# ------------------------------------------------------------------------------------- LLaVA JSON
@pytest.mark.parametrize("jsonl", [False, True])
def test_llava_records_have_expected_segments(tmp_path, images, jsonl):
    path = write_json(tmp_path / ("d.jsonl" if jsonl else "d.json"), LLAVA_ITEMS, jsonl)
    stats = ImportStats()
    recs = list(iter_llava(path, images["dir"], stats=stats))
    assert [(r.id, r.task, [seg_tuple(s) for s in r.segments]) for r in recs] == LLAVA_EXPECTED
    assert [stream_of(r) for r in recs] == STREAMS
    assert recs[0].attributes == {"source": path, "index": 0, "image_dir": images["dir"]}
    assert stats.as_dict()["read"] == 5 and stats.kept == 5 and not stats.skipped


def test_llava_is_lazy_and_loads_pixels(tmp_path, images):
    path = write_json(tmp_path / "d.json", LLAVA_ITEMS)
    it = iter_llava(path, images["dir"], load_pixels=True, image_size=8)
    first = next(it)  # a generator: one record decoded at a time
    np.testing.assert_array_equal(first.segments[0].pixels, images["pixels"]["a.png"])
    assert first.segments[0].path is None
    rest = list(it)
    np.testing.assert_array_equal(rest[1].segments[2].pixels, images["pixels"]["sub/d.png"])


@pytest.mark.parametrize("bad", ["../outside/secret.png", "ABS", "link.png", "sub/../../outside/secret.png",
                                 "sub/../a.png", "/etc/passwd"])
def test_image_paths_escaping_the_folder_are_refused(tmp_path, images, bad):
    rel = os.path.join(images["outside"], "secret.png") if bad == "ABS" else bad
    item = {"id": "x", "image": rel, "conversations": [turn("human", "<image>\nq"), turn("gpt", "a")]}
    path = write_json(tmp_path / "esc.json", [LLAVA_ITEMS[1], item])
    with pytest.raises(ValueError) as e:
        list(iter_llava(path, images["dir"]))
    msg = str(e.value)
    assert f"{path} record 1" in msg and rel in msg and "refused" in msg
    assert e.value.reason == "path_escape"
    stats = ImportStats()
    assert len(list(iter_llava(path, images["dir"], on_error="skip", stats=stats))) == 1
    assert stats.skipped == {"path_escape": 1}


GOOD = {"id": "ok", "image": "a.png", "conversations": [turn("human", "<image>\nq"), turn("gpt", "a")]}
BAD_ITEMS = {
    "unknown_role": ({**GOOD, "conversations": [turn("human", "<image>\nq"), turn("bot", "a")]},
                     "unknown role 'bot'"),
    "image_count": ({**GOOD, "conversations": [turn("human", "q"), turn("gpt", "a")]},
                    "0 <image> placeholder(s) in the conversation but 1 image(s)"),
    "image_count_two": ({**GOOD, "conversations": [turn("human", "<image><image>q"), turn("gpt", "a")]},
                        "2 <image> placeholder(s)"),
    "empty_answer": ({**GOOD, "conversations": [turn("human", "<image>\nq"), turn("gpt", "  \n")]},
                     "empty assistant answer"),
    "missing_image": ({**GOOD, "image": "gone.png"}, "not found"),
    "schema": ({"id": "x", "conversations": "hello"}, "'conversations' must be a non-empty list"),
    "generation_without_image": ({"id": "g", "task": "generation",
                                  "conversations": [turn("human", "draw"), turn("gpt", "ok")]},
                                 "expects >=1 assistant image, got 0"),
    # the reasoning tasks follow the same rule as the sequence encoder (uvjax.data.tasks)
    "gen_reasoning_without_image": ({"id": "g", "task": "gen_reasoning",
                                     "conversations": [turn("human", "draw"), turn("gpt", "so")]},
                                    "task 'gen_reasoning' expects >=1 assistant image, got 0"),
    "edit_without_output_image": ({**GOOD, "task": "edit"},
                                  "task 'edit' expects >=1 user and >=1 assistant image, got 1 user / 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_records_name_file_and_index(tmp_path, images, case):
    item, expect = BAD_ITEMS[case]
    path = write_json(tmp_path / "bad.json", [GOOD, GOOD, item])
    with pytest.raises(ValueError) as e:
        list(iter_llava(path, images["dir"]))
    assert f"{path} record 2" in str(e.value) and expect in str(e.value)


def test_malformed_json_list_names_the_record(tmp_path, images):
    good = json.dumps(GOOD)
    path = tmp_path / "broken.json"
    path.write_text(f"[\n{good},\n{good},\n{{\"id\": \"x\", \"conversations\": [}}\n]")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} record 2: malformed JSON at line 4"):
        list(iter_llava(str(path), images["dir"]))
    # a broken list cannot be resynchronised: fatal even when skipping
    with pytest.raises(ValueError, match="record 2: malformed JSON"):
        list(iter_llava(str(path), images["dir"], on_error="skip"))
    for text, msg in [("[" + good + "," + good + ",]", "record 2: malformed JSON: trailing comma"),
                      ("[" + good + " " + good + "]", "record 0: malformed JSON: expected ','"),
                      ("{\"not\": \"a list\"}", "record 0: 'conversations' must be a non-empty list"),
                      ("[" + good + "] trailing", "extra data after the JSON list"),
                      ("[" + "[" * 5000, "record 0: malformed JSON: nesting too deep")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(msg)):
            list(iter_llava(str(path), images["dir"]))


def test_oversized_input_is_refused(tmp_path, images):
    path = write_json(tmp_path / "big.json", [GOOD] * 20)
    size = os.path.getsize(path)
    with pytest.raises(ValueError, match=rf"file of {size} bytes exceeds max_file_bytes=100"):
        list(iter_llava(path, images["dir"], limits=Limits(max_file_bytes=100), on_error="skip"))
    long = {**GOOD, "conversations": [turn("human", "<image>" + "x" * 500), turn("gpt", "a")]}
    jl = write_json(tmp_path / "big.jsonl", [GOOD, long, GOOD], jsonl=True)
    lim = Limits(max_record_bytes=300)
    with pytest.raises(ValueError, match=rf"{re.escape(jl)} record 1: line longer than max_record_bytes=300"):
        list(iter_llava(jl, images["dir"], limits=lim))
    stats = ImportStats()
    assert len(list(iter_llava(jl, images["dir"], limits=lim, on_error="skip", stats=stats))) == 2
    assert stats.skipped == {"oversized": 1}
    with pytest.raises(ValueError, match="record 1: turn 0: 507 characters exceed max_text_chars=100"):
        list(iter_llava(jl, images["dir"], limits=Limits(max_text_chars=100)))


def test_skip_counts_every_bad_kind(tmp_path, images):
    lines = [GOOD, "{not json", BAD_ITEMS["unknown_role"][0], BAD_ITEMS["image_count"][0],
             BAD_ITEMS["empty_answer"][0], BAD_ITEMS["missing_image"][0], GOOD]
    path = write_json(tmp_path / "mixed.jsonl", lines, jsonl=True)
    with pytest.raises(ValueError, match=rf"{re.escape(path)} record 1: malformed JSON"):
        list(iter_llava(path, images["dir"]))
    stats = ImportStats()
    kept = list(iter_llava(path, images["dir"], on_error="skip", stats=stats))
    assert [r.attributes["index"] for r in kept] == [0, 6]
    assert stats.as_dict()["skipped"] == {"malformed_json": 1, "unknown_role": 1, "image_count": 1,
                                          "empty_answer": 1, "missing_image": 1}
    assert stats.read == 7 and stats.kept == 2 and len(stats.messages) == 5
    assert all(f"{path} record " in m for m in stats.messages)


# ------------------------------------------------------------------------------------- caption -> generation
def caption_items(n):
    return [{"id": f"c{i}", "image": ("sam/images/" if i % 5 == 3 else "coco/") + f"{i}.jpg",
             "conversations": [turn("human", "<image>\nDescribe the picture."),
                               turn("gpt", f"A photo number {i}.\nIt is nice.")]} for i in range(n)]


def test_caption_to_generation(tmp_path):
    path = write_json(tmp_path / "caps.json", caption_items(40))
    run = lambda **kw: list(iter_caption_generation(path, str(tmp_path), check_files=False, **kw))
    recs = run(seed=1)
    assert len(recs) == 40
    r = recs[0]
    assert r.id == "c0/generation" and r.task == "generation" and stream_of(r) == "generation"
    q, a = r.attributes["request"], r.attributes["acknowledgement"]
    assert [seg_tuple(s) for s in r.segments] == [
        ("user", "text", f"{REQUEST_PHRASINGS[q]} A photo number 0.\nIt is nice."),
        ("assistant", "text", ACKNOWLEDGEMENTS[a]), ("assistant", "image", "coco/0.jpg")]
    assert r.attributes["converted_from"] == "c0"
    key = lambda rs: [(x.id, x.segments[0].text, x.segments[1].text) for x in rs]
    assert key(run(seed=1)) == key(recs)                       # deterministic
    assert key(run(seed=2)) != key(recs)                       # seed matters
    used = {(x.attributes["request"], x.attributes["acknowledgement"]) for x in recs}
    assert {u[0] for u in used} == {0, 1, 2} and {u[1] for u in used} == {0, 1, 2}
    stats = ImportStats()
    kept = run(seed=1, skip=skip_paths("sam"), stats=stats)
    assert all("sam/" not in x.segments[2].path for x in kept) and len(kept) == 32
    assert stats.skipped == {"predicate": 8}
    assert key(kept) == key([x for x in recs if "sam/" not in x.segments[2].path])  # skip keeps draws
    assert key(run(seed=1, limit=5)) == key(recs[:5])
    # a non-caption record: raise, or skip and count
    bad = write_json(tmp_path / "notcap.json", caption_items(2) + [LLAVA_ITEMS[1]])
    with pytest.raises(ValueError, match=rf"{re.escape(bad)} record 2 \(id 't1'\): not a caption record"):
        list(iter_caption_generation(bad, str(tmp_path), check_files=False))
    stats = ImportStats()
    assert len(list(iter_caption_generation(bad, str(tmp_path), check_files=False, on_error="skip",
                                              stats=stats))) == 2
    assert stats.skipped == {"not_caption": 1} and stats.read == 3


def test_convert_writes_shards_per_stream(tmp_path, images):
    path = write_json(tmp_path / "d.json", LLAVA_ITEMS + [BAD_ITEMS["empty_answer"][0]])
    with pytest.raises(ValueError, match="record 5"):
        convert(path, str(tmp_path / "out0"), format="llava", image_dir=images["dir"])
    res = convert(path, str(tmp_path / "out"), format="llava", image_dir=images["dir"], prefix="llava",
                    on_error="skip", records_per_shard=2)
    assert res["counts"]["kept"] == 5 and res["counts"]["skipped"] == {"empty_answer": 1}
    names = {s: [os.path.basename(p) for p in ps] for s, ps in res["paths"].items()}
    assert names == {"understanding": ["llava-understanding-00000.array_record",
                                       "llava-understanding-00001.array_record"],
                     "generation": ["llava-generation-00000.array_record"],
                     "interleaved": ["llava-interleaved-00000.array_record"]}
    got = {s: [r.id for r in storage.RecordReader(ps)] for s, ps in res["paths"].items()}
    assert got == {"understanding": ["u1", "t1", "7"], "generation": ["g1"], "interleaved": ["i1"]}
    back = list(storage.RecordReader(res["paths"]["understanding"]))
    assert [seg_tuple(s) for s in back[0].segments] == LLAVA_EXPECTED[0][2]
    one = convert(write_json(tmp_path / "caps.json", caption_items(6)), str(tmp_path / "out2"),
                    format="caption_generation", image_dir=str(tmp_path), stream="generation",
                    check_files=False, seed=0, limit=4)
    assert len(storage.RecordReader(one["paths"]["generation"])) == 4 and one["counts"]["kept"] == 4


# ------------------------------------------------------------------------------------- parquet
def _png_bytes(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_turns_layout_with_paths(tmp_path, images):
    t = pa.table({
        "id": ["r0", "r1"],
        "conversations": [
            [{"from": "human", "value": "Which option is a cat? A or B"},
             {"from": "gpt", "value": "Option A looks like this:<image>\nOption B looks like this:\n<image>"
                                      "\nSo the answer is A."}],
            [{"from": "user", "value": "<image>\nFix the watch."},
             {"from": "assistant", "value": "The battery is wrong. <image>"}]],
        "images": [["a.png", "b.png"], ["sub/d.png", "a.png"]],
        "extra": [1, 2]})
    path = str(tmp_path / "uv_turns.parquet")
    pq.write_table(t, path)
    assert read_layout(path).name == "turns"
    recs = list(iter_unifiedvisual(path, images["dir"], batch_size=1))
    assert [(r.id, r.task, [seg_tuple(s) for s in r.segments]) for r in recs] == [
        ("r0", "interleaved", [("user", "text", "Which option is a cat? A or B"),
                               ("assistant", "text", "Option A looks like this:"),
                               ("assistant", "image", "a.png"),
                               ("assistant", "text", "Option B looks like this:"),
                               ("assistant", "image", "b.png"),
                               ("assistant", "text", "So the answer is A.")]),
        ("r1", "interleaved", [("user", "image", "sub/d.png"), ("user", "text", "Fix the watch."),
                               ("assistant", "text", "The battery is wrong."), ("assistant", "image", "a.png")])]
    assert recs[0].attributes["layout"] == "turns"
    assert all(stream_of(r) == "interleaved" for r in recs)
    assert [r.task for r in iter_unifiedvisual(path, images["dir"], task="image_editing")] == \
        ["image_editing"] * 2


def test_parquet_typed_turns_layout_with_bytes(tmp_path):
    msg = lambda role, *items: {"role": role, "content": [dict(type=k, text=v) for k, v in items]}
    t = pa.table({
        "messages": [[msg("user", ("text", "Draw two watches.")),
                      msg("assistant", ("text", "First:"), ("image", None), ("text", "Second:"), ("image", None))],
                     [msg("user", ("text", "Just talk.")), msg("assistant", ("text", "Sure."))]],
        "images": [[_png_bytes(40), _png_bytes(50)], []],
        "task": ["mm_internet", "cot"]})
    path = str(tmp_path / "uv_typed.parquet")
    pq.write_table(t, path)
    assert read_layout(path).name == "typed_turns"
    recs = list(iter_unifiedvisual(path))
    assert [(r.id, r.task, [seg_tuple(s) for s in r.segments]) for r in recs] == [
        ("uv_typed.parquet#0", "mm_internet", [("user", "text", "Draw two watches."),
                                               ("assistant", "text", "First:"), ("assistant", "image", "<pixels>"),
                                               ("assistant", "text", "Second:"), ("assistant", "image", "<pixels>")]),
        ("uv_typed.parquet#1", "cot", [("user", "text", "Just talk."), ("assistant", "text", "Sure.")])]
    np.testing.assert_array_equal(recs[0].segments[2].pixels, np.full((6, 6, 3), 40, np.uint8))
    np.testing.assert_array_equal(recs[0].segments[4].pixels, np.full((6, 6, 3), 50, np.uint8))
    assert stream_of(recs[1]) == "understanding"


def test_parquet_prompt_response_layout_with_hf_image_structs(tmp_path, images):
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    t = pa.table({
        "question": ["<image>\nMake it rain.", "Draw a cat."],
        "answer": ["It now rains: <image>", "Here: <image>"],
        "input_images": pa.array([[{"bytes": _png_bytes(7), "path": None}], []], pa.list_(img_t)),
        "output_images": pa.array([[{"bytes": None, "path": "b.png"}], [{"bytes": None, "path": "a.png"}]],
                                  pa.list_(img_t))})
    path = str(tmp_path / "uv_pr.parquet")
    pq.write_table(t, path)
    lay = read_layout(path)
    assert (lay.name, lay.prompt, lay.response, lay.input_images, lay.output_images) == \
        ("prompt_response", "question", "answer", "input_images", "output_images")
    recs = list(iter_unifiedvisual(path, images["dir"]))
    assert [[seg_tuple(s) for s in r.segments] for r in recs] == [
        [("user", "image", "<pixels>"), ("user", "text", "Make it rain."), ("assistant", "text", "It now rains:"),
         ("assistant", "image", "b.png")],
        [("user", "text", "Draw a cat."), ("assistant", "text", "Here:"), ("assistant", "image", "a.png")]]
    assert [r.task for r in recs] == ["interleaved", "generation"]


def test_parquet_unknown_layout_lists_columns_and_bad_rows(tmp_path, images):
    path = str(tmp_path / "weird.parquet")
    pq.write_table(pa.table({"foo": [1], "bar": ["x"], "pics": [["a.png"]]}), path)
    with pytest.raises(ValueError) as e:
        list(iter_unifiedvisual(path, on_error="skip"))
    msg = str(e.value)
    assert path in msg and "foo: int64" in msg and "bar: string" in msg and "pics: list<element: string>" in msg
    text = describe(path, out=io.StringIO())
    assert "layout: none" in text and "row 0:" in text
    # column_map names the columns of an otherwise unknown layout
    lay = read_layout(path, {"prompt": "bar", "response": "bar", "images": "pics"})
    assert lay.name == "prompt_response" and lay.images == "pics"
    # row-level errors name the row; skip counts them
    t = pa.table({"conversations": [[{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}],
                                    [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                                    [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]],
                  "images": [["a.png"], ["a.png"], []]})
    p2 = str(tmp_path / "rows.parquet")
    pq.write_table(t, p2)
    with pytest.raises(ValueError, match=rf"{re.escape(p2)} row 1: 0 <image> placeholder"):
        list(iter_unifiedvisual(p2, images["dir"]))
    stats = ImportStats()
    assert len(list(iter_unifiedvisual(p2, images["dir"], on_error="skip", stats=stats))) == 1
    assert stats.skipped == {"image_count": 1, "unknown_role": 1}
    shown = describe(p2, rows=2, out=io.StringIO())
    assert "layout: Layout(name='turns'" in shown and "row 1:" in shown and "row 2:" not in shown


def test_parquet_corrupt_embedded_image(tmp_path):
    t = pa.table({"prompt": ["<image> q"], "response": ["a"], "images": [[b"not an image"]]})
    path = str(tmp_path / "corrupt.parquet")
    pq.write_table(t, path)
    with pytest.raises(ValueError, match=r"row 0 image 0: embedded image bytes are corrupt"):
        list(iter_unifiedvisual(path))


# ------------------------------------------------------------------------------------- fuzz
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12).filter(
    lambda s: "<image>" not in s)


@st.composite
def wellformed(draw):
    """A well-formed item and the segments it must give (derived without the parser)."""
    n_turns = draw(st.integers(1, 4))
    turns, expected, n_img = [], [], 0
    if draw(st.booleans()):
        sys_text = draw(TEXT)
        turns.append(turn("system", sys_text))
        if sys_text.strip():
            expected.append(("system", "text", sys_text.strip()))
    for t in range(n_turns):
        for role, frm in (("user", draw(st.sampled_from(["human", "user"]))),
                          ("assistant", draw(st.sampled_from(["gpt", "assistant"])))):
            pieces = draw(st.lists(st.one_of(TEXT, st.just(None)), min_size=1, max_size=3))
            exp = []
            for p in pieces:
                if p is None:
                    exp.append((role, "image", ["a.png", "b.png"][n_img % 2]))
                    n_img += 1
                elif p.strip():
                    exp.append((role, "text", p.strip()))
            if not exp:  # keep every turn non-empty
                pieces.append("x")
                exp.append((role, "text", "x"))
            sep = draw(st.sampled_from(["\n", " ", ""]))
            value = sep.join("<image>" if p is None else p for p in pieces)
            # joining may forge a placeholder ("<ima" + "ge>"): such an item is not the one intended
            assume(value.count("<image>") == sum(p is None for p in pieces))
            turns.append(turn(frm, value))
            expected.extend(exp)
    item = {"id": draw(st.one_of(st.none(), st.integers(0, 99), TEXT)), "conversations": turns}
    imgs = [["a.png", "b.png"][i % 2] for i in range(n_img)]
    if imgs:
        item["image"] = imgs[0] if len(imgs) == 1 and draw(st.booleans()) else imgs
    return item, expected


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzimgs")
    _png(d / "a.png", 1)
    _png(d / "b.png", 2)
    return str(d)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=wellformed())
def test_fuzz_wellformed_llava_items(fuzz_dir, data):
    item, expected = data
    rec = llava_record(item, where="f.json record 3", images=ImageOptions(fuzz_dir))
    got = [seg_tuple(s) for s in rec.segments]
    assert merged(got) == merged(expected)
    assert len(rec.images()) == sum(1 for e in expected if e[1] == "image")
    assert rec.id == (str(item["id"]) if item["id"] is not None else "#0")


def merged(segs):
    """Segments with whitespace removed from texts and adjacent same-role texts concatenated (text
    pieces joined without a separator legitimately become one segment)."""
    out = []
    for role, kind, v in segs:
        if kind == "text":
            v = re.sub(r"\s+", "", v)
            if out and out[-1][:2] == (role, "text"):
                out[-1] = (role, "text", out[-1][2] + v)
                continue
        out.append((role, kind, v))
    return out


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=12)
MUTATIONS = ["drop_conv", "bad_role", "value_int", "image_int", "extra_placeholder", "empty_gpt",
             "turn_not_dict", "id_list", "task_int", "conv_empty", "escape", "system_late"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=wellformed(), mutation=st.sampled_from(MUTATIONS), junk=JSON)
def test_fuzz_malformed_llava_items_raise_value_error(fuzz_dir, data, mutation, junk):
    item = json.loads(json.dumps(data[0]))
    convs = item["conversations"]
    if mutation == "drop_conv":
        del item["conversations"]
    elif mutation == "bad_role":
        convs[-1]["from"] = junk if junk not in ("human", "gpt", "system", "user", "assistant") else "bot"
    elif mutation == "value_int":
        convs[0]["value"] = 3
    elif mutation == "image_int":
        item["image"] = 5
    elif mutation == "extra_placeholder":
        convs[-1]["value"] += "<image>"
    elif mutation == "empty_gpt":
        convs[-1]["value"] = " \n "
    elif mutation == "turn_not_dict":
        convs[0] = junk if not isinstance(junk, dict) else [junk]
    elif mutation == "id_list":
        item["id"] = [1]
    elif mutation == "task_int":
        item["task"] = 1
    elif mutation == "conv_empty":
        item["conversations"] = []
    elif mutation == "escape":
        convs[-2 if len(convs) > 1 else 0]["value"] += "<image>"
        item["image"] = ["../x.png"] * (sum(t["value"].count("<image>") for t in convs))
    elif mutation == "system_late":
        convs.append(turn("system", "late"))
    with pytest.raises(ValueError):
        llava_record(item, where="f.json record 0", images=ImageOptions(fuzz_dir))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(item=JSON)
def test_fuzz_arbitrary_json_is_record_or_value_error(fuzz_dir, item):
    try:
        rec = llava_record(item, where="f.json record 0", images=ImageOptions(fuzz_dir))
    except ValueError:
        return
    assert isinstance(rec, Record)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=60), st.text(max_size=60).map(lambda s: s.encode()),
                     st.lists(st.sampled_from(["[", "]", "{", "}", ",", '"id"', ":", '"x"', "1", "\n",
                                               '"conversations"', "[[[[[[", "null"]),
                              max_size=30).map(lambda x: "".join(x).encode())),
       jsonl=st.booleans())
def test_fuzz_raw_files_only_raise_value_error(fuzz_dir, raw, jsonl):
    path = os.path.join(fuzz_dir, "fuzz.jsonl" if jsonl else "fuzz.json")
    with open(path, "wb") as f:
        f.write(raw)
    for on_error in ("raise", "skip"):
        try:
            for rec in iter_llava(path, fuzz_dir, on_error=on_error):
                assert isinstance(rec, Record)
        except ValueError:
            pass


# ------------------------------------------------------------------------------------- issue #28
# Fixtures in the LLaVA format itself: raw JSON items ({"id", "image", "conversations", "task"?}).
def llava_item(iid, answer, *, task=None, image="a.png", question="<image>\nDescribe the picture."):
    item = {"id": iid, "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if task is not None:
        item["task"] = task
    return item


def test_caption_generation_converts_only_captions(tmp_path, images):
    multi = {"id": "m1", "image": "a.png",
             "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."},
                               {"from": "gpt", "value": "A watch on a table."},
                               {"from": "human", "value": "What is the battery level?"},
                               {"from": "gpt", "value": "62%"}]}
    items = [
        llava_item("s0", "A round watch with a blue face."),        # ShareGPT4V: no task key
        llava_item("c1", "A square watch, sunny icon.", task="caption"),
        llava_item("v1", "62%", task="vqa", question="<image>\nWhat is the battery level?"),
        llava_item("k1", "A watch.", task="conversation"),          # caption-shaped, not caption
        multi,                                                      # no task, two exchanges
        {**multi, "id": "m2", "task": "caption"},                   # says caption, is multi-turn
        llava_item("s1", "Another watch, seen from above.", image="b.png"),
    ]
    path = write_json(tmp_path / "mixed.json", items)
    with pytest.raises(ValueError) as e:
        list(iter_caption_generation(path, images["dir"]))
    msg = str(e.value)
    assert f"{path} record 2 (id 'v1')" in msg and "not a caption record" in msg and "'vqa'" in msg
    assert e.value.reason == "not_caption"
    stats = ImportStats()
    recs = list(iter_caption_generation(path, images["dir"], on_error="skip", stats=stats))
    assert [r.attributes["converted_from"] for r in recs] == ["s0", "c1", "s1"]
    assert [r.task for r in recs] == ["generation"] * 3
    assert [r.segments[0].text for r in recs] == [
        f"{REQUEST_PHRASINGS[r.attributes['request']]} {c}" for r, c in
        zip(recs, ["A round watch with a blue face.", "A square watch, sunny icon.",
                   "Another watch, seen from above."])]
    assert not any("62%" in s.text for r in recs for s in r.segments if s.kind == "text")
    assert [seg_tuple(s)[:2] for s in recs[1].segments] == [("user", "text"), ("assistant", "text"),
                                                          ("assistant", "image")]
    assert recs[2].segments[2].path == "b.png"
    assert "task" not in recs[1].attributes                       # the output is not a caption record
    assert stats.skipped == {"not_caption": 4} and stats.read == 7 and stats.kept == 3
    by_id = {re.search(r"\(id '(\w+)'\)", m_).group(1): m_ for m_ in stats.messages}
    assert set(by_id) == {"v1", "k1", "m1", "m2"}
    for rid, index, what in [("v1", 2, "explicit task 'vqa'"), ("k1", 3, "explicit task 'conversation'"),
                             ("m1", 4, "task 'conversation', inferred: a multi-turn conversation"),
                             ("m2", 5, "task 'caption', explicit: a multi-turn conversation")]:
        assert by_id[rid].startswith(f"{path} record {index} (id '{rid}'): not a caption record: {what}")
    # the multi-turn one is rejected even though no task is given (shape), and named as such
    with pytest.raises(ValueError, match=r"record 0 \(id 'm1'\): not a caption record: task "
                                         r"'conversation', inferred: a multi-turn conversation"):
        list(iter_caption_generation(write_json(tmp_path / "m.json", [multi]), images["dir"]))
    # explicit vs inferred task is told apart on the imported record
    raw = list(iter_llava(path, images["dir"]))
    assert [explicit_task(r) for r in raw] == [None, "caption", "vqa", "conversation", None, "caption",
                                                  None]
    # through convert: same rule, counted in the manifest
    res = convert(path, str(tmp_path / "out"), format="caption_generation", image_dir=images["dir"],
                    on_error="skip")
    assert res["counts"]["skipped"] == {"not_caption": 4} and res["counts"]["kept"] == 3
    back = storage.RecordReader(res["paths"]["generation"])
    assert [r.attributes["converted_from"] for r in back] == ["s0", "c1", "s1"]


def test_ambiguous_hour_answers_are_counted_and_warned(tmp_path, images, caplog):
    q = "<image>\nWhat time does the watch show?"
    items = [llava_item("t0", "12:15:00", task="vqa", question=q),
             llava_item("t1", " 00:40:10\n", task="vqa", question=q),
             llava_item("t2", "00:05", task="vqa", question=q),
             llava_item("t3", "11:15:00", task="vqa", question=q),       # unambiguous hour
             llava_item("t4", "12:15:00 pm", task="vqa", question=q),    # not exactly a time
             llava_item("t5", "The time is 12:15:00.", task="vqa", question=q),
             llava_item("t6", "12:75:00", task="vqa", question=q),       # not a time
             {"id": "t7", "image": "a.png",
              "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "10:00:00"},
                                {"from": "human", "value": "And one hour later?"},
                                {"from": "gpt", "value": "12:00:00"}]}]   # 2nd answer counts
    p1 = write_json(tmp_path / "watch_a.json", items)
    p2 = write_json(tmp_path / "watch_b.jsonl", [items[0], items[3]], jsonl=True)
    p3 = write_json(tmp_path / "watch_c.json", [items[3]])
    stats = ImportStats()
    with caplog.at_level("WARNING", logger="uvjax.data.importers"):
        recs = [r for p in (p1, p2, p3) for r in iter_llava(p, images["dir"], stats=stats)]
    assert stats.warnings == {"hour_00_12_ambiguous": 5}
    assert stats.as_dict()["warnings"] == {"hour_00_12_ambiguous": 5}
    assert stats.kept == 11 and not stats.skipped
    # records unchanged: the answers are imported as written (stripped like every turn)
    assert [r.segments[-1].text for r in recs[:7]] == [
        "12:15:00", "00:40:10", "00:05", "11:15:00", "12:15:00 pm", "The time is 12:15:00.", "12:75:00"]
    warned = [r for r in caplog.records if "hour 00 or 12" in r.getMessage()]
    assert len(warned) == 2                                     # one per file that has any
    m1, m2 = (r.getMessage() for r in warned)
    assert m1.startswith(f"{p1}: 4 assistant answer(s)")
    assert m2.startswith(f"{p2}: 1 assistant answer(s)")
    assert "ambiguous" in m1 and "same hands" in m1 and "equal" in m1
    assert all(r.levelname == "WARNING" for r in warned)
    # a file without such answers counts nothing
    clean = ImportStats()
    list(iter_llava(p3, images["dir"], stats=clean))
    assert clean.as_dict()["warnings"] == {}
    # and the count reaches the manifest
    res = convert([p1, p2], str(tmp_path / "out"), format="llava", image_dir=images["dir"])
    assert read_manifest(str(tmp_path / "out"))["counts"]["warnings"] == {"hour_00_12_ambiguous": 5}
    assert res["counts"]["warnings"] == {"hour_00_12_ambiguous": 5}


def test_convert_writes_import_manifest_readable_from_any_cwd(tmp_path, images, monkeypatch):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    os.symlink(images["dir"], work / "imgs_link")               # recorded as the real folder
    items = [llava_item("u0", "A watch."),
             {"id": "g0", "task": "generation", "image": "sub/d.png",
              "conversations": [{"from": "human", "value": "Draw a watch."},
                                {"from": "gpt", "value": "Here.\n<image>"}]},
             llava_item("bad", "  ")]
    write_json(work / "data" / "d.json", items)
    monkeypatch.chdir(work)
    res = convert("data/d.json", "shards", format="llava", image_dir="imgs_link", on_error="skip",
                    prefix="llava")
    manifest_path = os.path.join("shards", "import_manifest.json")
    assert res["manifest"] == manifest_path and os.path.isfile(work / manifest_path)
    with open(work / manifest_path) as f:
        on_disk = json.load(f)
    monkeypatch.chdir(tmp_path)                                 # a later stage elsewhere
    m = read_manifest(str(work / "shards"))
    assert m == on_disk
    assert set(m) == {"format", "sources", "image_dir", "counts", "paths", "created"}
    assert m["format"] == "llava"
    assert m["sources"] == [str(work / "data" / "d.json")]
    assert m["image_dir"] == os.path.realpath(images["dir"]) and os.path.isabs(m["image_dir"])
    assert m["counts"] == res["counts"] and m["counts"]["skipped"] == {"empty_answer": 1}
    shards = work / "shards"
    assert m["paths"] == {"understanding": [str(shards / "llava-understanding-00000.array_record")],
                          "generation": [str(shards / "llava-generation-00000.array_record")]}
    import datetime
    assert datetime.datetime.fromisoformat(m["created"]).tzinfo is not None
    # images resolve from the manifest's folder, whatever the current directory
    for s, ps in m["paths"].items():
        for rec in storage.RecordReader(ps):
            for seg in rec.images():
                assert os.path.isfile(os.path.join(m["image_dir"], seg.path))
    # found from a shard glob, a shard path, the manifest path, a list of shards
    shard = m["paths"]["generation"][0]
    for spec in (str(shards / "*.array_record"), shard, str(shards / "import_manifest.json"),
                 [shard, m["paths"]["understanding"][0]]):
        assert read_manifest(spec) == m
    # missing manifests name where they looked
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        read_manifest(str(tmp_path / "bare"))
    assert str(tmp_path / "bare" / "import_manifest.json") in str(e.value)
    with pytest.raises(FileNotFoundError, match="no import manifest"):
        read_manifest(str(tmp_path / "nowhere" / "*" / "*.array_record"))
    (tmp_path / "bare" / "import_manifest.json").write_text('{"format": "llava"}')
    with pytest.raises(ValueError, match="not an import manifest"):
        read_manifest(str(tmp_path / "bare"))
    # caption_generation without image_dir: "" recorded; another image folder into the same dir refused
    caps = write_json(tmp_path / "caps.json", [llava_item("c0", "A watch.")])
    other = convert(caps, str(tmp_path / "o2"), format="caption_generation", check_files=False)
    assert read_manifest(str(tmp_path / "o2"))["image_dir"] == "" and other["counts"]["kept"] == 1
    with pytest.raises(ValueError, match="cannot name both"):
        convert(caps, str(work / "shards"), format="caption_generation", image_dir=str(tmp_path),
                  prefix="capgen")
    assert read_manifest(str(work / "shards")) == m          # untouched by the refused import
    again = convert(caps, str(work / "shards"), format="caption_generation", image_dir=images["dir"],
                      prefix="capgen")                          # same folder: allowed
    assert read_manifest(str(work / "shards"))["paths"] == {
        "generation": [str(work / "shards" / "capgen-generation-00000.array_record")]}
    assert again["counts"]["kept"] == 1


def test_convert_cli_prints_manifest_and_summary(tmp_path, images, capsys):
    items = [llava_item("t0", "12:15:00", task="vqa", question="<image>\nWhat time is it?"),
             llava_item("u1", "A watch."), llava_item("bad", " "),
             {"id": "x", "conversations": [{"from": "bot", "value": "?"}]}]
    path = write_json(tmp_path / "d.json", items)
    out = str(tmp_path / "out")
    assert formats.main(["convert", path, "--format", "llava", "--out_dir", out, "--image_dir", images["dir"],
                   "--on_error", "skip"]) == 0
    text = capsys.readouterr().out
    body, manifest_line, summary = text.rstrip("\n").rsplit("\n", 2)
    res = json.loads(body)
    assert res["manifest"] == os.path.join(out, "import_manifest.json")
    assert manifest_line == f"manifest: {res['manifest']}"
    assert summary == ("import summary: read 4, kept 2, skipped 2 (empty_answer 1, unknown_role 1); "
                       "warnings: hour_00_12_ambiguous 1")
    assert read_manifest(out)["counts"] == res["counts"]
    assert summary_line({"read": 1, "kept": 1, "skipped": {}, "warnings": {}}) == \
        "read 1, kept 1, skipped 0; warnings: none"
