"""The packing options of data/pipeline.py against a hand-packed expectation: ``data.pack_bins`` (how many rows
are filled at once; 0 = the local batch size) and ``data.max_segments_per_row`` (0 = unlimited).

Documented behaviour (pipeline module doc + grain's FirstFitPackIterDataset): records arrive in order
(shuffle off); each goes to the first of the ``pack_bins`` open rows where it fits (length, and fewer than
``max_segments_per_row`` segments); a record that fits in none closes all open rows — they are emitted
(in a seeded shuffled order) — and opens a fresh set. The expectation below is that rule written out,
on records whose image codes all equal the record's index, so every packed segment names its record."""
import collections

import numpy as np
import pytest

from uvjax.data import pipeline, storage
from uvjax.data.arrays import IMAGE_OUT
from uvjax.data.records import Record, Segment
from uvjax.data.sequence import SequenceConfig, encode_record
from uvjax.data.tokenizer import get_template, template_texts, train_bpe

SEQ = 64
# codes per record (+15 template tokens): long and short records mixed so that with several bins a short
# record goes back to an earlier row (first fit) instead of the last one
CODES = [30, 28, 2, 1, 20, 35, 3, 1, 1, 12, 40, 30, 2, 6, 1, 18, 25, 1, 3, 9, 30, 4, 1, 2, 14, 22, 1, 5]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("packing")
    recs = [Record(f"r{i}", "generation", [Segment("user", "text", text="draw"),
                                          Segment("assistant", "image", codes=np.full(n, i, np.int32))])
            for i, n in enumerate(CODES)]
    tok = train_bpe(["draw"] * 4 + template_texts(), vocab_size=300)
    paths = storage.write_records(recs, str(d), "gen", records_per_shard=10)
    tmpl = get_template("vicuna_v1", system="")
    lengths = [encode_record(r, tok, tmpl, SequenceConfig(seq_len=SEQ), pad=False).length for r in recs]
    assert max(lengths) <= SEQ and 3 * min(lengths) <= SEQ  # every record fits; short ones share rows
    return {"paths": paths, "tok": tok, "lengths": lengths}


def hand_pack(lengths, cap, bins, max_segments):
    """First fit over ``bins`` open rows; a record that fits nowhere flushes them. -> list of flushes,
    each a list of rows (tuples of record indices in packing order)."""
    flushes, rows, used = [], [[] for _ in range(bins)], [0] * bins
    for i, n in enumerate(lengths):
        fits = [b for b in range(bins) if used[b] + n <= cap and (not max_segments or len(rows[b]) < max_segments)]
        if not fits:
            flushes.append([tuple(r) for r in rows if r])
            rows, used = [[] for _ in range(bins)], [0] * bins
            fits = [0]
        rows[fits[0]].append(i)
        used[fits[0]] += n
    flushes.append([tuple(r) for r in rows if r])
    return flushes


def packed_rows(data, batch, **kw):
    c = pipeline.default_data_config()
    c.streams.understanding.paths = ()
    c.streams.generation.paths = data["paths"]
    c.system_prompt = ""
    c.shuffle = False
    c.num_epochs = 1
    for k, v in kw.items():
        setattr(c, k, v)
    it = pipeline.make_train_iterator(c, data["tok"], seq_len=SEQ, local_batch_size=batch)
    rows = []
    for b in it:
        for r in range(b["tokens"].shape[0]):
            seg, tok, mod = b["segment_ids"][r], b["tokens"][r], b["modality"][r]
            row = []
            for s in range(1, int(seg.max()) + 1):
                ids = set(tok[(seg == s) & (mod == IMAGE_OUT)].tolist())
                assert len(ids) == 1, "one record per segment"
                i = ids.pop()
                assert int((seg == s).sum()) == data["lengths"][i], "a whole record, untruncated"
                row.append(i)
            rows.append(tuple(row))
    return rows


def check_against(rows, flushes, batch):
    """Rows come out flush by flush, each flush's rows in some order; only the last batch may cut a flush."""
    want_total = sum(len(f) for f in flushes)
    assert len(rows) == want_total - want_total % batch
    pos = 0
    for f in flushes:
        got = rows[pos:pos + len(f)]
        if len(got) == len(f):
            assert collections.Counter(got) == collections.Counter(f), (got, f)
        else:  # the dropped remainder of the last batch
            assert not collections.Counter(got) - collections.Counter(f)
        pos += len(f)


@pytest.mark.parametrize("batch,pack_bins,max_segments", [
    (1, 0, 0),  # bins = batch = 1: plain greedy, one row at a time
    (2, 0, 0),  # bins = batch = 2
    (1, 3, 0),  # three bins, rows still emitted one per batch
    (2, 4, 2),  # four bins, at most two records per row
    (1, 0, 1),  # one record per row: packing off in effect
])
def test_packing_matches_hand_packed_rows(data, batch, pack_bins, max_segments):
    rows = packed_rows(data, batch, pack_bins=pack_bins, max_segments_per_row=max_segments)
    flushes = hand_pack(data["lengths"], SEQ, pack_bins or batch, max_segments)
    check_against(rows, flushes, batch)
    seen = sorted(i for r in rows for i in r)
    assert len(seen) == len(set(seen))  # no record twice
    if max_segments:
        assert max(len(r) for r in rows) <= max_segments


def test_options_change_the_packing(data):
    """The expectations above are not all the same packing: unlimited rows hold more than two records,
    more bins fill rows fuller (fewer rows for the same records)."""
    free = hand_pack(data["lengths"], SEQ, 1, 0)
    assert max(len(r) for f in free for r in f) > 2
    one_bin = sum(len(f) for f in free)
    four_bins = sum(len(f) for f in hand_pack(data["lengths"], SEQ, 4, 0))
    assert four_bins < one_bin
    capped = packed_rows(data, 1, max_segments_per_row=2)
    assert max(len(r) for r in capped) == 2 and len(capped) > one_bin
