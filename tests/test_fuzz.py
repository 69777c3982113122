"""Property tests (hypothesis) of the untrusted-input parsers and of tokenisation.

- ``record_from_bytes``: well-formed records round-trip; any bytes, any msgpack value and any damaged
  record give a valid Record or a ``ValueError``, never another exception.
- ``encode_record``: for any well-formed record the sequence arrays keep the contract (targets only
  on assistant output, every image a complete ``<boi>`` codes ``<eoi>`` span, lengths within
  ``seq_len``, ``arrays.check_example`` passes); any malformed record raises ``ValueError``.
- ``formats.resolve_image_path``: no string resolves outside the image folder.

The LLaVA JSON importer is fuzzed in ``tests/test_formats.py`` (well-formed items, mutations,
arbitrary JSON, raw bytes); not repeated here.
"""
import dataclasses
import os

import msgpack
import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import models, pre_tokenizers

from uvjax.data import arrays
from uvjax.data.importers import paths as F
from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT, PAD, TEXT
from uvjax.data.records import Record, Segment, record_from_bytes, record_to_bytes
from uvjax.data.sequence import DROPPED, OK, TRUNCATED, SequenceConfig, encode_record
from uvjax.data.tokenizer import TextTokenizer, get_template

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A word-level vocabulary whose words say who wrote them: user words u*, assistant words a*,
# system words s*. So "targets only in assistant turns" is checkable token by token.
SPECIALS = ["<pad>", "<s>", "</s>", "<boi>", "<eoi>", "<|im_start|>", "<|im_end|>", "<unk>"]
USER_W = [f"u{i}" for i in range(6)]
ASSIST_W = [f"a{i}" for i in range(6)]
SYSTEM_W = [f"s{i}" for i in range(3)]
VOCAB = SPECIALS + ["USER:", "ASSISTANT:", "system", "user", "assistant"] + USER_W + ASSIST_W + SYSTEM_W
K = 16  # codebook size
F_DIM = 3


def _tokenizer():
    t = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(SPECIALS[:7])
    return TextTokenizer.from_tokenizers(t, bos="<s>", eos="</s>", pad="<pad>")


TOK = _tokenizer()
ID = {w: i for i, w in enumerate(VOCAB)}
# the only tokens that may be text targets: assistant words and what the assistant emits around them
TARGET_OK = {ID[w] for w in ASSIST_W} | {ID["</s>"], ID["<|im_end|>"], ID["<boi>"], ID["<eoi>"]}
NEVER_TARGET = {ID[w] for w in USER_W + SYSTEM_W} | {ID["<s>"], ID["<|im_start|>"], ID["USER:"],
                                                     ID["ASSISTANT:"], ID["system"], ID["user"], ID["assistant"]}


# ------------------------------------------------------------------------------------- strategies
def _words(pool):
    return st.lists(st.sampled_from(pool), min_size=1, max_size=4).map(
        lambda ws: st.sampled_from([" ", "\n", "  "]).map(lambda sep: sep.join(ws)))


@st.composite
def well_formed(draw, features=None):
    """(record, SequenceConfig, template) that tokenisation must accept."""
    feats = draw(st.booleans()) if features is None else features
    n_img = draw(st.integers(1, 4))  # codes (or feature rows) per image

    def image(role):
        if feats:
            f = draw(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=n_img * F_DIM,
                              max_size=n_img * F_DIM))
            return Segment(role, "image", features=np.asarray(f, np.float32).reshape(n_img, F_DIM))
        codes = draw(st.lists(st.integers(0, K - 1), min_size=n_img, max_size=n_img))
        shape2d = n_img % 2 == 0 and draw(st.booleans())
        a = np.asarray(codes, draw(st.sampled_from([np.int32, np.int64, np.uint8])))
        return Segment(role, "image", codes=a.reshape(2, -1) if shape2d else a)

    def text(pool, role):
        return Segment(role, "text", text=draw(draw(_words(pool))))

    segs = []
    if draw(st.booleans()):
        segs.append(text(SYSTEM_W, "system"))
    for _ in range(draw(st.integers(1, 3))):
        for role, pool in (("user", USER_W), ("assistant", ASSIST_W)):
            kinds = draw(st.lists(st.sampled_from(["text", "image"]), min_size=1, max_size=3))
            segs += [image(role) if k == "image" else text(pool, role) for k in kinds]
    n_user = sum(1 for s in segs if s.kind == "image" and s.role == "user")
    n_asst = sum(1 for s in segs if s.kind == "image" and s.role == "assistant")
    tasks = ["conversation", "interleaved", "text"]
    if n_user and not n_asst:
        tasks += ["vqa", "caption"]
    if n_asst:
        tasks += ["generation"]
    if n_user and n_asst:
        tasks += ["edit", "mm_reasoning"]
    rec = Record(draw(st.text(max_size=5)), draw(st.sampled_from(tasks)), segs,
                 draw(st.dictionaries(st.text(max_size=3), st.integers(-2 ** 63, 2 ** 64 - 1), max_size=2)))
    cfg = SequenceConfig(seq_len=draw(st.integers(2, 60)), overflow=draw(st.sampled_from(["truncate", "drop"])),
                         image_tokens=draw(st.sampled_from([0, n_img])), feature_dim=F_DIM if feats else 0,
                         codebook_size=draw(st.sampled_from([0, K])))
    system = draw(st.sampled_from([None, "", "s0 s1"]))
    tmpl = get_template(draw(st.sampled_from(["vicuna_v1", "chatml"])), system=system)
    if system is None:  # the templates' default prompts are not in this vocabulary: replace them
        tmpl = dataclasses.replace(tmpl, system="s2")
    return rec, cfg, tmpl


def _image_sizes(rec):
    return [(s.role, int(s.features.shape[0]) if s.features is not None else int(np.asarray(s.codes).size))
            for s in rec.images()]


# ------------------------------------------------------------------------------------- tokenisation
def check_contract(rec, cfg, enc):
    sizes = _image_sizes(rec)
    if enc.status == DROPPED:
        assert enc.arrays is None and enc.length > cfg.seq_len
        return
    ex = enc.arrays
    arrays.check_example(ex, "fuzz")
    T = cfg.seq_len
    assert all(v.shape[0] == T for v in ex.values())
    tok, mod, tt, it = ex["tokens"], ex["modality"], ex["text_target"], ex["image_target"]
    n = int((mod != PAD).sum())
    assert (mod[n:] == PAD).all() and (mod[:n] != PAD).all()
    assert (ex["segment_ids"][:n] == 1).all() and (ex["positions"][:n] == np.arange(n)).all()
    assert (enc.status == OK) == (enc.length == n) and (enc.status == TRUNCATED) == (enc.length > T)
    assert n <= T and (tt.any() or it.any())
    # targets only on assistant output, every assistant word is a target
    for i in range(n):
        if mod[i] == TEXT:
            if tt[i]:
                assert tok[i] in TARGET_OK, (i, VOCAB[tok[i]])
            if tok[i] in NEVER_TARGET:
                assert not tt[i], (i, VOCAB[tok[i]])
            if VOCAB[tok[i]] in ASSIST_W:
                assert tt[i], i
    assert (it.astype(bool) == (mod == IMAGE_OUT)).all()
    # images: complete <boi> codes <eoi> spans, in record order, none cut
    img = np.isin(mod, (IMAGE_IN, IMAGE_OUT))
    starts = [i for i in range(n) if img[i] and (i == 0 or not img[i - 1])]
    ends = [i for i in range(n) if img[i] and (i + 1 == n or not img[i + 1])]
    assert len(starts) <= len(sizes)
    for k, (a, b) in enumerate(zip(starts, ends)):
        role, size = sizes[k]
        assert b - a + 1 == size, (k, a, b, size)
        assert a >= 1 and b + 1 < n
        assert tok[a - 1] == ID["<boi>"] and mod[a - 1] == TEXT
        assert tok[b + 1] == ID["<eoi>"] and mod[b + 1] == TEXT
        out = role == "assistant"
        assert set(mod[a:b + 1]) == {IMAGE_OUT if out else IMAGE_IN}
        assert tt[a - 1] == tt[b + 1] == int(out)
        if cfg.codebook_size and cfg.feature_dim == 0:
            assert (tok[a:b + 1] < cfg.codebook_size).all()
        if cfg.feature_dim:
            np.testing.assert_array_equal(ex["features"][a:b + 1], rec.images()[k].features)
    boi = [i for i in range(n) if tok[i] == ID["<boi>"] and mod[i] == TEXT]
    assert boi == [a - 1 for a in starts]  # no <boi> left without its image
    if enc.status == OK:
        assert len(starts) == len(sizes)
    if cfg.feature_dim:
        assert (ex["features"][~img] == 0).all()


@FAST
@given(case=well_formed())
def test_fuzz_wellformed_records_keep_the_sequence_contract(case):
    rec, cfg, tmpl = case
    enc = encode_record(rec, TOK, tmpl, cfg)
    check_contract(rec, cfg, enc)
    # unpadded (packing) arrays are the same prefix, and the record survives its bytes
    raw = encode_record(record_from_bytes(record_to_bytes(rec)), TOK, tmpl, cfg, pad=False)
    assert raw.status == enc.status
    if enc.arrays is not None:
        n = len(raw.arrays["tokens"])
        assert n <= cfg.seq_len
        for k, v in raw.arrays.items():
            np.testing.assert_array_equal(v, enc.arrays[k][:n], err_msg=k)


MUTATIONS = ["role", "kind", "text_none", "two_sources", "no_source", "code_range", "code_negative",
             "code_count", "code_float", "code_3d", "code_empty", "pixels", "path", "special_text",
             "placeholder", "blank_answer", "no_assistant", "late_system", "system_image", "feature_dim",
             "feature_nan", "task", "no_segments"]


def mutate(rec, cfg, how, data):
    """A copy of a well-formed (rec, cfg) broken in one way that tokenisation must refuse."""
    segs = [dataclasses.replace(s) for s in rec.segments]
    imgs = [i for i, s in enumerate(segs) if s.kind == "image"]
    txts = [i for i, s in enumerate(segs) if s.kind == "text"]
    pick = lambda idx: idx[data.draw(st.integers(0, len(idx) - 1))]
    i = data.draw(st.integers(0, len(segs) - 1))
    feats = cfg.feature_dim > 0
    if how == "role":
        segs[i].role = data.draw(st.sampled_from(["bot", "User", "", "tool"]))
    elif how == "kind":
        segs[i].kind = data.draw(st.sampled_from(["audio", "IMAGE", ""]))
    elif how == "text_none" and txts:
        segs[pick(txts)].text = None
    elif how == "two_sources" and imgs:
        segs[pick(imgs)].path = "x.png"
    elif how == "no_source" and imgs:
        j = pick(imgs)
        segs[j].codes = segs[j].features = None
    elif how in ("code_range", "code_negative", "code_count", "code_float", "code_3d", "code_empty") and imgs:
        j = pick(imgs)
        n = cfg.image_tokens or 2
        segs[j].features = None
        segs[j].codes = {"code_range": np.full(n, K + data.draw(st.integers(0, 99)), np.int32),
                         "code_negative": np.full(n, -1, np.int32),
                         "code_count": np.zeros(n + 1, np.int32),
                         "code_float": np.zeros(n, np.float32),
                         "code_3d": np.zeros((1, 1, n), np.int32),
                         "code_empty": np.zeros(0, np.int32)}[how]
        if how in ("code_range", "code_negative"):
            cfg = dataclasses.replace(cfg, codebook_size=K)
        if how == "code_count":
            cfg = dataclasses.replace(cfg, image_tokens=n)
        if feats:  # codes where features are expected are fine; make them also out of range
            cfg = dataclasses.replace(cfg, codebook_size=K)
            segs[j].codes = np.full(n, K, np.int32) if how != "code_empty" else segs[j].codes
    elif how == "pixels" and imgs:
        j = pick(imgs)
        segs[j].codes = segs[j].features = None
        segs[j].pixels = np.zeros((2, 2, 3), np.uint8)
    elif how == "path" and imgs:
        j = pick(imgs)
        segs[j].codes = segs[j].features = None
        segs[j].path = "a.png"
    elif how == "special_text" and txts:
        j = pick(txts)
        segs[j].text += " " + data.draw(st.sampled_from(SPECIALS[:7] + ["<boi>a0"]))
    elif how == "placeholder" and txts:
        segs[pick(txts)].text += "<image>"
    elif how == "blank_answer":
        first = next(k for k, s in enumerate(segs) if s.role == "assistant")
        end = next((k for k in range(first, len(segs)) if segs[k].role != "assistant"), len(segs))
        segs[first:end] = [Segment("assistant", "text", text=data.draw(st.sampled_from(["", " ", "\n \t"])))]
    elif how == "no_assistant":
        segs = [s for s in segs if s.role != "assistant"]
    elif how == "late_system":
        segs.append(Segment("system", "text", text="s0"))
    elif how == "system_image":
        segs.insert(0, Segment("system", "image", codes=np.zeros(cfg.image_tokens or 1, np.int32)))
    elif how == "feature_dim" and imgs:
        j = pick(imgs)
        segs[j].codes = None
        segs[j].features = np.zeros((cfg.image_tokens or 1, F_DIM + 1), np.float32)
    elif how == "feature_nan" and imgs and feats:
        j = pick(imgs)
        f = np.array(segs[j].features, np.float32)
        f.flat[data.draw(st.integers(0, f.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        segs[j].features = f
    elif how == "task":
        has_user = any(s.kind == "image" and s.role == "user" for s in segs)
        has_asst = any(s.kind == "image" and s.role == "assistant" for s in segs)
        if has_asst:
            return Record(rec.id, "vqa", segs), cfg
        if not has_user:
            return Record(rec.id, "caption", segs), cfg
        return Record(rec.id, "generation", segs), cfg
    elif how == "no_segments":
        segs = []
    else:
        return None, cfg  # this mutation does not apply to this record
    return Record(rec.id, rec.task, segs, rec.attributes), cfg


@FAST
@given(case=well_formed(), how=st.sampled_from(MUTATIONS), data=st.data())
def test_fuzz_malformed_records_raise_value_error(case, how, data):
    rec, cfg, tmpl = case
    bad, cfg = mutate(rec, cfg, how, data)
    if bad is None:
        return
    with pytest.raises(ValueError):
        encode_record(bad, TOK, tmpl, cfg, where="shard-3.array_record record 9")
    # and the same through bytes, as the pipeline reads them: ValueError at parse or at tokenisation
    try:
        back = record_from_bytes(record_to_bytes(bad))
    except ValueError:
        return
    with pytest.raises(ValueError):
        encode_record(back, TOK, tmpl, cfg)


# ------------------------------------------------------------------------------------- record bytes
@FAST
@given(case=well_formed())
def test_fuzz_records_round_trip(case):
    rec = case[0]
    back = record_from_bytes(record_to_bytes(rec))
    assert (back.id, back.task, back.attributes) == (rec.id, rec.task, rec.attributes)
    assert len(back.segments) == len(rec.segments)
    for a, b in zip(back.segments, rec.segments):
        assert (a.role, a.kind, a.text, a.path) == (b.role, b.kind, b.text, b.path)
        for n in ("pixels", "codes", "features"):
            x, y = getattr(a, n), getattr(b, n)
            assert (x is None) == (y is None)
            if x is not None:
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)


MSGPACK = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20)
ARRAY = st.fixed_dictionaries({"__nd__": st.just(True),
                               "dtype": st.sampled_from(["uint8", "int32", "float32", "object", "float64", "V8"]),
                               "shape": st.lists(st.integers(-3, 2 ** 33), max_size=3) | MSGPACK,
                               "data": st.binary(max_size=24) | MSGPACK})
SEGMENT = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]) | MSGPACK,
                                 "kind": st.sampled_from(["text", "image", "video"]) | MSGPACK},
                                optional={"text": st.text(max_size=8) | MSGPACK, "path": MSGPACK,
                                          "codes": ARRAY, "features": ARRAY, "pixels": ARRAY})
RECORD = st.fixed_dictionaries({"id": MSGPACK, "task": MSGPACK, "segments": st.lists(SEGMENT, max_size=3) | MSGPACK},
                               optional={"attributes": MSGPACK})


def _record_or_value_error(b):
    try:
        rec = record_from_bytes(b, "shard-0.array_record record 5")
    except ValueError as e:
        assert "shard-0.array_record record 5" in str(e)
        return None
    assert isinstance(rec, Record)
    rec.validate()
    return rec


@FAST
@given(raw=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_are_record_or_value_error(raw):
    _record_or_value_error(raw)


@FAST
@given(obj=RECORD | MSGPACK)
def test_fuzz_msgpack_structures_are_record_or_value_error(obj):
    rec = _record_or_value_error(msgpack.packb(obj, use_bin_type=True))
    if rec is not None:  # a record that parses also tokenises or is refused with ValueError
        try:
            encode_record(rec, TOK, get_template("chatml", system=""), SequenceConfig(seq_len=32))
        except ValueError:
            pass


@FAST
@given(case=well_formed(), data=st.data())
def test_fuzz_damaged_record_bytes_are_record_or_value_error(case, data):
    b = bytearray(record_to_bytes(case[0]))
    how = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    pos = data.draw(st.integers(0, len(b) - 1))
    if how == "truncate":
        b = b[:pos]
    elif how == "flip":
        b[pos] ^= data.draw(st.integers(1, 255))
    else:
        b[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    rec = _record_or_value_error(bytes(b))
    if rec is not None:
        try:
            encode_record(rec, TOK, case[2], case[1])
        except ValueError:
            pass


def test_huge_claimed_lengths_are_refused_without_allocating():
    # array32 / str32 / bin32 headers claiming 4 GiB, followed by almost nothing
    for raw in (b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff\x00",
                msgpack.packb({"id": "x", "task": "t", "segments": [
                    {"role": "user", "kind": "image",
                     "codes": {"__nd__": True, "dtype": "int32", "shape": [2 ** 31, 2 ** 31], "data": b""}}]})):
        with pytest.raises(ValueError):
            record_from_bytes(raw)


# ------------------------------------------------------------------------------------- image paths
@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("paths")
    root = base / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"x")
    (base / "secret.png").write_bytes(b"x")
    os.symlink(base / "secret.png", root / "out.png")
    os.symlink(base, root / "sub" / "up")
    return str(root)


PATH_TEXT = st.lists(st.sampled_from(["..", ".", "a.png", "sub", "out.png", "up", "secret.png", "/", "\\",
                                      "//", "C:", "\x00", "~", "%2e%2e", " ", ""]), max_size=6).map("".join) \
    | st.lists(st.sampled_from(["..", ".", "a.png", "sub", "up", "out.png", "secret.png"]), max_size=5).map("/".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rel=PATH_TEXT | st.text(max_size=12))
def test_fuzz_image_paths_never_resolve_outside_the_folder(image_root, rel):
    try:
        norm = F.resolve_image_path(image_root, rel, "f.json record 0", check_files=False)
    except ValueError as e:
        assert "f.json record 0" in str(e)
        return
    root = os.path.realpath(image_root)
    full = os.path.realpath(os.path.join(root, norm))
    assert os.path.commonpath([root, full]) == root, (rel, full)
