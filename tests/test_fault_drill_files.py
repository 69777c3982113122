"""Fault drill over the files a run keeps besides its checkpoints (issue #33): stage caches (tokenizer, VQ,
pre-tokenised shards, chunk markers, DONE.json; local and a gs:// stage's local mirror), ``metrics.jsonl``,
``stages.jsonl``, chunk markers of a resumable build, JSON reports. Each file kind x fault (truncated to half,
one bit flipped in the middle, deleted) must be detected, refused with a message naming the file, or
provably harmless; the table is in docs/RELIABILITY.md.

The stages are the real smoke chain (``configs/vqvq.py:smoke``, built once per module in a subprocess,
~15 s) and each case works on a copy."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from uvjax import integrity_files as itg
from uvjax import stage_log
from uvjax.stages import cache as stages
from uvjax.integrity_files import StageCacheDamaged

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = ("truncate", "flip", "delete")

PREPARE = """
import json, sys
from uvjax.config import load_config_file
from uvjax.stages.prepare import prepare
cfg = load_config_file("vqvq", "smoke")
with cfg.unlocked():
    cfg.stages.cache_dir = sys.argv[1]
_, paths = prepare(cfg, sys.argv[2], progress=False)
print(json.dumps({k: v for k, v in paths.items() if isinstance(v, str) or v is None}))
"""


def _prepare(cache, workdir):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", PREPARE, str(cache), str(workdir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def fault(path, kind):
    """Truncate to half, flip one bit in the middle, or delete ``path``."""
    if kind == "delete":
        os.remove(path)
        return
    data = bytearray(open(path, "rb").read())
    if kind == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(bytes(data))


def _no_build(out):
    raise AssertionError("a damaged stage must not be rebuilt silently")


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("drill")
    proc = _prepare(root / "cache", root / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture
def case(smoke_cache, tmp_path):
    """A copy of the smoke stage cache (and the work dir that used it): {stage name: (dir, fingerprint)}."""
    shutil.copytree(smoke_cache / "cache", tmp_path / "cache")
    shutil.copytree(smoke_cache / "run", tmp_path / "run")
    dirs = {}
    for d in sorted(glob.glob(str(tmp_path / "cache" / "*-*"))):
        name, fp = os.path.basename(d).rsplit("-", 1)
        if os.path.exists(os.path.join(d, "DONE.json")):
            dirs[name] = (d, fp)
    assert {"tokenizer", "vq", "dataset"} <= set(dirs), dirs
    return tmp_path, dirs


def _reuse(tmp_path, dirs, name, workdir=None):
    d, fp = dirs[name]
    log = stage_log.StageLog(str(workdir or tmp_path / "run"))
    return stages.cached_stage(name, fp, str(tmp_path / "cache"), _no_build, log)


# ------------------------------------------------------------------------------------------------ manifests
def test_finished_stages_record_a_manifest_and_reuse_verifies_it(case):
    tmp_path, dirs = case
    for name, (d, fp) in dirs.items():
        info = itg.load_done(d)
        files = info["manifest"]["files"]
        on_disk = {os.path.relpath(p, d).replace(os.sep, "/") for p in glob.glob(d + "/**/*", recursive=True)
                   if os.path.isfile(p)} | {os.path.relpath(p, d) for p in glob.glob(d + "/**/.*", recursive=True)
                                            if os.path.isfile(p)}
        assert set(files) == on_disk - {"DONE.json"}, name
        for rel, v in files.items():
            assert v["size"] == os.path.getsize(os.path.join(d, rel))
            assert v["sha256"] == itg.sha256_file(os.path.join(d, rel))
        assert info["fingerprint"] == fp and "seconds" in info  # the existing keys are kept
        out, got = _reuse(tmp_path, dirs, name)
        assert out == d and "manifest" not in got and "digest" not in got
    log = stage_log.read_stage_log(str(tmp_path / "run"))
    reused = [r for r in log if r["reused"]]
    assert reused and all(r["verified"] and r["content"] for r in reused)
    ds = dirs["dataset"][0]
    assert any(k.endswith(".array_record") for k in itg.load_done(ds)["manifest"]["files"])
    assert any("/.train-chunk" in k for k in itg.load_done(ds)["manifest"]["files"])


STAGE_FILES = [("tokenizer", "tokenizer.json"), ("vq", "vq.safetensors"), ("vq", "vq_config.json"),
               ("dataset", "train/train-understanding-*.array_record"), ("dataset", "test/.test-chunk00000.done")]


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("stage,pattern", STAGE_FILES)
def test_a_damaged_stage_file_is_refused_with_the_file_named(case, stage, pattern, kind):
    tmp_path, dirs = case
    d = dirs[stage][0]
    target = sorted(glob.glob(os.path.join(d, pattern)))[0]
    rel = os.path.relpath(target, d)
    want = itg.load_done(d)["manifest"]["files"][rel]
    fault(target, kind)
    with pytest.raises(StageCacheDamaged) as e:
        _reuse(tmp_path, dirs, stage)
    msg = str(e.value)
    assert d in msg and rel in msg and "mv " in msg and ".damaged" in msg
    found = {"delete": "missing", "truncate": f"{want['size'] // 2} bytes", "flip": "sha256"}[kind]
    assert f"expected {want['size']} bytes" in msg or f"expected sha256 {want['sha256'][:16]}" in msg
    assert f"found {found}" in msg
    assert e.value.directory == d and e.value.problems[0][0] == rel
    # the same check guards the paths consumers look up after training (evaluate, generate)
    stage_log.StageLog(str(tmp_path / "eval")).write(stage=stage, fingerprint=dirs[stage][1], reused=True, path=d)
    with pytest.raises(StageCacheDamaged):
        stage_log.stage_dir(str(tmp_path / "eval"), stage)


@pytest.mark.parametrize("kind", FAULTS)
def test_a_damaged_done_json_is_refused(case, kind):
    tmp_path, dirs = case
    d = dirs["vq"][0]
    fault(os.path.join(d, "DONE.json"), kind)
    with pytest.raises(StageCacheDamaged) as e:
        _reuse(tmp_path, dirs, "vq")
    assert os.path.join(d, "DONE.json") in str(e.value) or (kind == "delete" and "DONE.json is missing" in str(e.value))
    assert d in str(e.value)


def test_a_flipped_value_in_done_json_that_still_parses_is_caught_by_its_digest(case):
    tmp_path, dirs = case
    d = dirs["dataset"][0]
    p = os.path.join(d, "DONE.json")
    text = open(p).read()
    assert '"image_tokens": 16' in text
    with open(p, "w") as f:
        f.write(text.replace('"image_tokens": 16', '"image_tokens": 17'))  # '6' ^ 0x01: still valid JSON
    with pytest.raises(StageCacheDamaged, match="does not match its digest"):
        _reuse(tmp_path, dirs, "dataset")


def test_an_extra_shard_dropped_into_a_stage_is_refused(case):
    tmp_path, dirs = case
    d = dirs["dataset"][0]
    src = sorted(glob.glob(os.path.join(d, "train", "train-generation-*.array_record")))[0]
    shutil.copy(src, os.path.join(d, "train", "train-generation-c99999-00000.array_record"))
    with pytest.raises(StageCacheDamaged, match="an extra file"):
        _reuse(tmp_path, dirs, "dataset")


def test_stage_finished_before_manifests_is_reused_unverified_with_one_line(case, capsys):
    tmp_path, dirs = case
    d, fp = dirs["tokenizer"]
    info = json.load(open(os.path.join(d, "DONE.json")))
    old = {k: v for k, v in info.items() if k not in ("manifest", "digest", "content")}
    with open(os.path.join(d, "DONE.json"), "w") as f:
        json.dump(old, f)
    said = []
    out, got = stages.cached_stage("tokenizer", fp, str(tmp_path / "cache"), _no_build,
                                   stage_log.StageLog(str(tmp_path / "new")), progress=said.append)
    assert out == d and got == old
    assert sum("UNVERIFIED" in m for m in said) == 1
    rec = stage_log.read_stage_log(str(tmp_path / "new"))[-1]
    assert rec["reused"] and rec["verified"] is False


# ------------------------------------------------------------------------------------------------ rebuilds
def test_moved_aside_stage_is_rebuilt_and_accepted_only_when_bit_identical(case):
    """The real chain: the tokenizer damaged -> the run is refused; moved aside -> the rerun rebuilds the
    tokenizer (BPE training is deterministic), finds it bit-identical to the damaged one's record and reuses
    the other stages, verified. (The VQ stage is not reproducible bit for bit on CPU: XLA's threaded
    reductions differ from run to run, so a damaged VQ's rebuild is refused: test below, with a tiny stage.)"""
    tmp_path, dirs = case
    d = dirs["tokenizer"][0]
    fault(os.path.join(d, "tokenizer.json"), "flip")
    bad = _prepare(tmp_path / "cache", tmp_path / "run")
    assert bad.returncode != 0 and "StageCacheDamaged" in bad.stderr and "tokenizer.json" in bad.stderr
    os.rename(d, d + ".damaged")
    good = _prepare(tmp_path / "cache", tmp_path / "run")
    assert good.returncode == 0, good.stderr[-3000:]
    log = stage_log.read_stage_log(str(tmp_path / "run"))[-3:]
    assert [(r["stage"], r["reused"]) for r in log] == [("tokenizer", False), ("vq", True), ("dataset", True)]
    assert log[0]["content"] == itg.load_done(d + ".damaged")["content"]
    itg.verify_stage(d, itg.load_done(d), full=True)


def _tiny(payload):
    def build(out):
        os.makedirs(os.path.join(out, "sub"), exist_ok=True)
        with open(os.path.join(out, "sub", "weights.bin"), "wb") as f:
            f.write(payload)
        with open(os.path.join(out, "x_metrics.json"), "w") as f:  # volatile: not part of the content
            json.dump({"train_time_s": float(np.random.rand())}, f)
        return {"n": len(payload)}
    return build


def test_a_rebuild_that_differs_is_not_used(tmp_path):
    cache, log = str(tmp_path / "cache"), stage_log.StageLog(str(tmp_path / "run"))
    out, info = stages.cached_stage("tiny", "abc", cache, _tiny(b"a" * 100), log)
    assert info == {"n": 100, "fingerprint": "abc", "seconds": info["seconds"]}
    os.rename(out, out + ".damaged")
    with pytest.raises(StageCacheDamaged, match="not bit-identical") as e:
        stages.cached_stage("tiny", "abc", cache, _tiny(b"b" * 100), log)
    assert "sub/weights.bin" in str(e.value) and not os.path.exists(out)  # the rebuild is not promoted
    # an identical rebuild (its timing report differs) is accepted
    out2, _ = stages.cached_stage("tiny", "abc", cache, _tiny(b"a" * 100), log)
    assert out2 == out and open(os.path.join(out, "sub", "weights.bin"), "rb").read() == b"a" * 100


def test_a_run_never_continues_on_a_stage_whose_content_changed(tmp_path):
    """Deleted (not moved aside) and rebuilt differently: the work dir that used the original refuses it;
    a new work dir uses the rebuild."""
    cache = str(tmp_path / "cache")
    out, _ = stages.cached_stage("tiny", "abc", cache, _tiny(b"a" * 100), stage_log.StageLog(str(tmp_path / "run")))
    shutil.rmtree(out)
    with pytest.raises(StageCacheDamaged, match="not the one this run used before"):
        stages.cached_stage("tiny", "abc", cache, _tiny(b"c" * 100), stage_log.StageLog(str(tmp_path / "run")))
    shutil.rmtree(out + ".partial")
    out2, info = stages.cached_stage("tiny", "abc", cache, _tiny(b"c" * 100), stage_log.StageLog(str(tmp_path / "new")))
    assert info["n"] == 100


def _fake_bucket(tmp_path, monkeypatch):
    """gs://b/ is the local folder returned (storage_paths' listing, upload and download patched)."""
    from uvjax import storage_paths as sp
    bucket = tmp_path / "bucket"
    monkeypatch.setenv("UVJAX_CACHE", str(tmp_path / "uvjax-cache"))
    real_exists = sp.exists
    to_local = lambda url: str(bucket / url[len("gs://b/"):])
    monkeypatch.setattr(sp, "exists", lambda p: real_exists(to_local(p) if str(p).startswith("gs://") else p))
    monkeypatch.setattr(sp, "upload", lambda src, dst, exclude=(): shutil.copytree(src, to_local(dst), dirs_exist_ok=True,
                                                                           ignore=lambda d, n: [x for x in n if x in exclude])
                        if os.path.isdir(src) else shutil.copy(src, to_local(dst)))

    def local_tree(url, cache_dir, *, key=None):
        dst = sp.tree_mirror_path(url, cache_dir, key)
        if not os.path.isdir(dst):
            shutil.copytree(to_local(url), dst)
        return dst
    monkeypatch.setattr(sp, "local_tree", local_tree)
    return bucket


def test_a_damaged_local_mirror_of_a_gs_stage_is_fetched_again_and_a_damaged_bucket_refused(tmp_path, monkeypatch):
    """gs:// stages: the bucket is a local folder here (storage_paths' listing and download patched); the
    mirror is verified as a local stage is."""
    bucket = _fake_bucket(tmp_path, monkeypatch)
    log = stage_log.StageLog(str(tmp_path / "run"))
    mirror, _ = stages.cached_stage("tiny", "abc", "gs://b/cache", _tiny(b"a" * 64), log)
    assert os.path.exists(bucket / "cache" / "tiny-abc" / "DONE.json")
    fault(os.path.join(mirror, "sub", "weights.bin"), "flip")
    said = []
    again, _ = stages.cached_stage("tiny", "abc", "gs://b/cache", _no_build, log, progress=said.append)
    assert again == mirror and open(os.path.join(mirror, "sub", "weights.bin"), "rb").read() == b"a" * 64
    assert any("is damaged (moved to" in m for m in said) and glob.glob(mirror + ".damaged-*")
    fault(str(bucket / "cache" / "tiny-abc" / "sub" / "weights.bin"), "truncate")
    shutil.rmtree(mirror)
    with pytest.raises(StageCacheDamaged, match="copy in the bucket is damaged") as e:
        stages.cached_stage("tiny", "abc", "gs://b/cache", _no_build, log)
    assert "gs://b/cache/tiny-abc" in str(e.value) and "sub/weights.bin" in str(e.value)


# ------------------------------------------------------------------------------------------------ shards at read
@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    from datasets import make_code_dataset
    root = tmp_path_factory.mktemp("shard")
    make_code_dataset(str(root), num_images=12, vocab_size=300)
    return sorted(glob.glob(str(root / "understanding" / "*.array_record")))[0]


def _read_all(path):
    from uvjax.data.storage import RecordReader
    r = RecordReader([path])
    return [r.read_bytes(i) for i in range(len(r))]


def test_big_stages_skip_hashing_shards_but_check_their_sizes(case, monkeypatch):
    tmp_path, dirs = case
    monkeypatch.setenv("UVJAX_STAGE_HASH_LIMIT_MB", "0")
    d = dirs["dataset"][0]
    info = itg.load_done(d)
    r = itg.verify_stage(d, info)
    assert not r["shards_hashed"] and r["hashed_bytes"] < r["bytes"]
    target = sorted(glob.glob(os.path.join(d, "train", "*.array_record")))[0]
    fault(target, "truncate")
    with pytest.raises(StageCacheDamaged, match="bytes"):
        itg.verify_stage(d, info)


def test_riegeli_detects_every_flipped_bit_in_a_shard_at_read_and_names_it(shard, tmp_path):
    """What a big stage's shards rely on between starts: every bit flip that changes a record's bytes is
    caught by riegeli's chunk hashes at read, and the error names the shard and record. Flips in the block
    padding leave every record identical (harmless)."""
    data = open(shard, "rb").read()
    clean = _read_all(shard)
    used = max(i for i, b in enumerate(data) if b) + 1
    p = str(tmp_path / "x.array_record")
    caught = same = 0
    for off in range(0, min(len(data), used + 4096), 13):
        b = bytearray(data)
        b[off] ^= 1 << (off % 8)
        open(p, "wb").write(bytes(b))
        try:
            got = _read_all(p)
        except ValueError as e:
            assert p in str(e) and "damaged" in str(e) or "unreadable record" in str(e), str(e)
            caught += 1
            continue
        assert got == clean, f"a flip at byte {off} changed a record silently"
        same += 1
    assert caught > 100 and same > 0
    # truncation: refused when the shard is opened, naming it
    open(p, "wb").write(data[:len(data) // 2])
    with pytest.raises(ValueError, match="is damaged or not an ArrayRecord file") as e:
        _read_all(p)
    assert p in str(e.value)


# ------------------------------------------------------------------------------------------------ chunk markers
def test_a_damaged_chunk_marker_of_a_partial_build_redoes_its_chunk(tmp_path, caplog):
    from test_pretokenise import _enc
    from llava_fixture import write_llava
    from uvjax import pretokenise as pt
    from uvjax.data.importers.convert import convert
    src = write_llava(str(tmp_path / "src"), n_images=4)
    convert(src["json"], str(tmp_path / "conv"), format="llava", image_dir=src["images"])
    shards = sorted(glob.glob(str(tmp_path / "conv" / "*.array_record")))
    out = str(tmp_path / "pt")
    ref = pt.pretokenise_shards(shards, _enc(), out, chunk=4)
    for kind in FAULTS:
        marker = os.path.join(out, ".train-chunk00000.done")
        fault(marker, kind)
        caplog.clear()
        got = pt.pretokenise_shards(shards, _enc(), out, chunk=4)
        assert got["records_written"] == ref["records_written"] and got["records_read"] == ref["records_read"]
        assert itg.read_marker(marker) is not None  # rewritten
        if kind != "delete":
            assert any(marker in r.message and "chunk is redone" in r.message for r in caplog.records), kind


def test_marker_digest_catches_a_count_that_still_parses(tmp_path, caplog):
    p = str(tmp_path / ".x-chunk00000.done")
    itg.write_marker(p, {"records": 10})
    assert itg.read_marker(p) == {"records": 10}
    text = open(p).read()
    open(p, "w").write(text.replace('"records": 10', '"records": 11'))
    assert itg.read_marker(p) is None and "does not match its digest" in caplog.text


# ------------------------------------------------------------------------------------------------ JSON lines
def _metrics(tmp_path):
    from uvjax.training.metrics import MetricWriter
    w = MetricWriter(str(tmp_path), enabled=True)
    for s in range(1, 7):
        w.write(s, {"loss": 1.0 / s, "lr": 1e-3})
    w.close()
    return str(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("kind", FAULTS)
def test_damaged_metrics_lines_are_left_out_counted_and_named(tmp_path, kind, caplog):
    from uvjax.training.metrics import read_metrics
    path = _metrics(tmp_path)
    ref = read_metrics(str(tmp_path))
    assert sorted(ref) == list(range(1, 7)) and not ref.damaged and "crc32" not in ref[1]
    mid_line = open(path).read()[:len(open(path).read()) // 2].count("\n") + 1
    fault(path, kind)
    got = read_metrics(str(tmp_path))
    if kind == "delete":  # training never reads metrics back: the run is unaffected, the log is gone
        assert got == {} and not got.damaged
        return
    assert len(got.damaged) == 1 and f"{path}:{mid_line}:" in got.damaged[0]
    assert f"{path}:{mid_line}" in caplog.text
    for s, rec in got.items():
        assert rec == ref[s]  # what is kept is exactly what was written
    assert len(got) == (mid_line - 1 if kind == "truncate" else 5)


def test_a_flipped_digit_in_a_metrics_line_is_caught_by_its_crc(tmp_path):
    from uvjax.training.metrics import read_metrics
    path = _metrics(tmp_path)
    lines = open(path).read().splitlines()
    lines[2] = lines[2].replace('"step": 3', '"step": 2')  # '3' ^ 0x01: still valid JSON
    open(path, "w").write("\n".join(lines) + "\n")
    got = read_metrics(str(tmp_path))
    assert len(got.damaged) == 1 and ":3:" in got.damaged[0] and got[2]["loss"] == 0.5


def test_metrics_written_before_crcs_are_read_as_before(tmp_path):
    from uvjax.training.metrics import read_metrics
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"ste')
    got = read_metrics(str(tmp_path))
    assert got == {1: {"step": 1, "loss": 2.0}, 2: {"step": 2, "loss": 1.0}} and len(got.damaged) == 1
    # resumed with this version: old lines stay readable, new ones are checked
    from uvjax.integrity_files import seal_line
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n' + seal_line({"step": 2, "loss": 1.0})
                                            + '{"step": 3, "loss": 0.5}\n')
    got = read_metrics(str(tmp_path))
    assert sorted(got) == [1, 2] and len(got.damaged) == 1 and ":3: damaged metrics line (checksum missing)" in got.damaged[0]


@pytest.mark.parametrize("kind", FAULTS)
def test_damaged_stage_log_lines_are_left_out_with_a_warning(case, kind, caplog):
    tmp_path, dirs = case
    run = str(tmp_path / "run")
    path = os.path.join(run, "stages.jsonl")
    ref = stage_log.read_stage_log(run)
    assert len(ref) >= 3
    fault(path, kind)
    got = stage_log.read_stage_log(run)
    if kind == "delete":
        # stages are found by fingerprint, not through the log: the next run reuses them (verified) and
        # writes the log again
        assert got == []
        _reuse(tmp_path, dirs, "vq")
        assert [r["stage"] for r in stage_log.read_stage_log(run)] == ["vq"]
        return
    assert len(got) == len(ref) - 1 if kind == "flip" else len(got) < len(ref)
    assert all(r in ref for r in got)  # nothing altered is returned
    assert path in caplog.text and "damaged stage record" in caplog.text


# ------------------------------------------------------------------------------------------------ JSON reports
def test_damaged_json_reports_name_the_file(tmp_path):
    from uvjax import pretokenise as pt
    (tmp_path / "report-train.json").write_text('{"records_read": 3, "records_wr')
    with pytest.raises(itg.DamagedFile, match="report-train.json: damaged pre-tokenisation report"):
        pt.merge_reports(str(tmp_path), "train")
    (tmp_path / "import_manifest.json").write_text('{"image_dir": "/x", "for')
    with pytest.raises(ValueError, match="import_manifest.json: damaged import manifest"):
        pt.image_root_of([str(tmp_path / "train-00000.array_record")])


# ------------------------------------------------------------------------------------------------ input stages
def _reseal(d, mutate=None):
    """Rewrites ``d``'s DONE.json as a build would have written it: ``mutate(info)``, fresh manifest, sealed."""
    info = itg.load_done(d)
    if mutate:
        mutate(info)
    manifest = itg.build_manifest(d)
    info = itg.seal({**{k: v for k, v in info.items() if k != "digest"}, "manifest": manifest,
                     "content": itg.content_digest(manifest)})
    with open(os.path.join(d, "DONE.json"), "w") as f:
        json.dump(info, f)


def _from(src, tag, name="sub/weights.bin"):
    """A stage built from the stage in ``src``: its file ``name``, transformed."""
    def build(out):
        data = open(os.path.join(src, *name.split("/")), "rb").read()
        with open(os.path.join(out, "derived.bin"), "wb") as f:
            f.write(tag + data[::-1])
        return {"from": len(data)}
    return build


def test_a_stage_built_from_an_input_stage_that_changed_is_refused(tmp_path):
    """The VQ deleted (not moved aside) and rebuilt differently: a fresh work dir must not reuse the dataset
    encoded with the old VQ (fingerprints hash configs, not the inputs' bytes). Tiny stages stand in for
    vq -> dataset -> lengths; a user's file (not a stage) is not recorded."""
    cache = str(tmp_path / "cache")
    user = tmp_path / "user-tower"
    user.mkdir()
    (user / "tower.bin").write_bytes(b"given")
    log1 = stage_log.StageLog(str(tmp_path / "run1"))
    vq, _ = stages.cached_stage("vq", "v1", cache, _tiny(b"a" * 100), log1)
    ds, info = stages.cached_stage("dataset", "d1", cache, _from(vq, b"x"), log1,
                                   inputs={"vq": vq, "siglip": None, "tower": str(user)})
    assert info == {"from": 100, "fingerprint": "d1", "seconds": info["seconds"]}  # callers see no integrity keys
    vq_content = itg.load_done(vq)["content"]
    assert itg.load_done(ds)["inputs"] == {"vq": vq_content}
    assert stage_log.read_stage_log(str(tmp_path / "run1"))[-1]["inputs"]["vq"]["content"] == vq_content
    lengths, _ = stages.cached_stage("lengths", "l1", cache, _from(ds, b"l", "derived.bin"), log1,
                                     inputs={"dataset": ds})
    # unchanged inputs: reused, verified
    assert stages.cached_stage("dataset", "d1", cache, _no_build, log1, inputs={"vq": vq})[0] == ds
    # the VQ deleted and rebuilt differently, in a fresh work dir (the old one refuses the VQ itself)
    shutil.rmtree(vq)
    log2 = stage_log.StageLog(str(tmp_path / "run2"))
    stages.cached_stage("vq", "v1", cache, _tiny(b"b" * 100), log2)
    new_content = itg.load_done(vq)["content"]
    with pytest.raises(StageCacheDamaged) as e:
        stages.cached_stage("dataset", "d1", cache, _no_build, log2, inputs={"vq": vq})
    msg = str(e.value)
    assert "stage dataset in " + ds in msg and f"the vq stage now in use ({vq})" in msg
    assert vq_content[:16] in msg and new_content[:16] in msg
    assert f"mv {ds} {ds}.stale" in msg and "restore the original vq" in msg and "new work directory" in msg
    assert e.value.problems == [("inputs/vq", f"content {vq_content}", f"content {new_content}")]
    # moved aside as told: rebuilt from the current VQ and reused from then on
    os.rename(ds, ds + ".stale")
    ds2, _ = stages.cached_stage("dataset", "d1", cache, _from(vq, b"x"), log2, inputs={"vq": vq})
    assert open(os.path.join(ds2, "derived.bin"), "rb").read() == b"x" + b"b" * 100
    assert itg.load_done(ds2)["inputs"] == {"vq": new_content}
    assert stages.cached_stage("dataset", "d1", cache, _no_build, log2, inputs={"vq": vq})[0] == ds2
    # a stage built from the old dataset is refused in turn
    with pytest.raises(StageCacheDamaged, match="stage lengths in .* was built from other dataset stage content"):
        stages.cached_stage("lengths", "l1", cache, _no_build, log2, inputs={"dataset": ds2})
    # a stage finished before inputs were recorded is reused as before
    _reseal(lengths, lambda info: info.pop("inputs"))
    assert stages.cached_stage("lengths", "l1", cache, _no_build, log2, inputs={"dataset": ds2})[0] == lengths
    # the record is sealed: an edited input digest that still parses fails the digest
    p = os.path.join(ds2, "DONE.json")
    text = open(p).read()
    open(p, "w").write(text.replace(new_content, vq_content))
    with pytest.raises(StageCacheDamaged, match="does not match its digest"):
        stages.cached_stage("dataset", "d1", cache, _no_build, log2, inputs={"vq": vq})


def test_a_gs_stage_built_from_an_input_that_changed_is_refused_not_downloaded_again(tmp_path, monkeypatch):
    bucket = _fake_bucket(tmp_path, monkeypatch)
    log = stage_log.StageLog(str(tmp_path / "run"))
    vq, _ = stages.cached_stage("vq", "v1", "gs://b/cache", _tiny(b"a" * 10), log)
    ds, _ = stages.cached_stage("dataset", "d1", "gs://b/cache", _from(vq, b"x"), log, inputs={"vq": vq})
    assert itg.load_done(ds)["inputs"] == {"vq": itg.load_done(vq)["content"]}
    shutil.rmtree(vq)
    shutil.rmtree(bucket / "cache" / "vq-v1")
    vq2, _ = stages.cached_stage("vq", "v1", "gs://b/cache", _tiny(b"b" * 10), stage_log.StageLog(str(tmp_path / "new")))
    with pytest.raises(stages.StageInputsChanged) as e:
        stages.cached_stage("dataset", "d1", "gs://b/cache", _no_build, stage_log.StageLog(str(tmp_path / "new")),
                            inputs={"vq": vq2})
    assert "gcloud storage mv gs://b/cache/dataset-d1 gs://b/cache/dataset-d1.stale" in str(e.value)
    assert not glob.glob(ds + ".damaged-*")  # the sound local copy is not moved aside


def test_a_killed_build_is_resumed_only_from_the_same_inputs(tmp_path):
    cache = str(tmp_path / "cache")
    log = stage_log.StageLog(str(tmp_path / "run"))
    vq, _ = stages.cached_stage("vq", "v1", cache, _tiny(b"a" * 10), log)
    seen = []

    def build(out):
        seen.append(sorted(os.listdir(out)))
        return _from(vq, b"x")(out)
    partial = os.path.join(cache, "dataset-d1.partial")
    os.makedirs(partial)
    open(os.path.join(partial, "chunk0.bin"), "w").write("made from another vq")
    open(os.path.join(partial, stages.INPUTS_FILE), "w").write(json.dumps({"vq": "0" * 64}))
    said = []
    ds, _ = stages.cached_stage("dataset", "d1", cache, build, log, progress=said.append, inputs={"vq": vq})
    assert seen[-1] == [stages.INPUTS_FILE]  # the old chunk is gone; the record of this build's inputs is there
    assert any("started from other inputs" in m and "starting it over" in m for m in said)
    assert stages.INPUTS_FILE not in itg.load_done(ds)["manifest"]["files"] and not os.path.exists(
        os.path.join(ds, stages.INPUTS_FILE))
    # the same inputs: the chunk of the killed build is kept (resumed)
    shutil.rmtree(ds)
    os.makedirs(partial)
    stages._start_partial("dataset", partial, stages._input_contents({"vq": vq}), None)  # as a killed build left it
    open(os.path.join(partial, "chunk0.bin"), "w").write("made from this vq")
    stages.cached_stage("dataset", "d1", cache, build, stage_log.StageLog(str(tmp_path / "new")), inputs={"vq": vq})
    assert seen[-1] == sorted(["chunk0.bin", stages.INPUTS_FILE])
    # the record truncated, flipped or deleted: started over, with a line saying so
    for kind in FAULTS:
        shutil.rmtree(ds)
        os.makedirs(partial)
        stages._start_partial("dataset", partial, stages._input_contents({"vq": vq}), None)
        open(os.path.join(partial, "chunk0.bin"), "w").write("made from an unknown vq")
        fault(os.path.join(partial, stages.INPUTS_FILE), kind)
        said.clear()
        stages.cached_stage("dataset", "d1", cache, build, stage_log.StageLog(str(tmp_path / kind)), progress=said.append,
                            inputs={"vq": vq})
        assert seen[-1] == [stages.INPUTS_FILE] and any("starting it over" in m for m in said), kind


def test_the_smoke_chain_records_its_inputs_and_a_changed_vq_refuses_the_dataset(case):
    """The real graph (prepare): the dataset records the VQ stage's content; a VQ that changed (here: its
    config file rewritten and the stage resealed, as a different rebuild would be) makes a fresh work dir
    refuse the dataset, naming both stages."""
    tmp_path, dirs = case
    vq, ds = dirs["vq"][0], dirs["dataset"][0]
    assert itg.load_done(ds)["inputs"] == {"vq": itg.load_done(vq)["content"]}
    assert "inputs" not in itg.load_done(vq) and "inputs" not in itg.load_done(dirs["tokenizer"][0])
    p = os.path.join(vq, "vq_config.json")
    open(p, "a").write("\n")
    _reseal(vq)
    bad = _prepare(tmp_path / "cache", tmp_path / "fresh")
    assert bad.returncode != 0 and "StageInputsChanged" in bad.stderr, bad.stderr[-3000:]
    assert f"stage dataset in {ds}" in bad.stderr and f"the vq stage now in use ({vq})" in bad.stderr


# ------------------------------------------------------------------------------------------------ JSON read back
def _tiny_judge():
    import jax
    import jax.numpy as jnp
    from uvjax.evaluation import judge as jm
    cfg = jm.JudgeConfig(image_size=16, width=2, feature_dim=4, steps=1, batch_size=2, eval_images=2,
                         warmup_steps=1, augment=False)
    params = jm.JudgeNet(cfg.width, cfg.feature_dim).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    return jm.Judge(cfg, params, {"heldout_accuracy": {"weather": 0.5}})


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("name", ["judge.json", "judge.safetensors"])
def test_a_damaged_judge_cache_is_named_and_retrained_with_a_warning(tmp_path, monkeypatch, caplog, name, kind):
    from uvjax.evaluation import judge as jm
    d = str(tmp_path / "judge")
    _tiny_judge().save(d)
    assert jm.Judge.load(d).report == {"heldout_accuracy": {"weather": 0.5}}
    fault(os.path.join(d, name), kind)
    if name == "judge.safetensors" and kind == "delete":
        with pytest.raises(FileNotFoundError):
            jm.Judge.load(d)
    else:
        with pytest.raises(jm.JudgeCacheDamaged) as e:
            jm.Judge.load(d)
        assert os.path.join(d, name) in str(e.value) and "trained again" in str(e.value)
    trained = []
    monkeypatch.setattr(jm, "train_judge", lambda cfg, out, progress=False: trained.append(cfg) or
                        _tiny_judge().save(out) and jm.Judge.load(out))
    caplog.set_level("WARNING")
    got = jm.load_or_train(d)
    assert len(trained) == 1 and isinstance(got, jm.Judge)
    assert f"judge cache {d} is damaged" in caplog.text and "trained again" in caplog.text
    if name == "judge.safetensors":  # judge.json still sound: the same config is trained again
        assert trained[0] == _tiny_judge().cfg


def test_a_flipped_judge_accuracy_that_still_parses_is_caught_by_its_digest(tmp_path):
    from uvjax.evaluation import judge as jm
    d = str(tmp_path / "judge")
    _tiny_judge().save(d)
    p = os.path.join(d, "judge.json")
    text = open(p).read()
    assert '"weather": 0.5' in text
    open(p, "w").write(text.replace('"weather": 0.5', '"weather": 0.7'))
    with pytest.raises(jm.JudgeCacheDamaged, match="does not match its digest"):
        jm.Judge.load(d)


def test_damaged_budget_json_is_measured_again_with_a_warning(tmp_path, capsys):
    from uvjax.experiments.budget import read_budget, write_budget
    path = str(tmp_path / "budget.json")
    budget = {"single": {"key": "k", "examples_per_step": 12.5, "shares": {"generation": 1.0}}}
    write_budget(path, budget)
    assert read_budget(path) == budget
    text = open(path).read()
    open(path, "w").write(text.replace("12.5", "12.7"))  # still valid JSON: the digest catches it
    assert read_budget(path) == {} and os.path.exists(path + ".damaged")
    assert f"{path}: damaged budget cache: its content does not match its digest" in capsys.readouterr().out
    open(path, "w").write(text)
    fault(path, "truncate")
    assert read_budget(path) == {}
    assert f"{path}: damaged budget cache: not valid JSON" in capsys.readouterr().out


def test_a_damaged_experiment_done_json_is_refused_naming_it(tmp_path):
    from uvjax.experiments import runs
    p = tmp_path / "DONE.json"
    p.write_text(json.dumps({"key": "k", "metrics": {"vqa": 0.5}}))  # written before digests: read as before
    assert runs.load_done(str(tmp_path)) == {"key": "k", "metrics": {"vqa": 0.5}}
    p.write_text(json.dumps(itg.seal({"key": "k", "metrics": {"vqa": 0.5}})))
    assert runs.load_done(str(tmp_path)) == {"key": "k", "metrics": {"vqa": 0.5}}
    p.write_text(p.read_text().replace("0.5", "0.7"))  # still valid JSON: the digest catches it
    with pytest.raises(itg.DamagedFile, match="does not match its digest"):
        runs.load_done(str(tmp_path))
    fault(str(p), "truncate")
    with pytest.raises(itg.DamagedFile) as e:
        runs.load_done(str(tmp_path))
    assert f"{p}: damaged record of a finished experiment run: not valid JSON" in str(e.value)
    assert f"mv {p} {p}.damaged" in str(e.value)


def test_a_damaged_vq_config_json_is_named_by_evaluate_and_generate(tmp_path):
    import ml_collections as mlc
    from uvjax.evaluation import run as evaluate
    p = tmp_path / "vq_config.json"
    p.write_text(json.dumps({"data": {"image_size": 48}, "model": {"codebook_size": 64}}))
    vq = str(tmp_path / "vq.safetensors")
    cfg = mlc.ConfigDict({"data": {"image_size": 0}})
    assert evaluate._image_size(str(tmp_path), cfg, vq) == 48
    fault(str(p), "truncate")
    with pytest.raises(itg.DamagedFile, match="vq_config.json: damaged VQ tokenizer config: not valid JSON") as e:
        evaluate._image_size(str(tmp_path), cfg, vq)
    assert str(p) in str(e.value) and "mv DIR DIR.damaged" in str(e.value)
    from uvjax import api  # what uvjax.generate, the demo and the notebook API size images by
    with pytest.raises(itg.DamagedFile, match="damaged VQ tokenizer config"):
        api.image_size_of(str(tmp_path), cfg, vq)


def test_a_damaged_run_config_json_is_named_when_loading_a_run(tmp_path):
    from uvjax.inference.loading import load_config
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"train": {"steps": 5}, "model": {"vocab_size": 300}}))
    assert load_config(str(tmp_path)).train.steps == 5
    fault(str(p), "truncate")
    with pytest.raises(itg.DamagedFile) as e:
        load_config(str(tmp_path))
    assert f"{p}: damaged run config: not valid JSON" in str(e.value) and "rewrites config.json" in str(e.value)


@pytest.mark.parametrize("name", ["uvjax_tokenizer.json", "tokenizer.json"])
def test_a_damaged_tokenizer_file_is_named(tmp_path, name):
    from uvjax.data.tokenizer import TextTokenizer, template_texts, train_bpe
    d = str(tmp_path / "tok")
    train_bpe(["hello world"] * 20 + template_texts(), vocab_size=300).save(d)
    assert TextTokenizer.load(d).vocab_size > 0
    fault(os.path.join(d, name), "truncate")
    with pytest.raises(itg.DamagedFile) as e:
        TextTokenizer.load(d)
    assert str(e.value).startswith(os.path.join(d, name) + ": damaged tokenizer") and "mv " + d in str(e.value)
