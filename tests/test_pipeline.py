"""grain pipeline: packing invariants, exact resume through orbax, host sharding, mixing, bad data."""
import collections
import dataclasses
import os
import warnings

import msgpack
import numpy as np
import pytest

from uvjax.data import arrays, pipeline, storage
from uvjax.data import smartwatch as sw
from uvjax.data.records import Record, Segment, record_to_bytes
from uvjax.data.sequence import SequenceConfig, encode_record
from uvjax.data.tokenizer import get_template, template_texts, train_bpe

SEQ = 160


def pretokenise(rec: Record) -> Record:
    """Stand-in for the VQ pass: 4x4 patch-mean colours quantised to 64 codes (16 codes/image)."""
    segs = []
    for s in rec.segments:
        if s.kind == "image" and s.pixels is not None:
            h = s.pixels.shape[0] // 4
            m = s.pixels.reshape(4, h, 4, h, 3).mean((1, 3)) // 64
            codes = (m[..., 0] * 16 + m[..., 1] * 4 + m[..., 2]).astype(np.int32).reshape(-1)
            s = Segment(s.role, "image", codes=codes)
        segs.append(s)
    return dataclasses.replace(rec, segments=segs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    spec = sw.SmartWatchSpec(seed=0, num_images=40, image_size=32)
    recs = [pretokenise(r) for r in sw.generate(spec)]
    paths = sw.write_split(spec, str(d), records_per_shard=10, records=recs)
    tok = train_bpe([t for r in recs for t in (s.text for s in r.segments if s.kind == "text")]
                    + template_texts(), vocab_size=400)
    return {"dir": d, "paths": paths, "records": recs, "tok": tok}


def config(data, **kw):
    c = pipeline.default_data_config()
    c.streams.understanding.paths = data["paths"]["understanding"]
    c.streams.generation.paths = data["paths"]["generation"]
    c.system_prompt = ""
    c.image_tokens = 16
    c.codebook_size = 64
    for k, v in kw.items():
        if k in ("und_weight", "gen_weight"):
            c.streams["understanding" if k == "und_weight" else "generation"].weight = v
        else:
            setattr(c, k, v)
    return c


def reference_examples(data):
    """Every record encoded directly (no pipeline): token tuple -> list of full arrays."""
    tmpl = get_template("vicuna_v1", system="")
    out = collections.defaultdict(list)
    for r in data["records"]:
        a = encode_record(r, data["tok"], tmpl, SequenceConfig(seq_len=SEQ), pad=False).arrays
        out[tuple(a["tokens"].tolist())].append(a)
    return out


def segments_of(batch):
    """Splits packed rows into per-segment arrays, checking the row invariants on the way."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        row = {k: v[r] for k, v in batch.items()}
        arrays.check_example(row, f"row {r}")
        seg, pos = row["segment_ids"], row["positions"]
        n = int((seg > 0).sum())
        assert (seg[n:] == 0).all() and (pos[n:] == 0).all(), "padding only at the end"
        ids = seg[:n]
        assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
        for s in range(1, int(ids.max()) + 1):
            idx = np.nonzero(seg == s)[0]
            assert (np.diff(idx) == 1).all(), "a segment is contiguous"
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
            out.append({k: row[k][idx] for k in ("tokens", "modality", "text_target", "image_target")})
    return out


def test_packed_rows_never_mix_segments(data):
    ref = reference_examples(data)
    it = pipeline.make_train_iterator(config(data), data["tok"], seq_len=SEQ, local_batch_size=4)
    n_segs = 0
    for _ in range(6):
        b = next(it)
        assert set(b) == set(arrays.INT_KEYS)
        assert all(v.shape == (4, SEQ) and v.dtype == np.int32 for v in b.values())
        for seg in segments_of(b):
            candidates = ref[tuple(seg["tokens"].tolist())]
            assert candidates, "every packed segment is one whole record"
            assert any(all(np.array_equal(seg[k], c[k]) for k in seg) for c in candidates)
            n_segs += 1
    assert n_segs > 24  # rows really hold more than one record
    assert it.counts["records"] >= n_segs and it.counts["batches"] == 6


def hand_row(examples):
    """One row written out by hand: the examples' token/modality/target arrays one after another,
    segment ids 1..k, positions restarting at 0 in each segment, zeros after the last."""
    row = {k: np.zeros(SEQ, np.int32) for k in arrays.INT_KEYS}
    at = 0
    for seg, ex in enumerate(examples, 1):
        n = len(ex["tokens"])
        for k in ("tokens", "modality", "text_target", "image_target"):
            row[k][at:at + n] = ex[k]
        row["segment_ids"][at:at + n] = seg
        row["positions"][at:at + n] = np.arange(n)
        at += n
    return row


@pytest.mark.parametrize("packing", [False, True])
def test_batches_equal_hand_built_rows(data, packing):
    """Shuffle off, one stream, a fixed seed: every batch row equals the row built by hand from the
    records in stored order: one record per row, or (one packing bin) the next records that fit."""
    tmpl = get_template("vicuna_v1", system="")
    und = [r for r in data["records"] if r.task != "generation"]  # the shards' order
    enc = [encode_record(r, data["tok"], tmpl, SequenceConfig(seq_len=SEQ), pad=False).arrays for r in und]
    if packing:
        groups, used = [[]], 0
        for ex in enc:
            if used + len(ex["tokens"]) > SEQ:
                groups, used = groups + [[]], 0
            groups[-1].append(ex)
            used += len(ex["tokens"])
    else:
        groups = [[ex] for ex in enc]
    want = [hand_row(g) for g in groups]
    cfg = config(data, packing=packing, pack_bins=1, shuffle=False, num_epochs=1, gen_weight=0.0)
    rows = []
    for b in pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=2, seed=3):
        assert set(b) == set(arrays.INT_KEYS)
        rows += [{k: v[r] for k, v in b.items()} for r in range(2)]
    assert len(rows) == len(want) - len(want) % 2 and len(rows) > 10  # the last odd row is dropped
    assert packing == (len(want) < len(enc))
    for i, (got, exp) in enumerate(zip(rows, want)):
        for k in exp:
            np.testing.assert_array_equal(got[k], exp[k], err_msg=f"row {i} {k}")


def test_exact_resume_through_orbax_checkpoint_manager(data, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    cfg = config(data)
    it = pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=3, seed=5)
    for _ in range(3):
        next(it)
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    counts = dict(it.counts)
    expected = [next(it) for _ in range(5)]
    fresh = pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=3, seed=5)
    mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert fresh.counts == counts
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    mgr.close()
    other_seed = next(pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=3, seed=6))
    first = next(pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=3, seed=5))
    assert not np.array_equal(other_seed["tokens"], first["tokens"])


def _drain(cfg, data, **kw):
    it = pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=1, **kw)
    rows = [tuple(b["tokens"][0][b["segment_ids"][0] > 0].tolist()) for b in it]
    return rows, it


def test_two_hosts_read_disjoint_shares_that_cover_the_data(data):
    cfg = config(data, packing=False, num_epochs=1, gen_weight=0.0)
    und = [tuple(encode_record(r, data["tok"], get_template("vicuna_v1", system=""),
                               SequenceConfig(seq_len=SEQ), pad=False).arrays["tokens"].tolist())
           for r in data["records"] if r.task != "generation"]
    h0, _ = _drain(cfg, data, process_index=0, process_count=2)
    h1, _ = _drain(cfg, data, process_index=1, process_count=2)
    assert len(set(und)) == len(und)
    assert abs(len(h0) - len(h1)) <= 1 and not set(h0) & set(h1)
    assert sorted(h0 + h1) == sorted(und)  # weight-0 generation stream contributed nothing


def test_mix_follows_weights(data):
    cfg = config(data, packing=False, und_weight=3.0, gen_weight=1.0)
    it = pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=1)
    gen = [bool((next(it)["modality"] == arrays.IMAGE_OUT).any()) for _ in range(200)]
    assert abs(np.mean(gen) - 0.25) < 0.03
    # A stream with no files is skipped; no stream at all is an error.
    cfg.streams.generation.paths = []
    it = pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=1)
    assert not any((next(it)["modality"] == arrays.IMAGE_OUT).any() for _ in range(20))
    cfg.streams.understanding.weight = 0.0
    with pytest.raises(ValueError, match="no data"):
        pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=1)


@pytest.fixture(scope="module")
def bad_shard(data):
    """12 good understanding records and 4 bad ones at known indices."""
    good = [r for r in data["records"] if r.task != "generation"][:12]
    img = Segment("user", "image", codes=good[0].segments[0].codes)
    bad = {
        3: b"\xc1 not a record",                                                      # malformed bytes
        6: record_to_bytes(Record("pix", "vqa", [Segment("user", "image", pixels=np.zeros((32, 32, 3), np.uint8)),
                                                 Segment("assistant", "text", text="sunny")])),  # not pre-tokenised
        9: record_to_bytes(Record("empty", "vqa", [img, Segment("assistant", "text", text="")])),
        12: msgpack.packb({"id": "role", "task": "vqa", "attributes": {},
                           "segments": [{"role": "robot", "kind": "text", "text": "hi"}]}),
    }
    w = storage.ShardWriter(str(data["dir"] / "bad"), "bad", 100)
    g = iter(good)
    for i in range(16):
        w.write_bytes(bad[i] if i in bad else record_to_bytes(next(g)))
    return w.close()


def test_bad_records_raise_with_file_and_index(data, bad_shard):
    cfg = config(data, packing=False, shuffle=False, gen_weight=0.0)
    cfg.streams.understanding.paths = bad_shard
    it = pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=1)
    for _ in range(3):
        next(it)
    with pytest.raises(ValueError, match=r"bad-00000\.array_record record 3: malformed record"):
        next(it)
    for idx, msg in ((6, "pre-tokenisation"), (9, "empty assistant answer"), (12, "unknown role 'robot'")):
        reader = storage.RecordReader(bad_shard)
        enc = pipeline.ReadEncode(reader, data["tok"], get_template("vicuna_v1", ""),
                                  SequenceConfig(seq_len=SEQ), "raise")
        with pytest.raises(ValueError, match=rf"record {idx}\b.*{msg}"):
            enc(idx)


def test_bad_records_skipped_counted_and_warned(data, bad_shard):
    cfg = config(data, packing=True, num_epochs=1, gen_weight=0.0, on_error="skip")
    cfg.streams.understanding.paths = bad_shard
    cfg.skip_warn_fraction = 0.01
    it = pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = list(it)
    assert it.counts["skipped"] == 4 and it.counts["records"] == 16
    assert sum(int(r["segment_ids"].max()) for r in rows) == 12
    # 100 records are needed before warning; repeat the shard to get there.
    cfg.num_epochs = 8
    it = pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(it)
    assert it.counts["skipped"] == 32
    assert any("skipped as bad" in str(w.message) for w in caught)


def test_mp_prefetch_worker_gives_the_same_batches(data):
    cfg = config(data)
    want = pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=2)
    cfg.workers = 1
    it = pipeline.make_train_iterator(cfg, data["tok"], seq_len=SEQ, local_batch_size=2)
    try:
        for _ in range(3):
            a, b = next(want), next(it)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        assert it.counts["batches"] == 3 and it.counts["records"] > 6
    finally:
        it.close()


def test_read_threads_change_cost_not_batches(data, tmp_path):
    """Read threads (grain's prefetch: 16 threads, 500 ahead by default; uvjax reads in the main thread)
    change how batches are made, never which: the same batches and counts, a checkpoint taken with one
    setting resumes exactly under the other, and the LM fingerprint ignores the setting."""
    import grain
    import orbax.checkpoint as ocp
    from uvjax import config as uc
    from uvjax.training.workdir import lm_fingerprint
    main, threaded = config(data), config(data, read_threads=3)
    assert main.read_threads == 0
    a = pipeline.make_train_iterator(main, data["tok"], seq_len=SEQ, local_batch_size=3, seed=2)
    b = pipeline.make_train_iterator(threaded, data["tok"], seq_len=SEQ, local_batch_size=3, seed=2)
    for _ in range(4):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert a.counts == b.counts
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mgr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(b)))
    mgr.wait_until_finished()
    expected = [next(a) for _ in range(3)]
    fresh = pipeline.make_train_iterator(main, data["tok"], seq_len=SEQ, local_batch_size=3, seed=2)
    mgr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    mgr.close()
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    c0, c3 = uc.base_config(), uc.base_config()
    c3.data.read_threads = 3
    assert lm_fingerprint(c0) == lm_fingerprint(c3)
