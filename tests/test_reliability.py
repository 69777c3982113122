"""Faults injected into the real train command (docs/RELIABILITY.md): process kills during an
asynchronous save, SIGTERM in the first compile and during a save, disk full, corrupted checkpoints,
two runs on one work directory, NaN / spiking losses.

The subprocess tests run ``python -m uvjax.train`` with the smoke config and the small code dataset
of ``tests/datasets.py`` (as ``tests/test_train_loop.py`` does). Faults that need a hook inside the
process (a slow checkpoint commit) run this file as the command instead: its ``__main__`` installs
the hook, then runs ``uvjax.train.main`` with the same flags.
"""
import asyncio
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from datasets import make_code_dataset  # tests/datasets.py (imported first, before HF's package)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_MARK = ".orbax-checkpoint-tmp"
STEPS, EVERY = 12, 3


# ------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_code_dataset(str(tmp_path_factory.mktemp("codes")))


def _cmd(ds, workdir, steps=STEPS, every=EVERY, extra=(), hooked=False):
    head = [sys.executable, os.path.abspath(__file__)] if hooked else [sys.executable, "-m", "uvjax.train"]
    return head + ["--config=configs/vqvq.py:smoke", f"--workdir={workdir}",
                   f"--config.data.tokenizer={ds['tokenizer']}",
                   f"--config.data.streams.understanding.paths=('{ds['paths']['understanding']}',)",
                   f"--config.data.streams.generation.paths=('{ds['paths']['generation']}',)",
                   f"--config.train.steps={steps}", f"--config.train.checkpoint_every={every}",
                   "--config.train.log_every=1", "--config.train.progress=False", "--config.stages.build=False",
                   *extra]


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start(cmd, **env):
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _run(cmd, **env):
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=300)


def _metrics(workdir):
    from uvjax.training.metrics import read_metrics
    return read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else {}


def _ckpt_dir(workdir):
    return os.path.join(workdir, "checkpoints")


def _steps(workdir):
    d = _ckpt_dir(workdir)
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _tmp_dirs(workdir):
    d = _ckpt_dir(workdir)
    return sorted(x for x in os.listdir(d) if TMP_MARK in x) if os.path.isdir(d) else []


def _wait(cond, proc, what, timeout=180, poll=0.02):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout}s")


def _summary(stdout):
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])


def _assert_losses_match(got, ref, steps):
    for s in steps:
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])
        assert got[s]["data/records"] == ref[s]["data/records"], s


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted run: the losses every faulty run must reproduce, and its checkpoints."""
    wd = str(tmp_path_factory.mktemp("ref") / "run")
    p = _run(_cmd(dataset, wd))
    assert p.returncode == 0, p.stderr[-3000:]
    ref = _metrics(wd)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return {"dir": wd, "metrics": ref}


# ------------------------------------------------------------------------------------- 1. process faults
def test_sigkill_during_async_save_and_corrupt_checkpoint_resume_exactly(dataset, reference, tmp_path):
    """Killed while step 9 is being written, and step 6 damaged afterwards: the next start skips the
    half-written step 9, finds step 6 unreadable, resumes from step 3 and reproduces the losses."""
    wd = str(tmp_path / "killed")
    # the commit (rename) of every save is delayed 1.5 s, so a save is surely in flight when killed
    proc = _start(_cmd(dataset, wd, hooked=True), UVJAX_TEST_SLOW_COMMIT=1.5)
    _wait(lambda: any(t.startswith(f"{3 * EVERY}.") for t in _tmp_dirs(wd)), proc, "save of step 9 in flight")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = _tmp_dirs(wd)
    assert partial and _steps(wd) == [EVERY, 2 * EVERY], (partial, _steps(wd))  # 9 only half-written
    killed_pid = proc.pid
    # 2. storage: truncate the largest array file of step 6 (a torn copy, a bad disk block)
    data = glob.glob(os.path.join(_ckpt_dir(wd), str(2 * EVERY), "state", "ocdbt.process_*", "d", "*"))
    biggest = max(data, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)

    p = _run(_cmd(dataset, wd))  # the same command, no hook
    assert p.returncode == 0, p.stderr[-3000:]
    s = _summary(p.stdout)
    assert s["steps_run"] == STEPS - EVERY, s  # from step 3: not the partial 9, not the damaged 6
    assert [u["step"] for u in s["unreadable_checkpoints"]] == [2 * EVERY]
    assert "could not be restored" in p.stderr and f"resumed from step {EVERY} instead" in p.stderr
    _assert_losses_match(_metrics(wd), reference["metrics"], range(EVERY + 1, STEPS + 1))
    names = os.listdir(_ckpt_dir(wd))
    assert not [x for x in names if TMP_MARK in x]  # the partial directory was cleaned up, never restored
    assert len([x for x in names if x.startswith(f"unreadable-{2 * EVERY}-")]) == 1  # kept for inspection
    # 4. the killed run never released its lock: the next start took it over and said so
    assert "stale lock" in p.stderr and f"pid {killed_pid}" in p.stderr


def test_sigterm_during_first_compile_exits_zero(dataset, tmp_path):
    wd = str(tmp_path / "term_compile")
    proc = _start(_cmd(dataset, wd, steps=200, every=1000))
    # the checkpoint directory is created right before the restore and the first (compiling) step
    _wait(lambda: os.path.isdir(_ckpt_dir(wd)), proc, "trainer built", poll=0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    s = _summary(out)
    assert s["stopped_by_signal"] and s["steps_run"] <= 1, s
    if s["steps_run"] == 0:
        assert "nothing to save yet" in err and _steps(wd) == []
    else:  # the compile finished first: its one step is checkpointed
        assert _steps(wd) == [1]


def test_sigterm_during_save_exits_zero_and_second_run_is_refused(dataset, tmp_path):
    wd = str(tmp_path / "term_save")
    proc = _start(_cmd(dataset, wd, steps=200, every=EVERY, hooked=True), UVJAX_TEST_SLOW_COMMIT=1.5)
    _wait(lambda: _metrics(wd), proc, "first step")
    # 4. concurrency: a second run on the same work directory refuses, naming the holder
    second = _run(_cmd(dataset, wd, steps=200, every=EVERY))
    assert second.returncode != 0
    assert "is in use by another run" in second.stderr and f"pid {proc.pid} on host" in second.stderr, \
        second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    _wait(lambda: _tmp_dirs(wd), proc, "a save in flight")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    s = _summary(out)
    assert s["stopped_by_signal"]
    assert _tmp_dirs(wd) == [] and _steps(wd)[-1] == s["step"]  # every save committed, the last one too
    assert os.path.exists(os.path.join(_ckpt_dir(wd), str(s["step"]), "commit_success.txt"))
    assert json.load(open(os.path.join(wd, "train.lock")))["released"]


# ------------------------------------------------------------------------------------- 2. storage faults
def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def test_disk_full_during_save_keeps_previous_checkpoint(dataset, reference, tmp_path):
    wd = str(tmp_path / "full")
    ck = _ckpt_dir(wd)
    if not _mount_tmpfs(ck, "32m"):
        pytest.skip("needs root to mount a small tmpfs for the checkpoints")
    try:
        proc = _start(_cmd(dataset, wd))
        _wait(lambda: _steps(wd) == [EVERY], proc, "first checkpoint", poll=0.005)
        try:  # the disk fills up while the run trains towards the next checkpoint
            with open(os.path.join(ck, "filler"), "wb") as f:
                while True:
                    f.write(b"\0" * (1 << 20))
        except OSError:
            pass
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert f"checkpoint of step {2 * EVERY} could not be written" in err, err[-3000:]
        assert "the disk is full" in err and f"the last complete checkpoint is step {EVERY}, intact" in err
        os.remove(os.path.join(ck, "filler"))
        assert _steps(wd) == [EVERY]
        # the first checkpoint reads back whole (the same command resumes from it, as in the SIGKILL test)
        import orbax.checkpoint as ocp
        with ocp.CheckpointManager(ck) as mgr:
            got = mgr.restore(EVERY, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        assert int(got["state"]["step"]) == EVERY
    finally:
        subprocess.run(["umount", "-l", ck], capture_output=True)


def _data_iterator(ds):
    from configs.vqvq import get_config
    from uvjax.training.data_feed import build_data_iterator
    cfg = get_config("smoke")
    cfg.data.tokenizer = ds["tokenizer"]
    cfg.data.streams.understanding.paths = (ds["paths"]["understanding"],)
    cfg.data.streams.generation.paths = (ds["paths"]["generation"],)
    return build_data_iterator(cfg, "", 8)


def test_async_save_records_the_data_position_of_its_step(dataset, tmp_path, monkeypatch):
    """orbax runs grain's checkpoint handler on a worker thread; the iterator state saved must be
    the one at ``save`` time even when that thread runs late (the loop keeps drawing batches)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from grain._src.python.checkpoint import handler as grain_handler
    from uvjax.training.checkpoint import Checkpointer
    original = grain_handler.CheckpointHandler.save

    def late_save(self, *a, **kw):  # the background thread gets to it late
        time.sleep(0.5)
        return original(self, *a, **kw)

    monkeypatch.setattr(grain_handler.CheckpointHandler, "save", late_save)
    it = _data_iterator(dataset)
    next(it)
    ck = Checkpointer(str(tmp_path / "ck"), async_save=True)
    ck.save(1, {"x": jnp.zeros(2)}, it)
    expected = [next(it) for _ in range(3)]  # the loop goes on while the save is in flight
    ck.close()
    fresh = _data_iterator(dataset)
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.restore(1, {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}, fresh)
    ck.close()
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _tiny_state(scale):
    import jax.numpy as jnp
    return {"w": jnp.arange(64, dtype=jnp.float32) * scale, "b": jnp.full((3,), scale, jnp.float32)}


def test_restore_rejects_nonfinite_parameters_and_never_moves_the_only_checkpoints(tmp_path):
    import jax
    import numpy as np
    from uvjax.training.checkpoint import CheckpointError, Checkpointer
    from uvjax.training.guard import nonfinite_leaves
    d = str(tmp_path / "ck")
    ck = Checkpointer(d, keep=3, async_save=False)
    ck.save(1, _tiny_state(1.0))
    ck.save(2, _tiny_state(np.nan))
    ck.close()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tiny_state(1.0))

    def finite(out):
        bad = nonfinite_leaves(out["state"])
        if bad:
            raise ValueError(f"non-finite parameters in {bad}")

    ck = Checkpointer(d, keep=3)
    step, out, skipped = ck.restore_latest(abstract, validate=finite)
    assert step == 1 and float(out["state"]["b"][0]) == 1.0
    assert skipped[0]["step"] == 2 and "non-finite parameters" in skipped[0]["error"]
    assert "['b']" in skipped[0]["error"] and "['w']" in skipped[0]["error"]
    assert ck.all_steps() == [1] and any(x.startswith("unreadable-2-") for x in os.listdir(d))
    ck.close()
    # when nothing reads back, nothing is moved and the error lists every step
    shutil.rmtree(os.path.join(d, "1", "state"))
    ck = Checkpointer(d, keep=3)
    with pytest.raises(CheckpointError, match="no checkpoint in .* could be restored"):
        ck.restore_latest(abstract, validate=finite)
    assert ck.all_steps() == [1]
    ck.close()


# ------------------------------------------------------------------------------------- 3. numerical faults
class _FeatureBatches:
    """A grain-like iterator (state, counts) of contract-conforming batches with continuous image
    features; batch ``poison`` carries NaN features, batch ``spike`` targets scaled by 1e3."""

    state_is_global = True  # checkpointed as JSON (training/checkpoint.py)

    def __init__(self, poison=None, spike=None):
        self.i, self.poison, self.spike = 0, poison, spike
        self.counts = {"batches": 0}

    def __next__(self):
        import numpy as np
        from helpers import random_batch
        rng = np.random.default_rng(self.i)
        b = random_batch(rng, 8, 16, 24, 96)
        b["features"] = rng.normal(size=(8, 16, 8)).astype(np.float32)
        if self.i == self.poison or (isinstance(self.poison, (set, range)) and self.i in self.poison):
            b["features"][:] = np.nan
        if self.i == self.spike:
            b["features"] *= 1e3
        self.i += 1
        self.counts["batches"] = self.i
        return b

    def get_state(self):
        return {"next_index": self.i}

    def set_state(self, s):
        self.i = s["next_index"]


def _numeric_cfg(**over):
    from helpers import tiny_config
    c = tiny_config(**{"model.image.input_kind": "features", "model.image.output_kind": "features",
                       "model.image.feature_dim": 8, "loss.image_loss": "mse", "loss.w_image": 1.0,
                       "train.steps": 12, "train.checkpoint_every": 100, "train.log_every": 100,
                       "train.progress": False, "optim.lr": 1e-3, **over})
    return c


@pytest.fixture
def keep_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_nan_and_spiking_batches_are_skipped_and_named(tmp_path, keep_signal_handlers):
    import jax
    import numpy as np
    from uvjax import train
    cfg = _numeric_cfg(**{"train.spike_factor": 5.0, "train.spike_window": 4})
    wd = str(tmp_path / "numeric")
    s = train.run(cfg, wd, data_iterator=_FeatureBatches(poison=6, spike=9), progress=False)
    assert s["step"] == 12 and s["skipped_updates"] == {"nonfinite": 1, "spike": 1}
    events = [json.loads(x) for x in open(os.path.join(wd, "skipped_updates.jsonl"))]
    assert [(e["step"], e["reason"]) for e in events] == [(7, "nonfinite"), (10, "spike")]
    assert events[0]["data_position"] == {"batch_index": 6, "iterator_state": {"next_index": 6}}
    assert events[1]["data_position"]["iterator_state"] == {"next_index": 9}
    assert events[1]["loss"] > events[1]["max_loss"] > 0
    m = _metrics(wd)[12]
    assert m["skipped/nonfinite_total"] == 1 and m["skipped/spike_total"] == 1 and np.isfinite(m["loss"])
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.join(wd, "checkpoints")) as mgr:  # parameters as saved
        restored = mgr.restore(12, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    from uvjax.training.guard import nonfinite_leaves
    assert jax.tree_util.tree_leaves(restored["state"]["trainable"])
    assert nonfinite_leaves(restored["state"]) == []  # parameters and optimizer state never took a NaN


def test_nonfinite_halt_names_the_batch_and_keeps_params_finite(tmp_path, keep_signal_handlers):
    from uvjax import train
    cfg = _numeric_cfg(**{"train.nonfinite": "halt", "train.checkpoint_every": 2})
    wd = str(tmp_path / "halt")
    with pytest.raises(RuntimeError) as e:
        train.run(cfg, wd, data_iterator=_FeatureBatches(poison=4), progress=False)
    msg = str(e.value)
    assert "step 5: non-finite loss nan" in msg and "(train.nonfinite='halt')" in msg
    assert '"batch_index": 4' in msg and '"next_index": 4' in msg
    assert "last good checkpoint: step 4" in msg


def test_updates_skipped_in_a_row_halt_the_run_and_are_never_checkpointed(tmp_path, keep_signal_handlers):
    """Garbage is never saved: from batch 4 on every batch is NaN; the checkpoint due at step 6 is not written
    while the last update was skipped, and the 5th skipped update in a row (train.halt_after_skips) stops the
    run naming the step and the last good checkpoint."""
    from uvjax import train
    from uvjax.config import base_config
    assert base_config().train.spike_factor == 10.0 and base_config().train.halt_after_skips == 5  # on by default
    cfg = _numeric_cfg(**{"train.checkpoint_every": 2})
    wd = str(tmp_path / "diverging")
    with pytest.raises(RuntimeError) as e:
        train.run(cfg, wd, data_iterator=_FeatureBatches(poison=range(4, 100)), progress=False)
    msg = str(e.value)
    assert "step 9: 5 updates in a row were skipped" in msg and "last good checkpoint: step 4" in msg, msg
    assert _steps(wd) == [2, 4]


def test_bit_flips_in_every_array_file_fall_back_with_exact_losses(dataset, reference, tmp_path):
    """The issue's drill: one bit flipped in every array data file of the latest checkpoint, then the same
    command run on: resumed from the previous good step, the damaged one moved aside and named, and the
    losses equal to an uninterrupted run's."""
    wd = str(tmp_path / "flipped")
    p = _run(_cmd(dataset, wd, extra=(f"--config.train.stop_at={3 * EVERY}",)))
    assert p.returncode == 0, p.stderr[-3000:]
    assert _steps(wd) == [2 * EVERY, 3 * EVERY]  # keep_checkpoints=2: step 3 went once 9 had verified
    from uvjax.training.checkpoint import Checkpointer
    assert Checkpointer(_ckpt_dir(wd)).verified_steps() == [2 * EVERY, 3 * EVERY]
    files = glob.glob(os.path.join(_ckpt_dir(wd), str(3 * EVERY), "state", "ocdbt.process_*", "d", "*"))
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            data = bytearray(fh.read())
            data[len(data) // 2] ^= 0x04
            fh.seek(0)
            fh.write(data)
    p = _run(_cmd(dataset, wd))
    assert p.returncode == 0, p.stderr[-3000:]
    s = _summary(p.stdout)
    assert s["steps_run"] == STEPS - 2 * EVERY, s
    assert [u["step"] for u in s["unreadable_checkpoints"]] == [3 * EVERY]
    assert "does not match the digests saved with it" in s["unreadable_checkpoints"][0]["error"] \
        or "error while reading" in s["unreadable_checkpoints"][0]["error"], s["unreadable_checkpoints"]
    assert f"resumed from step {2 * EVERY} instead" in p.stderr
    _assert_losses_match(_metrics(wd), reference["metrics"], range(2 * EVERY + 1, STEPS + 1))
    assert len([x for x in os.listdir(_ckpt_dir(wd)) if x.startswith(f"unreadable-{3 * EVERY}-")]) == 1


def test_a_restored_state_must_reproduce_its_probe_and_its_batch(dataset, reference, tmp_path):
    """A state that does not give the loss recorded for the batch after it is refused (fallback); a data
    pipeline that produces another batch there stops the run with a message (no older step would help)."""
    ds_dir = tmp_path / "data"
    shutil.copytree(os.path.dirname(dataset["tokenizer"].rstrip("/")), ds_dir)
    ds = json.loads(json.dumps(dataset).replace(os.path.dirname(dataset["tokenizer"].rstrip("/")), str(ds_dir)))
    wd = str(tmp_path / "probe")
    p = _run(_cmd(ds, wd, extra=(f"--config.train.stop_at={3 * EVERY}",)))
    assert p.returncode == 0, p.stderr[-3000:]
    from uvjax.training.checkpoint import SIDECAR, Checkpointer
    from uvjax.training.integrity import json_digest
    side = os.path.join(_ckpt_dir(wd), str(3 * EVERY), SIDECAR)
    rec = json.load(open(side))
    assert rec["probe"]["loss"] > 0 and rec["probe"]["batch_digests"]
    body = {k: v for k, v in rec.items() if k != "sha256"}
    body["probe"]["loss"] += 0.5  # as if the state had restored differently
    json.dump({**body, "sha256": json_digest(body)}, open(side, "w"))
    p = _run(_cmd(ds, wd, extra=(f"--config.train.stop_at={3 * EVERY + 1}",)))
    assert p.returncode == 0, p.stderr[-3000:]
    s = _summary(p.stdout)
    assert [u["step"] for u in s["unreadable_checkpoints"]] == [3 * EVERY], s
    assert "was recorded when it was saved" in s["unreadable_checkpoints"][0]["error"]
    _assert_losses_match(_metrics(wd), reference["metrics"], range(2 * EVERY + 1, 3 * EVERY + 2))
    # the tokenizer file changes under the run (still valid JSON): resume and evaluation-loading refuse it
    tok_json = os.path.join(ds["tokenizer"], "tokenizer.json")
    original = open(tok_json, "rb").read()
    open(tok_json, "wb").write(original + b"\n")
    p = _run(_cmd(ds, wd))
    assert p.returncode != 0
    assert "was trained with other files than this run would read: tokenizer" in p.stderr, p.stderr[-3000:]
    from uvjax.inference.loading import load_trained
    from uvjax.integrity_files import DamagedFile
    with pytest.raises(DamagedFile, match="trained with other files than it would be loaded with: tokenizer"):
        load_trained(wd)
    open(tok_json, "wb").write(original)
    cfg_path = os.path.join(wd, "config.json")
    run_cfg = json.load(open(cfg_path))
    run_cfg["model"]["hidden"] *= 2  # a damaged digit that still parses
    json.dump(run_cfg, open(cfg_path, "w"))
    with pytest.raises(DamagedFile, match=r"config\.json differs from the config saved with checkpoint step 10 in "
                                          r"model\.hidden"):
        load_trained(wd)
    # the data changes under the run: the generation shards now hold the understanding records
    gen_files = sorted(glob.glob(os.path.join(ds["paths"]["generation"], "*")))
    und_files = sorted(glob.glob(os.path.join(ds["paths"]["understanding"], "*")))
    assert gen_files and und_files, ds
    for g in gen_files:
        shutil.copyfile(und_files[0], g)
    p = _run(_cmd(ds, wd))
    assert p.returncode != 0
    assert "differs from the one this run saw when it saved that step" in p.stderr, p.stderr[-3000:]
    assert "The training data or its order changed" in p.stderr
    assert _steps(wd) == [3 * EVERY, 3 * EVERY + 1]  # nothing moved aside for a data problem (9 was re-saved)
    assert Checkpointer(_ckpt_dir(wd)).verified_steps() == [3 * EVERY, 3 * EVERY + 1]


def test_train_run_restores_the_signal_handlers_it_replaced(tmp_path, keep_signal_handlers):
    """In a notebook, "interrupt kernel" must work after a run: train.run puts back the SIGINT/SIGTERM
    handlers it installed for the checkpoint-and-stop behaviour (also when the run fails)."""
    from uvjax import train

    def mine(signum, frame):  # a handler of the caller's own
        pass

    signal.signal(signal.SIGTERM, mine)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    seen = {}

    class Watching(_FeatureBatches):
        def __next__(self):
            seen.setdefault("during", signal.getsignal(signal.SIGTERM))
            return super().__next__()

    train.run(_numeric_cfg(**{"train.steps": 2}), str(tmp_path / "ok"), data_iterator=Watching(), progress=False)
    assert seen["during"] is not mine  # the trainer's own handler was active while it ran
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(RuntimeError):
        train.run(_numeric_cfg(**{"train.nonfinite": "halt"}), str(tmp_path / "halt"),
                  data_iterator=_FeatureBatches(poison=0), progress=False)
    assert {s: signal.getsignal(s) for s in before} == before


def test_spike_guard_limit_is_deterministic_and_resumable():
    from uvjax.training.guard import StepGuard
    g = StepGuard(spike_factor=3.0, spike_window=3)
    assert g.max_loss(1) == float("inf")
    for step, loss in enumerate([4.0, 2.0, 3.0, 100.0, 2.5], start=1):
        g.push(step, None, {"loss": loss, "skipped_nonfinite": 0.0, "skipped_spike": 0.0})
    # step 6 uses losses of steps <= 4 only, whether or not step 5 was read yet
    assert g.max_loss(6) == 3.0 * 3.0
    g.flush()
    assert g.max_loss(6) == 3.0 * 3.0 and g.max_loss(7) == 3.0 * 3.0
    h = StepGuard(spike_factor=3.0, spike_window=3)
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.max_loss(7) == g.max_loss(7) and h.max_loss(8) == g.max_loss(8)
    with pytest.raises(ValueError, match="spike_factor"):
        StepGuard(spike_factor=0.5)


# ------------------------------------------------------------------------------------- 4. the lock
def test_lock_refuses_live_holder_and_takes_over_dead_one(tmp_path, monkeypatch):
    import errno
    import fcntl
    import socket
    from uvjax import locks as L
    wd = str(tmp_path / "wd")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1])\n"
        "from uvjax.locks import WorkdirLock\n"
        "l = WorkdirLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)"), REPO, wd],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(L.WorkdirLockedError, match=rf"pid {holder.pid} on host '{socket.gethostname()}'"):
            L.WorkdirLock(wd).acquire()
    finally:
        holder.kill()
        holder.wait()
    with L.WorkdirLock(wd) as lk:  # the kernel dropped the dead holder's lock: taken over
        assert lk.held and lk.replaced["pid"] == holder.pid
        with L.WorkdirLock(wd):  # re-entrant in one process
            pass
        assert lk.holder()["pid"] == os.getpid()
    assert "released" in json.load(open(os.path.join(wd, L.LOCK_NAME)))

    # a filesystem without POSIX locks: the recorded pid decides
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "no locks")
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = {"pid": live.pid, "hostname": socket.gethostname(), "started": time.time()}
        with open(os.path.join(wd, L.LOCK_NAME), "w") as f:
            json.dump(rec, f)
        with pytest.raises(L.WorkdirLockedError, match=rf"pid {live.pid}.*no POSIX locks"):
            L.WorkdirLock(wd).acquire()
    finally:
        live.kill()
        live.wait()
    lk = L.WorkdirLock(wd).acquire()  # that pid is gone now: stale, taken over
    assert lk.replaced["pid"] == live.pid
    lk.release()


# ------------------------------------------------------------------------------------- fault hooks
def _install_hooks():
    """``UVJAX_TEST_SLOW_COMMIT=s``: every checkpoint step's final commit (the rename of its
    temporary directory, on orbax's background thread) waits ``s`` seconds first."""
    delay = float(os.environ.get("UVJAX_TEST_SLOW_COMMIT", 0) or 0)
    if delay:
        from orbax.checkpoint._src.path import atomicity
        original = atomicity.AtomicRenameTemporaryPath.finalize

        async def slow_finalize(self, *a, **kw):
            if self._final_path.name.isdigit():
                await asyncio.sleep(delay)
            return await original(self, *a, **kw)

        atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    _install_hooks()
    from absl import app

    from uvjax import train
    app.run(train.main)
