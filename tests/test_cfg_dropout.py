"""Classifier-free guidance prompt dropout in the data pipeline: deterministic per record, exact rate
in expectation, and a dropped generation sample keeps its image targets behind an empty prompt."""
import numpy as np

from uvjax.data import storage
from uvjax.data.arrays import IMAGE_OUT, TEXT
from uvjax.data.pipeline import ReadEncode
from uvjax.data.records import Record, Segment, null_prompt_record
from uvjax.data.sequence import SequenceConfig
from uvjax.data.tokenizer import get_template, template_texts, train_bpe


def _gen(i):
    return Record(f"g{i}", "generation", [
        Segment("user", "text", text=f"draw a watch showing {i % 12 + 1}:15 and rain"),
        Segment("assistant", "text", text="Here it is."),
        Segment("assistant", "image", codes=np.arange(4, dtype=np.int32) + i % 3)])


def test_null_prompt_record_empties_user_text_and_keeps_targets(tmp_path):
    rec = _gen(3)
    null = null_prompt_record(rec)
    assert [s.text for s in null.segments if s.role == "user"] == [""]
    assert [s.role for s in null.segments if s.role != "user"] == ["assistant", "assistant"]
    vqa = Record("v", "vqa", [Segment("user", "image", codes=np.zeros(4, np.int32)),
                              Segment("user", "text", text="what?"), Segment("assistant", "text", text="x")])
    assert null_prompt_record(vqa) is vqa  # no assistant image: unchanged


def test_pipeline_dropout_rate_and_determinism(tmp_path):
    recs = [_gen(i) for i in range(400)]
    storage.write_records(recs, str(tmp_path), "gen", records_per_shard=1000)
    reader = storage.RecordReader(storage.expand_paths(str(tmp_path)))
    tok = train_bpe([s.text for r in recs for s in r.segments if s.kind == "text"] + template_texts(), 300)
    seq = SequenceConfig(seq_len=64, overflow="truncate", image_tokens=4, feature_dim=0, codebook_size=8,
                         check_tasks=True)
    tmpl = get_template("vicuna_v1", "")

    def user_text_len(enc, ex):
        # text positions before the first text target are the prompt
        first = int(np.argmax(ex["text_target"]))
        return int(((ex["modality"][:first] == TEXT)).sum())

    plain = ReadEncode(reader, tok, tmpl, seq, "raise", 0.0, 7)
    drop = ReadEncode(reader, tok, tmpl, seq, "raise", 0.25, 7)
    again = ReadEncode(reader, tok, tmpl, seq, "raise", 0.25, 7)
    n_dropped = 0
    for i in range(len(recs)):
        a, b, c = plain(i), drop(i), again(i)
        assert np.array_equal(b["tokens"], c["tokens"])  # same seed and index: same choice
        assert (b["modality"] == IMAGE_OUT).sum() == 4 and b["image_target"].sum() == 4
        if len(b["tokens"]) < len(a["tokens"]):
            n_dropped += 1
            assert user_text_len(None, b) < user_text_len(None, a)
    # 400 Bernoulli(0.25) draws: mean 100, sd 8.7
    assert 70 <= n_dropped <= 130, n_dropped


def test_dropout_of_an_edit_record_keeps_its_images_checked_before_and_not_after(tmp_path):
    """An edit's null prompt has no input image by design (the unconditional stream): it encodes; but the
    record as stored is still checked, so a stored edit without its input image is refused."""
    import pytest
    user_img = Segment("user", "image", codes=np.arange(4, dtype=np.int32))
    edit = Record("e0", "edit", [user_img, Segment("user", "text", text="move the battery"),
                                 Segment("assistant", "text", text="Moved."),
                                 Segment("assistant", "image", codes=np.arange(4, dtype=np.int32) + 1)])
    broken = Record("e1", "edit", edit.segments[1:])
    storage.write_records([edit, broken], str(tmp_path), "edit", records_per_shard=10)
    reader = storage.RecordReader(storage.expand_paths(str(tmp_path)))
    tok = train_bpe(["move the battery", "Moved."] * 10 + template_texts(), 300)
    seq = SequenceConfig(seq_len=64, overflow="truncate", image_tokens=4, feature_dim=0, codebook_size=8,
                         check_tasks=True)
    enc = ReadEncode(reader, tok, get_template("vicuna_v1", ""), seq, "raise", cfg_dropout=1.0)
    ex = enc.encode(0)
    mod = ex.arrays["modality"]
    assert (mod == IMAGE_OUT).sum() == 4 and (mod == 2).sum() == 0  # the input image is dropped with the prompt
    with pytest.raises(ValueError, match="expects >=1 user and >=1 assistant image"):
        enc.encode(1)
