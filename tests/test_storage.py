"""ArrayRecord shards, image files and the TFDS builder (without TensorFlow)."""
import sys

import numpy as np
import pytest
from PIL import Image

from uvjax.data import smartwatch as sw
from uvjax.data import storage
from uvjax.data.records import Record, Segment, record_to_bytes


def _recs(n):
    return [Record(f"r{i}", "vqa", [Segment("user", "image", codes=np.arange(i, i + 4, dtype=np.int32)),
                                    Segment("assistant", "text", text=f"answer {i}")], {"i": i})
            for i in range(n)]


def test_shards_roundtrip_and_locate(tmp_path):
    paths = storage.write_records(_recs(10), str(tmp_path), "s", records_per_shard=4)
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"s-0000{i}.array_record" for i in range(3)]
    assert storage.expand_paths(str(tmp_path)) == paths == storage.expand_paths(str(tmp_path / "s-*"))
    r = storage.RecordReader(paths)
    assert len(r) == 10
    assert r.locate(0) == (paths[0], 0) and r.locate(5) == (paths[1], 1) and r.locate(9) == (paths[2], 1)
    for i, rec in enumerate(r):
        assert rec.id == f"r{i}" and rec.attributes == {"i": i}
        np.testing.assert_array_equal(rec.segments[0].codes, np.arange(i, i + 4))
    with pytest.raises(ValueError, match="does not exist"):
        storage.expand_paths(str(tmp_path / "missing.array_record"))


def test_malformed_record_names_file_and_index(tmp_path):
    w = storage.ShardWriter(str(tmp_path), "bad", 10)
    w.write(_recs(1)[0])
    w.write_bytes(b"\x93not msgpack at all")
    w.write_bytes(record_to_bytes(_recs(1)[0])[:-7])  # truncated
    paths = w.close()
    r = storage.RecordReader(paths)
    r.read(0)
    for i in (1, 2):
        with pytest.raises(ValueError, match=rf"bad-00000.array_record record {i}: malformed record"):
            r.read(i)


def test_host_ranges_are_disjoint_and_cover():
    for n in (0, 1, 7, 10, 101):
        for c in (1, 2, 3, 8):
            ranges = [storage.host_range(n, h, c) for h in range(c)]
            covered = [i for lo, hi in ranges for i in range(lo, hi)]
            assert covered == list(range(n))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        storage.host_range(5, 2, 2)


def test_image_file_errors(tmp_path):
    ok = tmp_path / "ok.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(ok)
    assert storage.load_image("ok.png", str(tmp_path), size=8).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="not found"):
        storage.load_image("gone.png", str(tmp_path), where="f.json record 4")
    (tmp_path / "corrupt.png").write_bytes(ok.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"f.json record 5: image file .*corrupt.png.* corrupt"):
        storage.load_image("corrupt.png", str(tmp_path), where="f.json record 5")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match="mode L, expected RGB"):
        storage.load_image("gray.png", str(tmp_path))
    assert storage.load_image("gray.png", str(tmp_path), convert=True).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="is 8x8, expected 16x16"):
        storage.load_image("ok.png", str(tmp_path), size=16)
    with pytest.raises(ValueError, match="uint8"):
        storage.check_pixels(np.zeros((4, 4, 3), np.float32), "x")


def test_tfds_builder_roundtrip_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds
    from uvjax.data import tfds_smartwatch as T
    assert "tensorflow" not in sys.modules
    b = T.build(str(tmp_path), "tiny")
    cfg = b.builder_config
    direct = {r.id: r for s in ("train", "test")
              for r in sw.generate(sw.SmartWatchSpec(s, cfg.seed, cfg.num_train if s == "train" else cfg.num_test,
                                                     0 if s == "train" else 10**9, cfg.image_size))}
    readers = [b.as_data_source(split="train"), tfds.data_source("smartwatch/tiny", data_dir=str(tmp_path), split="test"),
               tfds.builder_from_directory(b.data_dir).as_data_source(split="train")]
    seen = set()
    for src in readers:
        for i in range(len(src)):
            ex = src[i]
            rec = T.record_from_example(ex)
            assert ex["id"] == rec.id.encode() and ex["task"] == rec.task.encode()  # Text comes back as bytes
            ref = direct[rec.id]
            assert [s.text for s in rec.segments] == [s.text for s in ref.segments]
            for s, t in zip(rec.segments, ref.segments):
                if s.pixels is not None:
                    np.testing.assert_array_equal(s.pixels, t.pixels)
            seen.add(rec.id)
    assert seen == set(direct)
    assert "tensorflow" not in sys.modules
