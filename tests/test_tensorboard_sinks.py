"""Evaluation images, tables and the config in TensorBoard, and the optional W&B sink (issue #32).

Everything is read back with the viewers' own readers, not with the library that wrote it (tensorboardX):
TensorBoard's ``EventAccumulator`` and hparams plugin metadata parser, the ``tensorboard --inspect`` CLI, and
wandb's own ``.wandb`` record reader (``DataStore`` + its protobuf). Reference values are hand-computed
(grid sizes, flattened config), drawn independently (test renders through the test's toy VQ, upsampled with
numpy) or the other sink's file (``metrics.jsonl``, the PNGs and ``table.txt`` on disk).
"""
import functools
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from test_evaluation import toy_decode, toy_encode

PAD, TEXT_W, RECON_TEXT_W = 4, 520, 200  # uvjax.evaluate.grid_image's layout (generations: prompt + model text)
EVAL_EVERY, STEPS, QUICK_IMAGES, SIZE = 2, 4, 2, 32


def _accumulator(logdir):
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(logdir, size_guidance={ea.IMAGES: 0, ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    return acc


def _text(acc, tag):
    from tensorboard.util import tensor_util
    return {e.step: tensor_util.make_ndarray(e.tensor_proto).reshape(-1)[0].decode() for e in acc.Tensors(tag)}


def _decoded(image_event):
    import io
    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))


def _grid_hw(rows, size, text_w=TEXT_W):
    cell = max(64, min(128, size))
    return rows * (cell + PAD) + PAD, 2 * (cell + PAD) + text_w + PAD


def _up(img, size):
    """NEAREST upsampling to the grid cell (64 px for 32 px images) by integer repetition."""
    k = max(64, min(128, size)) // img.shape[0]
    return np.repeat(np.repeat(img, k, 0), k, 1)


def _cell(grid, row, col, size):
    cell = max(64, min(128, size))
    y, x = PAD + row * (cell + PAD), PAD + col * (cell + PAD)
    return grid[y:y + cell, x:x + cell]


def _wandb_records(workdir):
    """(history: step -> {key: value}, config: key -> value, run record) from the offline run's ``.wandb``
    file."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore
    files = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    ds = DataStore()
    ds.open_for_scan(files[0])
    history, config, run = {}, {}, None
    while (data := ds.scan_data()) is not None:
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for it in rec.history.item:
                key = "/".join(it.nested_key) if len(it.nested_key) == 1 else tuple(it.nested_key)
                row[key or it.key] = json.loads(it.value_json)
            history.setdefault(int(rec.history.step.num), {}).update(row)
        if kind == "run":
            run = rec.run
        if kind in ("run", "config"):
            upd = rec.run.config.update if kind == "run" else rec.config.update
            config.update({u.key: json.loads(u.value_json) for u in upd})
    return history, config, run


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """A 4-step training with quick evaluations every 2 steps (the test's toy VQ, 2 test images, no judge)
    and the W&B sink on, offline."""
    from configs.vqvq import get_config
    from datasets import make_code_dataset
    import uvjax.evaluation.run as ev
    from uvjax.train import run
    root = tmp_path_factory.mktemp("tbsinks")
    ds = make_code_dataset(str(root / "data"), num_images=24, image_tokens=16, num_codes=64)
    cfg = get_config("smoke")
    with cfg.unlocked():
        cfg.stages.build = True  # quick evaluations run in stage-built runs only (the VQ is a stage)
        cfg.stages.cache_dir = str(root / "cache")  # no cached judge there: generation is not judged
        cfg.data.tokenizer = ds["tokenizer"]
        cfg.data.streams.understanding.paths = (ds["paths"]["understanding"],)
        cfg.data.streams.generation.paths = (ds["paths"]["generation"],)
        cfg.train.steps, cfg.train.progress, cfg.train.async_checkpoint = STEPS, False, False
        cfg.train.eval_every, cfg.train.eval_images = EVAL_EVERY, QUICK_IMAGES
        cfg.train.wandb.enabled = True
        cfg.train.wandb.run_name = "tb-sinks-test"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_ERROR_REPORTING": "false",
           "WANDB_CONFIG_DIR": str(root / "wbconf"), "WANDB_CACHE_DIR": str(root / "wbcache"),
           "WANDB_DATA_DIR": str(root / "wbdata")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setattr(ev, "evaluate_run", functools.partial(ev.evaluate_run, encode_images=toy_encode,
                                                         decode_codes=toy_decode, image_size=SIZE,
                                                         num_images=QUICK_IMAGES))
        run(cfg, str(root / "run"))
    return cfg, str(root / "run")


def _test_images(cfg, n):
    """The first n test images (pixels) and the first n generation prompts' attributes, as the evaluation
    picks them: the run's test split, records in order."""
    from uvjax.data import smartwatch as sw
    from uvjax.evaluation.run import test_spec
    records = list(sw.generate(test_spec(cfg, n, SIZE)))
    pixels = []
    for r in records:
        for s in r.images():
            if s.pixels is not None and not any(p is s.pixels for p in pixels):
                pixels.append(s.pixels)
    gen_attrs = [r.attributes for r in records if r.task == "generation"]
    return pixels[:n], gen_attrs[:n]


def test_quick_eval_logs_grids_and_table_at_the_eval_step_only(wandb_run):
    cfg, workdir = wandb_run
    acc = _accumulator(os.path.join(workdir, "tensorboard"))
    gen = acc.Images("eval/generations")
    rec = acc.Images("eval/vq_reconstructions")
    assert [e.step for e in gen] == [EVAL_EVERY] and [e.step for e in rec] == [EVAL_EVERY]  # not every log step
    h, w = _grid_hw(QUICK_IMAGES, SIZE)  # 2 prompts x (64 + 4) + 4 = 140; 2 x 68 + 520 + 4 = 660
    assert (gen[0].height, gen[0].width) == (h, w) == (140, 660)
    h, w = _grid_hw(QUICK_IMAGES, SIZE, RECON_TEXT_W)
    assert (rec[0].height, rec[0].width) == (h, w) == (140, 340)
    g, r = _decoded(gen[0]), _decoded(rec[0])
    assert g.shape == (gen[0].height, gen[0].width, 3)
    from uvjax.data import smartwatch as sw
    pixels, gen_attrs = _test_images(cfg, QUICK_IMAGES)
    for i, attrs in enumerate(gen_attrs):  # column 0: the real render of prompt i
        np.testing.assert_array_equal(_cell(g, i, 0, SIZE), _up(sw.render(attrs, SIZE), SIZE))
    for i, real in enumerate(pixels):  # real | real through the (toy) VQ
        np.testing.assert_array_equal(_cell(r, i, 0, SIZE), _up(real, SIZE))
        np.testing.assert_array_equal(_cell(r, i, 1, SIZE), _up(toy_decode(toy_encode(real[None]))[0], SIZE))

    text = _text(acc, "eval/table/text_summary")
    assert list(text) == [EVAL_EVERY]
    table = text[EVAL_EVERY]
    assert table.startswith("```\n") and table.endswith("\n```")  # a code block: the spacing survives Markdown
    assert f"step {EVAL_EVERY} ({QUICK_IMAGES} test images, quick)" in table
    from uvjax.training.metrics import read_metrics
    m = read_metrics(workdir)[EVAL_EVERY]
    # the table's VQA "all" row shows the eval/vqa/all/* scalars that metrics.jsonl holds at that step
    row = next(line for line in table.splitlines() if line.startswith("all ") and "." in line)
    vals = [float(x) for x in row.split()[2:]]
    assert vals == pytest.approx([m["eval/vqa/all/strict"], m["eval/vqa/all/tolerant"], m["eval/vqa/all/coarse"],
                                  m["eval/vqa/all/hour"], m["eval/vqa/all/reference"]], abs=5e-4)


def test_tensorboard_scalars_equal_metrics_jsonl(wandb_run):
    from uvjax.training.metrics import read_metrics
    _, workdir = wandb_run
    acc = _accumulator(os.path.join(workdir, "tensorboard"))
    metrics = read_metrics(workdir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for step, rec in metrics.items():
        for k, v in rec.items():
            if k == "step":
                continue
            got = [e.value for e in acc.Scalars(k) if e.step == step]
            assert got == [pytest.approx(v, rel=1e-6, abs=1e-6)], (step, k)  # float32 in the event file


def test_config_is_the_hparams_session_of_the_run(wandb_run):
    from tensorboard.plugins.hparams import api_pb2, metadata
    cfg, workdir = wandb_run
    acc = _accumulator(os.path.join(workdir, "tensorboard"))
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert metadata.EXPERIMENT_TAG not in content  # TensorBoard builds the table across all runs of a logdir
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS

    want = {}  # hand flattening of the ConfigDict: dotted keys; tuples/lists as their JSON text, None as null

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                want[f"{prefix}{k}"] = (json.dumps(list(v)) if isinstance(v, (tuple, list)) else
                                        "null" if v is None else v)
    walk(cfg.to_dict(), "")
    got = start.hparams
    assert set(got) == set(want)
    for k, v in want.items():
        field = got[k].WhichOneof("kind")
        if isinstance(v, bool):
            assert (field, got[k].bool_value) == ("bool_value", v), k
        elif isinstance(v, (int, float)):
            assert (field, got[k].number_value) == ("number_value", float(v)), k
        else:
            v = str(v)
            assert field == "string_value", k
            assert got[k].string_value == (v if len(v) <= 1024 else v[:1023] + "…"), k
    # a few by hand
    assert got["model.hidden"].number_value == cfg.model.hidden
    assert got["mesh.shape"].string_value == "[" + ", ".join(str(int(x)) for x in cfg.mesh.shape) + "]"
    assert got["train.wandb.enabled"].bool_value is True
    assert got["train.eval_every"].number_value == EVAL_EVERY


def test_wandb_offline_run_holds_the_scalars_images_and_config(wandb_run):
    from uvjax.training.metrics import read_metrics
    cfg, workdir = wandb_run
    history, config, run = _wandb_records(workdir)
    with open(os.path.join(workdir, "wandb", "uvjax_run_id")) as f:  # offline: a new run in the work dir's group
        assert run.run_group == f.read().strip() and run.run_id != run.run_group and run.project == "uvjax"
    assert run.display_name == "tb-sinks-test"
    with open(os.path.join(workdir, "metrics.jsonl")) as f:  # every line: step 2 has a train and an eval line
        lines = [json.loads(x) for x in f]
    assert len(lines) == STEPS + 1 and sorted(read_metrics(workdir)) == list(range(1, STEPS + 1))
    for line in lines:
        step = line.pop("step")
        line.pop("crc32", None)
        for k, v in line.items():
            assert history[step][k] == pytest.approx(v, rel=1e-12), (step, k)
    img = history[EVAL_EVERY]
    h, w = _grid_hw(QUICK_IMAGES, SIZE)
    assert img[("eval/generations", "_type")] == "image-file"
    assert (img[("eval/generations", "height")], img[("eval/generations", "width")]) == (h, w)
    # the PNG W&B stored is the grid TensorBoard shows
    (run_dir,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
    png = os.path.join(run_dir, "files", img[("eval/generations", "path")])
    tb = _accumulator(os.path.join(workdir, "tensorboard")).Images("eval/generations")[0]
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), _decoded(tb))
    assert img[("eval/table", "_type")] == "html-file"
    run_cfg = json.load(open(os.path.join(workdir, "config.json")))
    for section in ("model", "train", "optim", "loss", "data"):
        assert config[section] == run_cfg[section], section
    assert config["train"]["wandb"]["run_name"] == "tb-sinks-test"


def test_evaluate_run_with_a_writer_logs_what_it_writes_to_disk(wandb_run, tmp_path):
    """evaluate_run(write=True, writer=...): the TensorBoard images are the PNGs on disk, pixel for pixel,
    the text is table.txt, the scalars are report.json's."""
    from uvjax.evaluation.run import evaluate_run
    from uvjax.training.metrics import MetricWriter, read_metrics
    _, workdir = wandb_run
    logdir, out = str(tmp_path / "log"), str(tmp_path / "eval")
    writer = MetricWriter(logdir)
    rep = evaluate_run(workdir, num_images=QUICK_IMAGES, encode_images=toy_encode, decode_codes=toy_decode,
                       image_size=SIZE, out_dir=out, tasks=("generation",), quick=True, writer=writer)
    writer.close()
    acc = _accumulator(os.path.join(logdir, "tensorboard"))
    for tag, name, text_w in (("eval/generations", "generations.png", TEXT_W),
                              ("eval/vq_reconstructions", "vq_reconstructions.png", RECON_TEXT_W)):
        (ev,) = acc.Images(tag)
        assert ev.step == STEPS and (ev.height, ev.width) == _grid_hw(QUICK_IMAGES, SIZE, text_w)
        disk = np.asarray(Image.open(os.path.join(out, name)).convert("RGB"))
        np.testing.assert_array_equal(_decoded(ev), disk)
        np.testing.assert_array_equal(rep.images[name[:-4]], disk)  # the in-memory grid is the file
    table = open(os.path.join(out, "table.txt")).read()
    assert _text(acc, "eval/table/text_summary") == {STEPS: "```\n" + table.rstrip("\n") + "\n```"}
    disk = json.load(open(os.path.join(out, "report.json")))
    m = read_metrics(logdir)[STEPS]
    assert m["eval/gen/images_generated"] == disk["generation"]["images_generated"]
    assert "no cached judge" in disk["generation"]["judge_skipped"] and "no cached judge" in table
    assert disk["files"]["vq_reconstructions"] == os.path.join(out, "vq_reconstructions.png")


def test_quick_eval_writes_no_files(wandb_run):
    """The quick evaluation (``write=False``) logged grids kept in memory: nothing under the run's eval/."""
    _, workdir = wandb_run
    assert not os.path.exists(os.path.join(workdir, "eval"))
    assert _accumulator(os.path.join(workdir, "tensorboard")).Images("eval/generations")


def test_quick_eval_without_a_vq_only_warns(wandb_run, tmp_path, caplog):
    """A stage-built run whose VQ is not there yet: the quick evaluation logs why and writes nothing."""
    from uvjax.train import _quick_eval
    from uvjax.training.metrics import MetricWriter, read_metrics
    cfg, workdir = wandb_run  # the run has no VQ tokenizer (the fixture injected a toy one)
    writer = MetricWriter(str(tmp_path))
    state = types.SimpleNamespace(trainable={}, frozen={})  # never read: the VQ is looked for first
    with caplog.at_level(logging.WARNING):
        _quick_eval(cfg, None, state, workdir, 6, writer)
    writer.close()
    assert any("quick evaluation skipped at step 6" in r.getMessage() and "VQ tokenizer" in r.getMessage()
               for r in caplog.records)
    acc = _accumulator(os.path.join(str(tmp_path), "tensorboard"))
    assert acc.Tags()["images"] == [] and acc.Tags()["scalars"] == [] and read_metrics(str(tmp_path)) == {}


def test_tensorboard_inspect_cli_lists_the_tags(wandb_run):
    """The CLI the README points at (``tensorboard --logdir DIR``), in its offline ``--inspect`` mode."""
    _, workdir = wandb_run
    exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    exe = exe if os.path.exists(exe) else shutil.which("tensorboard")
    assert exe, "the tensorboard CLI is not installed (pip install 'uvjax[viz]')"
    res = subprocess.run([exe, "--inspect", "--logdir", os.path.join(workdir, "tensorboard")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    for tag in ("eval/generations", "eval/vq_reconstructions", "eval/table/text_summary", "loss",
                "eval/vqa/all/strict"):
        assert f"\n   {tag}\n" in out, tag


def test_wandb_is_not_imported_when_the_sink_is_off(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import numpy as np
from helpers import tiny_config
from uvjax.training.metrics import MetricWriter
import uvjax.train, uvjax.evaluate
cfg = tiny_config()
assert cfg.train.wandb.enabled is False
w = MetricWriter({str(tmp_path)!r}, config=cfg)
w.write(1, {{"loss": 1.0}})
w.write_images(1, {{"x": np.zeros((4, 4, 3), np.uint8)}})
w.write_text(1, {{"t": "a"}})
w.close()
assert "wandb" not in sys.modules, "wandb imported"
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert not os.path.exists(tmp_path / "wandb")


def test_bad_wandb_mode_and_bad_image_are_named(tmp_path):
    from uvjax.training.metrics import MetricWriter
    cfg = tiny_config()
    cfg.train.wandb.enabled = True
    cfg.train.wandb.mode = "offine"
    with pytest.raises(ValueError, match=r"train\.wandb\.mode='offine'.*online, offline, disabled"):
        MetricWriter(str(tmp_path), config=cfg)
    w = MetricWriter(str(tmp_path))
    with pytest.raises(ValueError, match=r"image 'eval/x'.*uint8 \[H, W, 1\|3\|4\].*float64"):
        w.write_images(1, {"eval/x": np.zeros((4, 4, 3))})
    w.close()


def test_wandb_keys_leave_the_lm_fingerprint_unchanged():
    """Runs saved before the keys existed keep their fingerprint, and toggling the sink keeps the run."""
    from uvjax.training.workdir import config_changes, lm_fingerprint
    new = tiny_config()
    old = tiny_config()
    with old.unlocked():
        del old.train["wandb"]  # a config from before train.wandb
    assert lm_fingerprint(new) == lm_fingerprint(old)
    on = tiny_config()
    on.train.wandb.enabled, on.train.wandb.mode, on.train.wandb.project = True, "online", "elsewhere"
    assert lm_fingerprint(on) == lm_fingerprint(old)
    assert config_changes(json.loads(old.to_json_best_effort()), json.loads(on.to_json_best_effort())) == ([], [])
    other = tiny_config(**{"model.hidden": 48})  # the fingerprint does see model keys
    assert lm_fingerprint(other) != lm_fingerprint(old)
