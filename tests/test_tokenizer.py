"""BPE training/caching, HF-directory loading, special-token safety and the two templates."""
import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from uvjax.data import smartwatch as sw
from uvjax.data.records import Record, Segment
from uvjax.data.tokenizer import (TextTokenizer, get_template, load_or_train, load_tokenizer,
                                  register_loader, template_texts, train_bpe)


@pytest.fixture(scope="module")
def bpe():
    texts = list(sw.corpus_texts(sw.SmartWatchSpec(num_images=200), 200)) + template_texts()
    return train_bpe(texts, vocab_size=500)


def test_special_ids_and_roundtrip(bpe):
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.boi_id, bpe.eoi_id,
            bpe.im_start_id, bpe.im_end_id) == (0, 1, 2, 3, 4, 5, 6)
    assert bpe.vocab_size == 500
    for text in ["What time is it on the watch?", "  07:45  100% top-left\n", "Ünïcødé ✓ 温度", ""]:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    # The corpus' frequent words are merged: a common question takes far fewer tokens than bytes.
    q = "What weather does the watch show?"
    assert len(bpe.encode(q)) < len(q.encode()) / 2


def test_special_text_is_refused_unless_trusted(bpe):
    for bad in ["a <boi> b", "x</s>", "<|im_start|>user", "see <image>"]:
        with pytest.raises(ValueError, match="special-token"):
            bpe.encode(bad)
    assert bpe.encode("<s>USER:", allow_special=True)[0] == bpe.bos_id


def test_save_load_and_cache_by_path(bpe, tmp_path):
    d = str(tmp_path / "tok")
    bpe.save(d)
    again = TextTokenizer.load(d)
    text = "Draw a smartwatch, the time reads 11:05."
    assert again.encode(text) == bpe.encode(text) and again.vocab_size == bpe.vocab_size
    calls = []

    def corpus():
        calls.append(1)
        return ["never used"] * 3

    c = str(tmp_path / "cache")
    first = load_or_train(c, lambda: ["hello world"] * 50 + template_texts(), vocab_size=300)
    mtime = os.path.getmtime(os.path.join(c, "tokenizer.json"))
    second = load_or_train(c, corpus, vocab_size=300)
    assert calls == [] and os.path.getmtime(os.path.join(c, "tokenizer.json")) == mtime
    assert second.encode("hello world") == first.encode("hello world")
    assert load_tokenizer("uvjax", c).vocab_size == first.vocab_size


def test_hf_directory_adds_missing_specials(tmp_path):
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "hi": 3, "there": 4}
    t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(["<bos>", "<eos>"])
    d = tmp_path / "hf"
    d.mkdir()
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": {"content": "<eos>"}}))
    tok = TextTokenizer.from_hf_dir(str(d))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # pad falls back to eos
    # <boi>, <eoi>, <|im_start|>, <|im_end|> are appended after the base vocabulary.
    assert sorted((tok.boi_id, tok.eoi_id, tok.im_start_id, tok.im_end_id)) == [5, 6, 7, 8]
    assert tok.vocab_size == 9
    assert tok.encode("hi there") == [3, 4]
    with pytest.raises(ValueError, match="special-token"):
        tok.encode("hi <eos>")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        TextTokenizer.from_hf_dir(str(tmp_path))


def test_loader_registry_is_the_extension_point(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer("nope", "x")
    register_loader("test-kind", lambda path, **kw: ("loaded", path))
    assert load_tokenizer("test-kind", "p") == ("loaded", "p")


def _render(pieces, tok):
    out = []
    for p in pieces:
        if p.kind == "special":
            out.append("{" + p.text + "}")
        elif p.kind == "image":
            out.append("[IMG]")
        else:
            out.append(p.text)
    return "".join(out)


def test_template_strings():
    rec = Record("r", "vqa", [Segment("user", "image", codes=np.zeros(2, np.int32)),
                              Segment("user", "text", text="Q1"), Segment("assistant", "text", text="A1"),
                              Segment("user", "text", text="Q2"), Segment("assistant", "text", text="A2")])
    v = get_template("vicuna_v1", system="SYS")
    assert _render(v.pieces(rec), None) == "{bos}SYS USER: [IMG]\nQ1 ASSISTANT: A1{eos}USER: Q2 ASSISTANT: A2{eos}"
    c = get_template("chatml", system="SYS")
    assert _render(c.pieces(rec), None) == (
        "{im_start}system\nSYS{im_end}\n{im_start}user\n[IMG]\nQ1{im_end}\n{im_start}assistant\nA1"
        "{im_end}\n{im_start}user\nQ2{im_end}\n{im_start}assistant\nA2{im_end}\n")
    targets = [p for p in c.pieces(rec) if p.target]
    assert [p.text for p in targets] == ["A1", "im_end", "A2", "im_end"]
    prompt = Record("p", "vqa", [Segment("user", "text", text="Draw")])
    assert _render(v.pieces(prompt, add_generation_prompt=True), None).endswith("USER: Draw ASSISTANT:")
    with pytest.raises(ValueError, match="unknown conversation template"):
        get_template("llama9")
