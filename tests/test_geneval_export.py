"""GenEval layout export: one folder per prompt with its metadata line and n PNG samples, the samples being
``run.generate(prompt, n, seed)``'s images."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_vq_run  # the smoke LM (2 steps) + a random-init 32 px VQ


PROMPTS = [  # GenEval's evaluation_metadata.jsonl style: tag, include, prompt (extra keys are kept as they are)
    {"tag": "single_object", "include": [{"class": "watch", "count": 1}], "prompt": "a photo of a watch"},
    {"tag": "color_attr", "include": [{"class": "watch", "count": 1, "color": "red"}],
     "prompt": "A smart watch showing rain, 10:15", "note": "ünïcode kept"},
    {"tag": "counting", "include": [{"class": "watch", "count": 2}], "prompt": "two watches"},
]
N, SEED, CFG = 2, 5, 2.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import uvjax
    wd = tiny_vq_run(str(tmp_path_factory.mktemp("geneval")))
    return wd, uvjax.load(wd)


def _pixels(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_export_layout_metadata_and_samples_equal_run_generate(tiny, tmp_path, monkeypatch):
    import uvjax
    from uvjax.integrations import geneval
    wd, run = tiny
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in PROMPTS) + "\n\n", encoding="utf-8")
    out = tmp_path / "geneval"
    loads = []  # the command's uvjax.load hands back the fixture's model: one compilation for the module's tests
    monkeypatch.setattr(uvjax, "load", lambda path, step=None: loads.append((path, step)) or run, raising=False)
    summary = geneval.main([f"--workdir={wd}", f"--prompts={src}", f"--out={out}", f"--n={N}", f"--seed={SEED}",
                            f"--cfg_scale={CFG}"])
    assert loads == [(wd, None)]
    assert summary["written"] == len(PROMPTS) and summary["fewer_images"] == {}
    assert sorted(os.listdir(out)) == ["00000", "00001", "00002"]
    for i, p in enumerate(PROMPTS):
        folder = out / f"{i:05d}"
        assert sorted(os.listdir(folder)) == ["metadata.jsonl", "samples"]
        lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 1 and json.loads(lines[0]) == p
        assert sorted(os.listdir(folder / "samples")) == [f"{k:04d}.png" for k in range(N)]
        ref = run.generate(p["prompt"], n=N, cfg_scale=CFG, seed=SEED)
        assert len(ref) == N
        for k, im in enumerate(ref):
            got = _pixels(folder / "samples" / f"{k:04d}.png")
            assert got.shape == (run.image_size, run.image_size, 3) == (32, 32, 3)
            np.testing.assert_array_equal(got, np.asarray(im))
    # the two samples of a prompt differ (n draws, not one image twice)
    a, b = (_pixels(out / "00000" / "samples" / f"{k:04d}.png") for k in range(2))
    assert not np.array_equal(a, b)


def test_smartwatch_prompts_resize_and_resume(tiny, tmp_path):
    from uvjax.data import smartwatch as sw
    from uvjax.integrations import geneval
    wd, run = tiny
    prompts = geneval.smartwatch_prompts(wd, num_images=2)
    # the run's test split (seed 0, from index 10**9, 32 px): one generation record per image
    recs = [r for r in sw.generate(sw.SmartWatchSpec("test", 0, 2, 10**9, 32)) if r.task == "generation"]
    assert [p["prompt"] for p in prompts] == [r.segments[0].text for r in recs]
    for p, r in zip(prompts, recs):
        a = r.attributes
        by_hand = {"time": f"{a['hour']:02d}:{a['minute']:02d}", "weather": a["weather"],
                   "battery": f"{a['battery']}%", "weather_pos": a["weather_pos"], "battery_pos": a["battery_pos"]}
        assert p["tag"] == "smartwatch" and p["record_id"] == r.id
        assert p["attributes"] == {m: by_hand[m] for m in a["mentioned"]} and p["attributes"]
    out = str(tmp_path / "sw")
    s = geneval.export(run, prompts, out, n=N, cfg_scale=CFG, seed=SEED, resize=64)
    assert s["written"] == 2 and s["image_size"] == 64
    for i, p in enumerate(prompts):
        ref = run.generate(p["prompt"], n=N, cfg_scale=CFG, seed=SEED)
        for k, im in enumerate(ref):
            got = _pixels(os.path.join(out, f"{i:05d}", "samples", f"{k:04d}.png"))
            assert got.shape == (64, 64, 3)
            np.testing.assert_array_equal(got, np.asarray(im.resize((64, 64), Image.Resampling.BICUBIC)))
    # a finished folder is kept; one whose metadata changed is drawn again
    meta = os.path.join(out, "00001", "metadata.jsonl")
    with open(meta, "w") as f:
        f.write("{}\n")
    s2 = geneval.export(run, prompts, out, n=N, cfg_scale=CFG, seed=SEED, resize=64)
    assert (s2["written"], s2["kept"]) == (1, 1)
    with open(meta) as f:
        assert json.loads(f.read()) == prompts[1]
    assert not [d for d in os.listdir(out) if d.endswith(".partial")]


def test_bad_prompt_files_name_the_line(tmp_path):
    from uvjax.integrations.geneval import read_prompts
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a cat"}\n{"tag": "x"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: expected a JSON object with a non-empty string \"prompt\""):
        read_prompts(str(p))
    p.write_text('{"prompt": "a cat"}\nnot json\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not JSON"):
        read_prompts(str(p))
    p.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(str(p))
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"prompt": "a", "tag": "t"}\n\n')
    assert read_prompts(str(ok)) == [{"prompt": "a", "tag": "t"}]
