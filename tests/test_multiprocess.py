"""Multi-controller correctness on one machine: 2 processes × 2 CPU devices match 1 process × 4
devices step for step, and checkpoints move between the two layouts (launch/local.py, gloo)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from datasets import make_code_dataset
from uvjax.training.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_code_dataset(str(tmp_path_factory.mktemp("mpdata")))


def _train_args(ds, workdir, stop_at):
    return ["-m", "uvjax.train", "--config=configs/vqvq.py:smoke", f"--workdir={workdir}",
            f"--config.data.tokenizer={ds['tokenizer']}",
            f"--config.data.streams.understanding.paths=('{ds['paths']['understanding']}',)",
            f"--config.data.streams.generation.paths=('{ds['paths']['generation']}',)",
            "--config.stages.build=False", "--config.data.host_sharding=rows", "--config.train.progress=False",
            "--config.train.log_every=1", "--config.train.checkpoint_every=4", "--config.train.steps=8",
            f"--config.train.stop_at={stop_at}"]


def _env():
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    return env


def _one_process(ds, workdir, steps):
    p = subprocess.run([sys.executable, *_train_args(ds, workdir, steps), "--cpu_devices=4"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def _two_processes(ds, workdir, steps):
    p = subprocess.run([sys.executable, "launch/local.py", "--num_processes=2", "--cpu_devices=2", "--",
                        sys.executable, *_train_args(ds, workdir, steps)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:]


def _losses(workdir):
    m = read_metrics(workdir)
    return np.array([m[s]["loss"] for s in sorted(m)]), sorted(m)


def test_two_processes_match_one_and_checkpoints_cross_over(dataset, tmp_path):
    ref = str(tmp_path / "ref")
    _one_process(dataset, ref, 8)
    ref_losses, steps = _losses(ref)
    assert steps == list(range(1, 9))

    # 2 processes for 4 steps, then 1 process resumes that checkpoint to step 8
    a = str(tmp_path / "two_then_one")
    _two_processes(dataset, a, 4)
    two, s = _losses(a)
    assert s == [1, 2, 3, 4]
    np.testing.assert_allclose(two, ref_losses[:4], atol=1e-5)
    _one_process(dataset, a, 8)
    np.testing.assert_allclose(_losses(a)[0], ref_losses, atol=1e-5)

    # 1 process for 4 steps, then 2 processes resume to step 8
    b = str(tmp_path / "one_then_two")
    _one_process(dataset, b, 4)
    _two_processes(dataset, b, 8)
    got, s = _losses(b)
    assert s == list(range(1, 9))
    np.testing.assert_allclose(got, ref_losses, atol=1e-5)


def test_missing_distributed_flags_are_a_clear_error():
    from uvjax.training.distributed import initialize
    with pytest.raises(ValueError, match="--process_id"):
        initialize("127.0.0.1:1234", 2, None)
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
        initialize("127.0.0.1:1234", 2, 5)


def test_checkpoint_barriers_wait_on_the_coordinator_not_gloo(monkeypatch):
    """On CPU, orbax's checkpoint barriers go through the coordination service (training/distributed.py):
    with the flag set, orbax's own sync takes its distributed-barrier path (whose timeout is orbax's 300 s)
    instead of a gloo collective, which every host must enter within gloo's fixed 30 s."""
    from absl import flags
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from orbax.checkpoint._src.multihost import multihost as orbax_multihost
    from uvjax.training import distributed

    calls = []
    monkeypatch.setattr(orbax_multihost, "should_skip_process_sync", lambda processes=None: False)
    monkeypatch.setattr(orbax_multihost, "get_barrier_sync_fn",
                        lambda processes=None: lambda key, timeout_ms: calls.append(("coordinator", key, timeout_ms)))
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda key: calls.append(("gloo", key)))
    name = distributed.ORBAX_BARRIER_FLAG
    was_parsed = flags.FLAGS.is_parsed()
    if not was_parsed:  # as under `python -m uvjax.train`, where absl has parsed the flags
        flags.FLAGS.mark_as_parsed()
    old = getattr(flags.FLAGS, name)
    try:
        setattr(flags.FLAGS, name, False)
        ocp.multihost.sync_global_processes("before")
        distributed.checkpoint_barriers_through_coordinator()
        assert getattr(flags.FLAGS, name) is True
        ocp.multihost.sync_global_processes("after")
    finally:
        setattr(flags.FLAGS, name, old)
        if not was_parsed:
            flags.FLAGS.unparse_flags()
    assert calls == [("gloo", "before"), ("coordinator", "after", 300_000)]


def test_one_host_seeing_a_corrupt_file_makes_both_fall_back_to_the_same_step(dataset, tmp_path):
    """host_sharding='records': each process saves its own data-iterator file. The file of process 1 in the
    newest checkpoint is damaged (still valid JSON: another position), so only process 1 sees a digest
    mismatch; both processes must fall back to the same older step and reproduce the losses."""
    import glob
    import json
    wd = str(tmp_path / "records")

    def run(stop_at):
        args = [a for a in _train_args(dataset, wd, stop_at) if "host_sharding" not in a
                and "checkpoint_every" not in a]
        args.append("--config.train.checkpoint_every=2")
        p = subprocess.run([sys.executable, "launch/local.py", "--num_processes=2", "--cpu_devices=2", "--",
                            sys.executable, *args, "--config.data.host_sharding=records"], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p

    run(4)
    first, steps = _losses(wd)
    assert steps == list(range(1, 5))
    files = sorted(glob.glob(os.path.join(wd, "checkpoints", "4", "data", "process_*-of-2.json")))
    assert [os.path.basename(f) for f in files] == ["process_0-of-2.json", "process_1-of-2.json"]
    state = json.load(open(files[1]))
    text = json.dumps(state, indent=4)
    changed = text.replace('"next_index": ', '"next_index": 1', 1)  # one digit more: still JSON
    assert changed != text
    open(files[1], "w").write(changed)
    p = run(4)
    out = p.stdout + p.stderr
    summary = json.loads([ln[4:] for ln in p.stdout.splitlines() if ln.startswith("[0] {") and '"steps_run"' in ln][0])
    assert summary["steps_run"] == 2 and [u["step"] for u in summary["unreadable_checkpoints"]] == [4], summary
    assert "process_1-of-2.json): digest differs" in out and "unreadable on another host" in out
    assert out.count("resumed from step 2 instead") == 2  # both processes
    again, steps = _losses(wd)
    assert steps == list(range(1, 5))
    np.testing.assert_array_equal(again, first)  # steps 3-4 retrained from step 2: the same losses
    names = os.listdir(os.path.join(wd, "checkpoints"))
    assert "4" in names and len([n for n in names if n.startswith("unreadable-4-")]) == 1
