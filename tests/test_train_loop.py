"""The train command as users run it: resume after SIGKILL is exact, SIGTERM checkpoints and exits 0."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from datasets import make_code_dataset
from uvjax.integrity_files import parse_lines
from uvjax.training.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_code_dataset(str(tmp_path_factory.mktemp("codes")))


def _cmd(ds, workdir, steps=30, every=5, extra=()):
    return [sys.executable, "-m", "uvjax.train", "--config=configs/vqvq.py:smoke", f"--workdir={workdir}",
            f"--config.data.tokenizer={ds['tokenizer']}",
            f"--config.data.streams.understanding.paths=('{ds['paths']['understanding']}',)",
            f"--config.data.streams.generation.paths=('{ds['paths']['generation']}',)",
            f"--config.train.steps={steps}", f"--config.train.checkpoint_every={every}",
            "--config.train.log_every=1", "--config.train.progress=False", "--config.stages.build=False", *extra]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for_step(workdir, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if max(read_metrics(workdir), default=0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _summary(stdout):
    """The run summary train.py prints as its last stdout line (JSON)."""
    return json.loads(stdout.strip().splitlines()[-1])


def _metric_records(workdir):
    """Every record of metrics.jsonl in file order (a re-run step appears twice)."""
    path = os.path.join(workdir, "metrics.jsonl")
    return parse_lines(open(path).read(), path)[0]


def _final_state(workdir, step):
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mgr:
        return mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def _ckpt_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def test_sigkill_resume_reproduces_uninterrupted_losses(dataset, tmp_path):
    """Killed mid-run, the same command continues from the last checkpoint -- it runs only the remaining
    steps (its summary, the metrics lines it appends) -- and ends where the uninterrupted run ends: the same
    losses and data at every later step and bit-identical final state. Retraining from step 0 would give
    the same losses, so the step accounting is what tells a resume from a restart."""
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run(_cmd(dataset, ref_dir), check=True, cwd=REPO, env=_env(), capture_output=True, timeout=600)
    ref = read_metrics(ref_dir)
    assert sorted(ref) == list(range(1, 31))

    proc = subprocess.Popen(_cmd(dataset, run_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 17, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = max(read_metrics(run_dir))
    assert killed_at < 30, "the run finished before it could be killed"
    saved = _ckpt_steps(run_dir)
    assert saved and saved[-1] <= killed_at
    resume_from = saved[-1]
    assert 0 < resume_from < 30
    before = len(_metric_records(run_dir))

    p = subprocess.run(_cmd(dataset, run_dir), check=True, cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=600)
    summary = _summary(p.stdout)
    assert (summary["step"], summary["steps_run"]) == (30, 30 - resume_from), summary
    appended = [int(r["step"]) for r in _metric_records(run_dir)[before:]]
    assert appended == list(range(resume_from + 1, 31)), (resume_from, appended)
    got = read_metrics(run_dir)  # later records of a step replace the killed run's
    assert sorted(got) == list(range(1, 31))
    for step in range(resume_from + 1, 31):
        assert got[step]["loss"] == ref[step]["loss"], (step, got[step]["loss"], ref[step]["loss"])
        assert got[step]["data/records"] == ref[step]["data/records"], step
    want, final = _final_state(ref_dir, 30), _final_state(run_dir, 30)
    assert int(final["step"]) == 30
    import jax
    import numpy as np
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(want)]
    assert paths == [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(final)]
    for path, a, b in zip(paths, jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(final)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


def test_sigterm_checkpoints_and_exits_zero(dataset, tmp_path):
    run_dir = str(tmp_path / "term")
    proc = subprocess.Popen(_cmd(dataset, run_dir, steps=200, every=1000), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    last = max(read_metrics(run_dir))
    assert _ckpt_steps(run_dir) == [last]  # no interval checkpoint was due: this is the SIGTERM save
    assert '"stopped_by_signal": true' in out
    # the same command resumes from there
    proc = subprocess.run(_cmd(dataset, run_dir, steps=last + 2, every=1000), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert max(read_metrics(run_dir)) == last + 2
    assert _summary(proc.stdout)["steps_run"] == 2  # resumed at the SIGTERM checkpoint, not from step 0
