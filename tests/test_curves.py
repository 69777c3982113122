"""Learning curves (``uvjax/evaluation/curves.py``): the points read back from metrics.jsonl, their mean and
min..max over seeds (against numpy on hand-written values), and the plots."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from uvjax.evaluation.curves import CURVE_METRICS, curves_over_seeds, plot_curves, plot_run_curves, read_curves

W, C = "eval/gen/weather/accuracy", "eval/vqa/weather_pos/strict"


def _metrics(workdir, rows):
    """metrics.jsonl as a run writes it, one JSON object per line (written here by hand, without uvjax)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_read_curves_keeps_the_evaluation_points_in_step_order(tmp_path):
    wd = str(tmp_path / "run")
    _metrics(wd, [{"step": 10, "loss": 2.0}, {"step": 200, W: 0.5, C: 0.25}, {"step": 100, W: 0.3},
                  {"step": 20, "loss": 1.5}, {"step": 300, W: 0.9, C: 1.0, "loss": 1.0}])
    got = read_curves(wd)
    assert got == {W: ([100, 200, 300], [0.3, 0.5, 0.9]), C: ([200, 300], [0.25, 1.0])}
    assert read_curves(str(tmp_path / "none")) == {}


def test_curves_over_seeds_are_mean_min_max_at_the_common_steps():
    seeds = [{W: ([100, 200, 300], [0.2, 0.6, 0.9])},
             {W: ([100, 200, 300], [0.4, 0.5, 1.0])},
             {W: ([100, 200], [0.3, 0.7])}]  # a seed stopped before step 300: that step is left out
    got = curves_over_seeds(seeds)[W]
    v = np.array([[0.2, 0.6], [0.4, 0.5], [0.3, 0.7]])
    assert got["steps"] == [100, 200] and got["n"] == 3
    np.testing.assert_allclose(got["mean"], [0.3, 0.6])
    np.testing.assert_allclose(got["mean"], v.mean(0))
    np.testing.assert_allclose(got["lo"], [0.2, 0.5])
    np.testing.assert_allclose(got["hi"], [0.4, 0.7])
    assert curves_over_seeds([]) == {}


def test_plot_run_curves_needs_two_points_and_writes_a_png(tmp_path):
    wd = str(tmp_path / "run")
    _metrics(wd, [{"step": 1500, W: 0.6}])
    assert plot_run_curves(wd) is None and not os.path.exists(os.path.join(wd, "eval"))
    _metrics(wd, [{"step": 500, W: 0.3, C: 0.2}, {"step": 1000, W: 0.5, C: 0.6}, {"step": 1500, W: 0.6, C: 0.7}])
    path = plot_run_curves(wd)
    assert path == os.path.join(wd, "eval", "curves.png")
    with Image.open(path) as im:  # 3 x 2 panels at 4.2 x 3.3 in, 100 dpi
        assert im.format == "PNG" and im.size == (1260, 660)
        px = np.asarray(im.convert("RGB"))
    assert (px < 250).any(axis=-1).mean() > 0.02  # something is drawn on the white canvas


def test_plot_curves_with_bands_per_arm(tmp_path):
    c = curves_over_seeds([{W: ([1, 2], [0.1, 0.9])}, {W: ([1, 2], [0.3, 0.7])}])
    path = str(tmp_path / "c.png")
    plot_curves({"arm a": c, "arm b": {W: {"steps": [1, 2], "mean": [0.5, 0.5]}}}, path, title="t",
                panels=CURVE_METRICS[3:4])
    with Image.open(path) as im:
        assert im.size == (1260, 330)


def test_an_unknown_judge_preset_is_named(tmp_path):
    from uvjax.config import base_config
    from uvjax.evaluation.run import ensure_judge
    cfg = base_config()
    cfg.stages.evaluate.judge_preset = "nope"
    with pytest.raises(ValueError, match="stages.evaluate.judge_preset='nope'"):
        ensure_judge(str(tmp_path / "run"), cfg)


def test_the_summary_names_records_not_used_whole():
    from uvjax.evaluation.summary import data_lines
    assert data_lines({"records": 100, "skipped": 0, "dropped": 0, "truncated": 0}) == []
    (_, line) = data_lines({"records": 48902, "skipped": 0, "dropped": 2, "truncated": 6971}, 128)
    assert line.startswith("data: of 48902 training records read, 2 dropped as too long, 6971 truncated at "
                           "train.seq_len=128")
