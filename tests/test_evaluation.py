"""VQA scoring rules on hand-written answers, and an end-to-end evaluation of a tiny trained run."""
import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from uvjax.evaluation.metrics import Accumulator, caption_scores, score_answer


def S(att, pred, truth):
    return score_answer(att, pred, truth)


@pytest.mark.parametrize("pred,strict,tol,coarse,hour", [
    ("10:15", 1, 1, 1, 1),
    (" 10:15. ", 1, 1, 1, 1),
    ("It is 10:16", 0, 1, 1, 1),      # parsed, 1 minute off
    ("10:14:59", 0, 1, 1, 1),         # seconds ignored by the tolerant rule
    ("10:20", 0, 0, 1, 1),            # same quarter hour
    ("10:45", 0, 0, 0, 1),            # right hour only
    ("11:15", 0, 0, 0, 0),
    ("quarter past ten", 0, 0, 0, 0),  # no H:MM to parse
])
def test_time_strict_tolerant_coarse(pred, strict, tol, coarse, hour):
    s = S("time", pred, "10:15")
    assert (s["strict"], s["tolerant"], s["coarse"], s["hour"]) == (strict, tol, coarse, hour)


def test_time_wraps_around_the_dial_and_reference_score():
    assert S("time", "11:59", "12:00")["tolerant"] == 1  # 1 minute apart across the hour
    assert S("time", "00:05", "12:05")["tolerant"] == 1 and S("time", "00:05", "12:05")["strict"] == 0
    assert S("time", "10:59", "11:00")["coarse"] == 1     # tolerant implies coarse across hour edges
    assert S("time", "04:15", "10:15")["reference"] == pytest.approx(1 - (6 / 6 + 0) / 2)
    assert S("time", "10:45", "10:15")["reference"] == pytest.approx(1 - (0 + 30 / 30) / 2)


@pytest.mark.parametrize("pred,strict,tol,coarse", [
    ("45%", 1, 1, 1), ("45 %", 0, 1, 1), ("47%", 0, 1, 1), ("50", 0, 1, 1), ("51%", 0, 0, 1),
    ("61%", 0, 0, 0), ("full", 0, 0, 0), ("450%", 0, 0, 0)])
def test_battery(pred, strict, tol, coarse):
    s = S("battery", pred, "45%")
    assert (s["strict"], s["tolerant"], s["coarse"]) == (strict, tol, coarse)


def test_battery_top_bucket_includes_100():
    assert S("battery", "85%", "100%")["coarse"] == 1 and S("battery", "85%", "100%")["tolerant"] == 0
    assert S("battery", "0%", "3%")["tolerant"] == 1 and S("battery", "3%", "3%")["reference"] == 1


@pytest.mark.parametrize("att,pred,truth,strict,tol", [
    ("weather", "Sunny.", "sunny", 1, 1),
    ("weather", "it is sunny", "sunny", 0, 1),
    ("weather", "sunny or cloudy", "sunny", 0, 0),   # two values: not an answer
    ("weather", "cloudy", "sunny", 0, 0),
    ("weather_pos", "the top-left corner", "top-left", 0, 1),
    ("weather_pos", "top-left and bottom-right", "top-left", 0, 0),
    ("battery_pos", "top", "top-left", 0, 0),
    ("battery_pos", "Bottom-Right", "bottom-right", 1, 1),
])
def test_choices(att, pred, truth, strict, tol):
    s = S(att, pred, truth)
    assert (s["strict"], s["tolerant"], s["coarse"]) == (strict, tol, tol)


def test_caption_recall_and_accumulator():
    attrs = dict(hour=3, minute=2, second=0, weather="raining", battery=7, weather_pos="top-left",
                 battery_pos="bottom-right")
    cap = "The watch shows 03:02, a raining icon at the top-left, battery 70%."
    assert caption_scores(cap, attrs, ["time", "weather", "battery", "weather_pos", "battery_pos"]) == {
        "time": 1.0, "weather": 1.0, "battery": 0.0, "weather_pos": 1.0, "battery_pos": 0.0}
    acc = Accumulator()
    acc.add("a", {"x": 1.0})
    acc.add("a", {"x": 0.0})
    acc.add("b", {"x": 1.0})
    r = acc.result()
    assert r["a"] == {"n": 2, "x": 0.5} and r["all"] == {"n": 3, "x": pytest.approx(2 / 3)}


# ------------------------------------------------------------------------------ end to end
def toy_encode(images, grid=4):
    """A deterministic stand-in for the VQ encoder: 4x4 box-averaged colours, 4 levels per channel."""
    x = np.stack([np.asarray(Image.fromarray(im).resize((grid, grid), Image.Resampling.BOX)) for im in images])
    q = x.astype(np.int32) // 64
    return (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).reshape(len(images), -1).astype(np.int32)


def toy_decode(codes, size=32):
    c = np.asarray(codes).reshape(len(codes), 4, 4)
    rgb = (np.stack([c // 16, (c // 4) % 4, c % 4], -1) * 64 + 32).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.NEAREST)) for im in rgb])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from configs.vqvq import get_config
    from datasets import make_code_dataset
    from uvjax.train import run
    root = tmp_path_factory.mktemp("evalrun")
    ds = make_code_dataset(str(root / "data"), num_images=24, image_tokens=16, num_codes=64)
    cfg = get_config("smoke")
    with cfg.unlocked():
        if "stages" in cfg:
            cfg.stages.build = False
        cfg.data.tokenizer = ds["tokenizer"]
        cfg.data.streams.understanding.paths = (ds["paths"]["understanding"],)
        cfg.data.streams.generation.paths = (ds["paths"]["generation"],)
        cfg.train.steps, cfg.train.progress, cfg.train.async_checkpoint = 4, False, False
    run(cfg, str(root / "run"))
    return str(root / "run")


def test_evaluate_tiny_run_writes_a_well_formed_report(tiny_run, tmp_path):
    from uvjax.data import smartwatch as sw
    from uvjax.evaluation.report import format_table
    from uvjax.evaluation.run import evaluate_run
    import jax
    import jax.numpy as jnp
    from uvjax.evaluation.judge import PRESETS, Judge, JudgeNet
    cfg = PRESETS["test"]  # an untrained judge: this test checks the report, test_judge.py the judge
    judge = Judge(cfg, JudgeNet(cfg.width, cfg.feature_dim).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    out = str(tmp_path / "eval")
    rep = evaluate_run(tiny_run, num_images=4, encode_images=toy_encode, decode_codes=toy_decode, judge=judge,
                       image_size=32, out_dir=out, batch_size=8)
    with open(os.path.join(out, "report.json")) as f:
        disk = json.load(f)
    assert disk["step"] == 4 and disk["split"]["start_index"] == 10**9 and disk["image_tokens"] == 16
    # every VQA turn of the 4 test images is scored
    spec = sw.SmartWatchSpec("test", 0, 4, 10**9, 32)
    turns = sum(len(r.attributes["questions"]) for r in sw.generate(spec) if r.task == "vqa")
    assert disk["vqa"]["all"]["n"] == turns
    for att, d in disk["vqa"].items():
        assert 0 <= d["strict"] <= d["tolerant"] <= d["coarse"] <= 1, (att, d)
    assert disk["caption"]["all"]["n"] >= 4 and 0 <= disk["caption"]["all"]["recall"] <= 1
    g = disk["generation"]
    assert g["n"] == 4 and g["images_generated"] == 1.0  # <boi> is forced, N codes always fit
    assert g["judge_accuracy"]["time_hour"]["n"] == 4 and g["judge_accuracy_on_real"]["all"]["n"] >= 4
    assert np.isfinite(g["frechet_judge"]["generated_vs_real"]) and g["frechet_judge"]["n_generated"] == 4
    assert "not supported" in g["fid_inception"]
    png = Image.open(os.path.join(out, "generations.png"))
    assert png.size[0] > 200 and png.size[1] >= 4 * 64
    table = open(os.path.join(out, "table.txt")).read()
    assert table == format_table(rep) + "\n" and "weather_pos" in table and "judge reads" in table


def test_unknown_evaluation_task_is_named_before_any_work():
    from uvjax.evaluation.run import evaluate_run
    with pytest.raises(ValueError, match=r"\['captions'\].*vqa, caption, generation"):
        evaluate_run("/nonexistent/run", tasks=("vqa", "captions"))
