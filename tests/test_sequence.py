"""Record -> sequence arrays, checked against arrays written out by hand.

The tokenizer is a hand-built word-level vocabulary split on whitespace, so every expected id below
can be read off the table; newline/space pieces of the templates encode to nothing.
"""
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from uvjax.data import arrays
from uvjax.data.records import Record, Segment
from uvjax.data.sequence import SequenceConfig, encode_record
from uvjax.data.tokenizer import TextTokenizer, get_template

VOCAB = ["<pad>", "<s>", "</s>", "<boi>", "<eoi>", "<|im_start|>", "<|im_end|>", "<unk>",
         "Be", "brief", "USER:", "hi", "there", "ASSISTANT:", "hello",            # 8..14
         "what", "weather", "sunny", "time", "03:15",                              # 15..19
         "user", "assistant", "draw", "watch", "ok",                               # 20..24
         "compare", "first", "done"]                                               # 25..27
W = {w: i for i, w in enumerate(VOCAB)}


@pytest.fixture(scope="module")
def tok():
    t = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(VOCAB[:7])
    return TextTokenizer.from_tokenizers(t, bos="<s>", eos="</s>", pad="<pad>")


def txt(role, text):
    return Segment(role, "text", text=text)


def img(role, codes):
    return Segment(role, "image", codes=np.asarray(codes, np.int32))


def padded(vals, T):
    return np.array(list(vals) + [0] * (T - len(vals)), np.int32)


def check(ex, T, tokens, modality, text_target, image_target, segs=None):
    n = len(tokens)
    np.testing.assert_array_equal(ex["tokens"], padded(tokens, T))
    np.testing.assert_array_equal(ex["modality"], padded(modality, T))
    np.testing.assert_array_equal(ex["text_target"], padded(text_target, T))
    np.testing.assert_array_equal(ex["image_target"], padded(image_target, T))
    np.testing.assert_array_equal(ex["segment_ids"], padded([1] * n, T))
    np.testing.assert_array_equal(ex["positions"], padded(range(n), T))
    arrays.check_example(ex)


def test_text_only_vicuna(tok):
    rec = Record("t", "text", [txt("system", "Be brief"), txt("user", "hi there"),
                               txt("assistant", "hello")])
    enc = encode_record(rec, tok, get_template("vicuna_v1"), SequenceConfig(seq_len=12))
    assert enc.status == "ok" and enc.length == 9
    check(enc.arrays, 12,
          tokens=[1, 8, 9, 10, 11, 12, 13, 14, 2],
          modality=[1] * 9,
          text_target=[0, 0, 0, 0, 0, 0, 0, 1, 1],
          image_target=[0] * 9)


def test_vqa_two_turns_vicuna(tok):
    rec = Record("v", "vqa", [img("user", [5, 6]), txt("user", "what weather"), txt("assistant", "sunny"),
                              txt("user", "time"), txt("assistant", "03:15")])
    enc = encode_record(rec, tok, get_template("vicuna_v1", system=""), SequenceConfig(seq_len=16))
    check(enc.arrays, 16,
          tokens=[1, 10, 3, 5, 6, 4, 15, 16, 13, 17, 2, 10, 18, 13, 19, 2],
          modality=[1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
          text_target=[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1],
          image_target=[0] * 16)


def test_generation_chatml(tok):
    rec = Record("g", "generation", [txt("user", "draw watch"), txt("assistant", "ok"),
                                     img("assistant", [7, 8, 9])])
    enc = encode_record(rec, tok, get_template("chatml", system=""), SequenceConfig(seq_len=14))
    check(enc.arrays, 14,
          tokens=[5, 20, 22, 23, 6, 5, 21, 24, 3, 7, 8, 9, 4, 6],
          modality=[1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 1, 1],
          text_target=[0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1],
          image_target=[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0])


def test_interleaved_two_images(tok):
    rec = Record("i", "interleaved", [img("user", [1, 2]), txt("user", "compare"),
                                      txt("assistant", "first"), img("assistant", [3]),
                                      txt("assistant", "done")])
    enc = encode_record(rec, tok, get_template("vicuna_v1", system=""), SequenceConfig(seq_len=15))
    check(enc.arrays, 15,
          tokens=[1, 10, 3, 1, 2, 4, 25, 13, 26, 3, 3, 4, 27, 2],
          modality=[1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 3, 1, 1, 1],
          text_target=[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1],
          image_target=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])


def test_continuous_features(tok):
    f = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    rec = Record("f", "vqa", [Segment("user", "image", features=f), txt("user", "what"),
                              txt("assistant", "sunny")])
    enc = encode_record(rec, tok, get_template("vicuna_v1", system=""),
                        SequenceConfig(seq_len=10, feature_dim=3))
    ex = enc.arrays
    np.testing.assert_array_equal(ex["tokens"], padded([1, 10, 3, 0, 0, 4, 15, 13, 17, 2], 10))
    np.testing.assert_array_equal(ex["modality"], padded([1, 1, 1, 2, 2, 1, 1, 1, 1, 1], 10))
    expect = np.zeros((10, 3), np.float32)
    expect[3:5] = f
    np.testing.assert_array_equal(ex["features"], expect)


def test_truncation_never_cuts_an_image(tok):
    rec = Record("g", "generation", [txt("user", "draw watch"), txt("assistant", "ok"),
                                     img("assistant", [7, 8, 9])])
    tmpl = get_template("chatml", system="")
    enc = encode_record(rec, tok, tmpl, SequenceConfig(seq_len=10))  # 10 falls inside the image
    assert enc.status == "truncated" and enc.length == 14
    check(enc.arrays, 10, tokens=[5, 20, 22, 23, 6, 5, 21, 24], modality=[1] * 8,
          text_target=[0, 0, 0, 0, 0, 0, 0, 1], image_target=[0] * 8)
    assert encode_record(rec, tok, tmpl, SequenceConfig(seq_len=10, overflow="drop")).status == "dropped"
    # A cut that leaves no target at all drops the sample.
    assert encode_record(rec, tok, tmpl, SequenceConfig(seq_len=7)).arrays is None
    unpadded = encode_record(rec, tok, tmpl, SequenceConfig(seq_len=14), pad=False).arrays
    assert unpadded["tokens"].shape == (14,)


BAD = {
    "pixels": (Record("b", "vqa", [Segment("user", "image", pixels=np.zeros((4, 4, 3), np.uint8)),
                                   txt("assistant", "sunny")]), "pre-tokenisation"),
    "empty_answer": (Record("b", "vqa", [img("user", [1]), txt("user", "what"), txt("assistant", "  ")]),
                     "empty assistant answer"),
    "special_in_user_text": (Record("b", "vqa", [img("user", [1]), txt("user", "what <boi> now"),
                                                 txt("assistant", "sunny")]), "special-token"),
    "eos_in_answer": (Record("b", "vqa", [img("user", [1]), txt("user", "what"),
                                          txt("assistant", "sunny</s>")]), "special-token"),
    "placeholder": (Record("b", "vqa", [img("user", [1]), txt("user", "<image>\nwhat"),
                                        txt("assistant", "sunny")]), "image-count mismatch"),
    "generation_without_image": (Record("b", "generation", [txt("user", "draw"), txt("assistant", "ok")]),
                                 "expects >=1 assistant image"),
    "vqa_without_image": (Record("b", "vqa", [txt("user", "what"), txt("assistant", "ok")]),
                          "expects >=1 user image"),
    "unknown_role": (Record("b", "vqa", [img("user", [1]), Segment("bot", "text", text="x")]),
                     "unknown role"),
    "code_count": (Record("b", "vqa", [img("user", [1, 2, 3]), txt("assistant", "ok")]), "expected 4"),
    "code_range": (Record("b", "vqa", [img("user", [1, 2, 3, 99]), txt("assistant", "ok")]),
                   "outside [0, 16)"),
    "no_assistant": (Record("b", "vqa", [img("user", [1, 2, 3, 4])]), "no assistant turn"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_raise_naming_where(tok, case):
    rec, msg = BAD[case]
    with pytest.raises(ValueError) as e:
        encode_record(rec, tok, get_template("vicuna_v1"),
                      SequenceConfig(seq_len=64, image_tokens=4 if case == "code_count" else 0,
                                     codebook_size=16), where="shard-7.array_record record 3")
    assert msg in str(e.value) and "shard-7.array_record record 3" in str(e.value)


# ------------------------------------------------------------------------------------- decode prompts
# (prompt record, answer segments, template, feature_dim, hand-written prompt tokens, modality)
FEAT = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
PROMPTS = {
    "text": ([txt("user", "hi there")], [txt("assistant", "hello")], "vicuna_v1", 0,
             [1, 10, 11, 12, 13], [1] * 5),
    "image_codes": ([img("user", [5, 6]), txt("user", "what weather")], [txt("assistant", "sunny")],
                    "vicuna_v1", 0, [1, 10, 3, 5, 6, 4, 15, 16, 13], [1, 1, 1, 2, 2, 1, 1, 1, 1]),
    "features": ([Segment("user", "image", features=FEAT), txt("user", "what")], [txt("assistant", "sunny")],
                 "vicuna_v1", 3, [1, 10, 3, 0, 0, 4, 15, 13], [1, 1, 1, 2, 2, 1, 1, 1]),
    # an earlier assistant image is IMAGE_OUT in the prompt, as in training
    "earlier_answer_image_chatml": (
        [txt("user", "draw watch"), txt("assistant", "ok"), img("assistant", [7, 8, 9]), txt("user", "what")],
        [txt("assistant", "sunny")], "chatml", 0,
        [5, 20, 22, 23, 6, 5, 21, 24, 3, 7, 8, 9, 4, 6, 5, 20, 15, 6, 5, 21],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1]),
}


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_decode_prompt_is_the_start_of_the_training_sequence(tok, case):
    """``inference.decode.encode_prompt`` (the data layer's ``sequence.encode_prompt``) gives the prompt
    written out by hand, and that is exactly the first positions of ``encode_record`` of the same
    conversation with its answer: training and decoding lay records out the same way."""
    from uvjax.inference.decode import encode_prompt
    prompt, answer, name, fdim, tokens, modality = PROMPTS[case]
    tmpl = get_template(name, system="")
    p = encode_prompt(Record("p", "interleaved", prompt), tok, tmpl, feature_dim=fdim)
    assert set(p) == ({"tokens", "modality", "features"} if fdim else {"tokens", "modality"})
    np.testing.assert_array_equal(p["tokens"], np.asarray(tokens, np.int32))
    np.testing.assert_array_equal(p["modality"], np.asarray(modality, np.int32))
    assert p["tokens"].dtype == p["modality"].dtype == np.int32
    full = encode_record(Record("f", "interleaved", prompt + answer), tok, tmpl,
                         SequenceConfig(seq_len=32, feature_dim=fdim), pad=False).arrays
    n = len(tokens)
    assert len(full["tokens"]) > n
    for k in p:
        np.testing.assert_array_equal(full[k][:n], p[k], err_msg=k)
    if fdim:
        expect = np.zeros((n, fdim), np.float32)
        expect[3:5] = FEAT
        np.testing.assert_array_equal(p["features"], expect)


def test_decode_prompt_prefix_and_open_image(tok):
    from uvjax.inference.decode import encode_prompt
    rec = Record("p", "vqa", [img("user", [5, 6]), txt("user", "what weather")])
    tmpl = get_template("vicuna_v1", system="")
    p = encode_prompt(rec, tok, tmpl, assistant_prefix="hello", open_image=True)
    np.testing.assert_array_equal(p["tokens"], [1, 10, 3, 5, 6, 4, 15, 16, 13, 14, 3])
    np.testing.assert_array_equal(p["modality"], [1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1])
    # the answer is not there yet: no task checks (a vqa prompt has no answer, a generation prompt no image)
    encode_prompt(Record("g", "generation", [txt("user", "draw watch")]), tok, tmpl)
    with pytest.raises(ValueError, match="prompt images must be VQ codes or features"):
        encode_prompt(Record("x", "vqa", [Segment("user", "image", path="a.png")]), tok, tmpl)
    with pytest.raises(ValueError, match="feature_dim is 0"):
        encode_prompt(Record("x", "vqa", [Segment("user", "image", features=FEAT)]), tok, tmpl)


# ------------------------------------------------------------------------------------- task taxonomy
def _codes(role):
    return img(role, [1, 2])


# Written out by hand (not uvjax.data.tasks' constants): task -> (stream, a record shape keeping the
# task's image promise, a shape breaking it or None when the tag promises nothing).
U, A = "user", "assistant"
TASKS = {
    "vqa": ("understanding", [_codes(U), txt(U, "what"), txt(A, "sunny")], [txt(U, "what"), txt(A, "sunny")]),
    "caption": ("understanding", [_codes(U), txt(A, "hello")],
                [_codes(U), txt(A, "hello"), _codes(A)]),
    "generation": ("generation", [txt(U, "draw"), txt(A, "ok"), _codes(A)], [txt(U, "draw"), txt(A, "ok")]),
    "gen_reasoning": ("interleaved", [txt(U, "draw"), txt(A, "so"), _codes(A)], [txt(U, "draw"), txt(A, "so")]),
    "edit": ("interleaved", [_codes(U), txt(U, "move"), txt(A, "ok"), _codes(A)],
             [_codes(U), txt(U, "move"), txt(A, "ok")]),
    "correct": ("interleaved", [_codes(U), txt(U, "fix"), txt(A, "ok"), _codes(A)],
                [txt(U, "fix"), txt(A, "ok"), _codes(A)]),
    "mm_reasoning": ("interleaved", [_codes(U), txt(U, "later"), _codes(A), txt(A, "03:15")],
                     [_codes(U), txt(U, "later"), txt(A, "03:15")]),
    "text": ("understanding", [txt(U, "hi"), txt(A, "hello")], None),
    "conversation": ("understanding", [_codes(U), txt(U, "hi"), txt(A, "hello")], None),
    "interleaved": ("interleaved", [_codes(U), txt(A, "first"), _codes(A)], None),
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_importers_and_encoder_share_the_task_taxonomy(tok, task):
    """Every task the sequence encoder knows is known to the importers' check_task and to the stream
    split, with the same verdict: a record keeping the task's image promise passes both, one breaking it
    fails both with the same reason."""
    from uvjax.data import tasks
    from uvjax.data.importers.common import FormatError
    from uvjax.data.importers.segments import check_task
    from uvjax.data.sequence import validate_record
    stream, good, bad = TASKS[task]
    cfg = SequenceConfig(seq_len=64)
    assert task in tasks.KNOWN_TASKS
    rec = Record("r", task, good)
    validate_record(rec, tok, cfg, "w")
    check_task(task, rec.segments, "w")
    assert tasks.stream_of(rec) == stream
    if bad is None:
        return
    with pytest.raises(ValueError) as enc_err:
        validate_record(Record("r", task, bad), tok, cfg, "w")
    with pytest.raises(FormatError) as imp_err:
        check_task(task, bad, "w")
    assert imp_err.value.reason == "image_count"
    problem = str(enc_err.value).removeprefix("w: ")
    assert problem.startswith(f"task {task!r} expects") and problem in str(imp_err.value)


def test_the_taxonomy_knows_exactly_the_hand_written_tasks_and_the_generators_use_them():
    from uvjax.data import reasoning, smartwatch, tasks
    assert set(tasks.KNOWN_TASKS) == set(TASKS)
    recs = list(smartwatch.generate(smartwatch.SmartWatchSpec(num_images=3, image_size=16)))
    recs += list(reasoning.generate(reasoning.ReasoningSpec(num_scenes=1, image_size=16)))
    assert {r.task for r in recs} == {"vqa", "caption", "generation", "gen_reasoning", "edit", "correct",
                                      "mm_reasoning"}
    for r in recs:
        assert tasks.stream_of(r) == smartwatch.stream_of(r) == TASKS[r.task][0]
    assert {reasoning.stream_of(r) for r in recs if r.task in reasoning.TASKS} == {"interleaved"}
    # a tag outside the taxonomy is carried unchecked
    assert tasks.image_problem("my_subset", 0, 0) is None
