"""The first run's stage chain (smoke scale): artifacts, reuse of cached stages, selective rebuild,
resumable pre-tokenisation, and a train step that never runs a frozen tower."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from uvjax.stages.smartwatch import pretokenise_split
from uvjax.stage_log import read_stage_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "uvjax.train", "--config=configs/vqvq.py:smoke",
                           f"--workdir={workdir}", "--config.train.progress=False", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "_stdout": proc.stdout}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    summary = _train(str(root / "a"))
    return root, summary


def test_first_run_writes_every_stage(first_run):
    root, summary = first_run
    log = read_stage_log(str(root / "a"))
    assert [r["stage"] for r in log][:4] == ["tokenizer", "vq", "dataset", "lm"]
    assert not any(r["reused"] for r in log)
    paths = summary["stage_paths"]
    assert os.path.exists(os.path.join(paths["tokenizer"], "tokenizer.json"))
    assert any(f.endswith(".safetensors") for f in os.listdir(paths["vq"]))
    assert any(f.endswith(".png") for f in os.listdir(paths["vq"]))
    train_shards = [f for f in os.listdir(os.path.join(paths["dataset"], "train")) if f.endswith(".array_record")]
    assert any("understanding" in f for f in train_shards) and any("generation" in f for f in train_shards)
    run = root / "a"
    assert (run / "metrics.jsonl").exists() and (run / "config.json").exists()
    assert os.listdir(run / "tensorboard")
    assert summary["step"] == 20 and summary["stage_paths"]["vq_metrics"]["usage"] > 0
    # the summary printed at the end: evaluation table, wall time of every stage, where to look
    out = summary["_stdout"]
    for heading in ("VQA", "generation:", "stage        wall s"):  # smoke: quick eval, no judge
        assert heading in out, heading
    stage_rows = {ln.split()[0]: ln.split() for ln in out.splitlines()
                  if ln.split() and ln.split()[0] in ("tokenizer", "vq", "dataset", "lm", "evaluate", "total")}
    assert set(stage_rows) == {"tokenizer", "vq", "dataset", "lm", "evaluate", "total"}
    assert all(row[2] == "no" for name, row in stage_rows.items() if name != "total")
    assert abs(float(stage_rows["total"][1]) - sum(float(r[1]) for n, r in stage_rows.items() if n != "total")) < 0.2
    assert str(run / "eval") in out and "generations.png" in out
    # the first run evaluates VQA and generation (stages.evaluate.tasks); captions only when asked for
    (report,) = [os.path.join(d, "report.json") for d in glob.glob(str(run / "eval" / "step_*"))]
    rep = json.load(open(report))
    assert rep["tasks"] == ["vqa", "generation"] and rep["vqa"] and not rep.get("caption")
    assert f"tensorboard --logdir {run / 'tensorboard'}" in out


def test_second_run_reuses_every_stage(first_run):
    root, _ = first_run
    n_before = len(read_stage_log(str(root / "a")))
    _train(str(root / "a"), "--config.stages.evaluate.num_images=5")
    new = read_stage_log(str(root / "a"))[n_before:]
    assert {r["stage"]: r["reused"] for r in new if r["stage"] != "evaluate"} == {
        "tokenizer": True, "vq": True, "dataset": True, "lm": True}
    # stages.evaluate.num_images limits the evaluated test images (the smoke split has 16)
    (report,) = glob.glob(str(root / "a" / "eval" / "step_*" / "report.json"))
    assert json.load(open(report))["split"]["num_images"] == 5


def test_changing_only_the_lm_rebuilds_only_the_lm(first_run):
    root, _ = first_run
    wd = str(root / "b")
    _train(wd, f"--config.stages.cache_dir={root / 'cache'}", "--config.model.layers=1")
    log = {r["stage"]: r["reused"] for r in read_stage_log(wd) if r["stage"] != "evaluate"}
    assert log == {"tokenizer": True, "vq": True, "dataset": True, "lm": False}


def test_learning_curves_of_a_first_run(first_run):
    """``train.eval_every``: the judge is trained before the LM (a stage of its own), every quick evaluation
    logs judge-read generation and VQA on the same first test images into metrics.jsonl, and the run ends with
    eval/curves.png, named in the summary."""
    from uvjax.training.metrics import read_metrics
    root, _ = first_run
    wd = root / "curves"
    summary = _train(str(wd), f"--config.stages.cache_dir={root / 'cache'}", "--config.train.eval_every=10",
                     "--config.train.eval_images=6", "--config.stages.evaluate.judge_preset=test")
    stages = [r["stage"] for r in read_stage_log(str(wd))]
    assert stages.index("judge") < stages.index("lm")
    assert os.path.exists(os.path.join(root / "cache", "judge-test-32px", "judge.safetensors"))
    m = read_metrics(str(wd))
    for step in (10, 20):  # the quick evaluation at step 10 and the final one at the last step
        for key in ("eval/vqa/all/strict", "eval/gen/time_hour/accuracy", "eval/gen/all/accuracy"):
            assert 0.0 <= m[step][key] <= 1.0, (step, key)
    assert not any(k.startswith("eval/") for k in m[5])
    assert "judge" not in str(m[10].get("eval/gen/judge_skipped", ""))
    png = wd / "eval" / "curves.png"
    assert png.exists() and f"learning curves: {png}" in summary["_stdout"]


def test_quick_evaluations_reuse_compiled_programs_with_each_steps_parameters(first_run):
    """The training loop's quick evaluations keep one decoder (and VQ codec, judge) for the run's model object and
    hand it each evaluation's parameters: the second of two quick evaluations, with other parameters, reports
    exactly what a fresh evaluation of those parameters reports."""
    import dataclasses
    import jax
    from uvjax.evaluation import run as ev
    from uvjax.inference.loading import load_trained
    root, _ = first_run
    wd = str(root / "a")
    a = load_trained(wd)
    b = dataclasses.replace(a, variables=jax.tree.map(lambda x: x * 0.7, a.variables))
    kw = dict(num_images=6, judge_preset="test", write=False, tasks=("vqa", "generation"))
    first = ev.evaluate_run(wd, quick=False, loaded=a, **kw)  # trains the test judge if the cache lacks it
    ev.evaluate_run(wd, quick=True, loaded=a, **kw)
    reused = ev.evaluate_run(wd, quick=True, loaded=b, **kw)
    fresh = ev.evaluate_run(wd, quick=False, loaded=dataclasses.replace(load_trained(wd), variables=b.variables), **kw)
    assert reused["vqa"] == fresh["vqa"] and reused["generation"]["judge_accuracy"] == fresh["generation"]["judge_accuracy"]
    assert reused["generation"]["frechet_judge"] == fresh["generation"]["frechet_judge"]
    assert reused["generation"]["frechet_judge"] != first["generation"]["frechet_judge"]  # the parameters reached it


def test_workdir_of_another_config_is_refused(first_run):
    root, _ = first_run
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "uvjax.train", "--config=configs/vqvq.py:smoke",
                           f"--workdir={root / 'a'}", "--config.model.hidden=32", "--config.train.progress=False"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "holds a run of a different config" in proc.stderr


class _CountingCodec:
    """Stands in for the VQ encoder: codes are a function of the pixels; counts encoded images."""

    def __init__(self):
        self.encoded = 0

    def encode(self, images):
        self.encoded += len(images)
        flat = images.reshape(len(images), 16, -1).astype(np.int64).sum(-1)
        return (flat % 50).astype(np.int32)


def test_pretokenisation_resumes_at_the_first_unfinished_chunk(tmp_path):
    from uvjax.data import smartwatch as sw
    from uvjax.data.storage import RecordReader, expand_paths
    from uvjax.data.records import record_from_bytes
    spec = sw.SmartWatchSpec(name="train", seed=3, num_images=12, image_size=32)
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir(), part.mkdir()
    c1 = _CountingCodec()
    counts = pretokenise_split(spec, c1, str(full), chunk=5, batch=4)
    assert c1.encoded == 12  # each image encoded once, though vqa/caption/generation share it
    c2 = _CountingCodec()
    pretokenise_split(spec, c2, str(part), chunk=5, batch=4)
    # simulate a kill during chunk 1: its marker and one shard are gone, a stray partial file remains
    os.remove(part / ".train-chunk00001.done")
    for f in os.listdir(part):
        if "-c00001" in f and "generation" in f:
            os.remove(part / f)
    c3 = _CountingCodec()
    again = pretokenise_split(spec, c3, str(part), chunk=5, batch=4)
    assert c3.encoded == 5 and again == counts

    def records(d):
        out = []
        for stream in ("understanding", "generation"):
            r = RecordReader(expand_paths(str(d / f"train-{stream}-*.array_record")))
            out += [record_from_bytes(r.read_bytes(i)) for i in range(len(r))]
        return out
    a, b = records(full), records(part)
    assert [r.id for r in a] == [r.id for r in b]
    for x, y in zip(a, b):
        for sx, sy in zip(x.segments, y.segments):
            assert sx.kind == sy.kind and sx.text == sy.text
            if sx.kind == "image":
                assert sx.pixels is None and np.array_equal(sx.codes, sy.codes)


def test_train_step_never_runs_a_frozen_tower():
    """The compiled step reads codes only: no convolution (the VQ/ViT towers' op) in its program."""
    import jax
    from helpers import random_batch, tiny_config
    from uvjax.config import model_config
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.sharding import global_batch_from_local, make_mesh
    from uvjax.training.step import create_trainer, make_train_step
    cfg = tiny_config()
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    trainer, state = create_trainer(UnifiedModel(model_config(cfg).validate()), cfg, mesh, cfg.sharding.rules)
    batch = random_batch(np.random.default_rng(0), 8, 16, 24, 96)
    step = make_train_step(trainer, batch)
    hlo = step.lower(state, global_batch_from_local(batch, mesh)).as_text()
    assert "dot_general" in hlo  # the decoder's matmuls are there...
    assert "convolution" not in hlo  # ...and no tower's convolutions
