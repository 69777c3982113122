"""The experiment drivers (``uvjax/experiments``) at their ``:quick`` presets, end to end on the smoke chain:
every arm × seed is trained and evaluated, results.json / results.md / results.png are well-formed and agree
with the runs, matched arms get the steps that equalise their task's examples, and a rerun skips finished
runs. One stage cache and one JAX compilation cache are shared by the whole module, so the data, VQ,
SigLIP tower and judge are built once and identical programs compile once. Not the scientific outcome."""
import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("alignment", "knowledge_transfer", "ratio", "data_scaling", "reasoning", "mutual_benefit", "layout")


def _env(root):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax-cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _drive(root, name, *extra):
    proc = subprocess.run([sys.executable, "-m", f"uvjax.experiments.{name}",
                           f"--config=configs/experiments/{name}.py:quick", f"--workdir={root / name}",
                           f"--config.cache_dir={root / 'cache'}", *extra],
                          cwd=REPO, env=_env(root), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


class _Runs:
    """Runs each driver once per module, when a test first needs it (``-k alignment`` runs one driver)."""

    def __init__(self, root):
        self.root, self.done = root, set()

    def __call__(self, *names):
        for name in names:
            if name not in self.done:
                _drive(self.root, name)
                self.done.add(name)
        return self.root


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    return _Runs(tmp_path_factory.mktemp("experiments"))


def _quick(name):
    from uvjax.config import load_config_file
    ec = load_config_file(f"experiments/{name}", "quick")
    return ec, importlib.import_module(f"uvjax.experiments.{name}").EXPERIMENT


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_arm_and_seed_is_trained_and_evaluated(ran, name):
    root = ran(name)
    ec, exp = _quick(name)
    wd = root / name
    with open(wd / "results.json") as f:
        res = json.load(f)
    arms = exp.arms(ec)
    assert res["experiment"] == name and res["missing"] == []
    assert sorted((r["arm"], r["seed"]) for r in res["runs"]) == sorted((a.name, int(s)) for a in arms for s in ec.seeds)
    for a in arms:
        tasks = a.eval_tasks if a.eval_tasks is not None else tuple(ec.eval.tasks)
        for r in (r for r in res["runs"] if r["arm"] == a.name):
            rd = wd / a.name / f"seed_{r['seed']}"
            assert r["steps_run"] == r["train_steps"] > 0
            with open(rd / "metrics.jsonl") as f:
                steps = [json.loads(l)["step"] for l in f if l.strip()]
            assert steps and max(steps) == r["train_steps"]
            assert os.path.isdir(rd / "checkpoints" / str(r["train_steps"]))
            m = r["metrics"]
            if "vqa" in tasks:
                assert 0.0 <= m["vqa/all/strict"] <= 1.0 and os.path.exists(r["report"])
            else:
                assert not any(k.startswith("vqa/") for k in m)
            if "generation" in tasks:
                assert 0.0 <= m["gen/all/accuracy"] <= 1.0 and m["gen/images_generated"] == 1.0
            assert r["commit"] and r["machine"]["cpus"] > 0 and r["wall_s"] > 0 and r["cpu_s"] > 0
            assert r["group"] == a.group and r["x"] == a.x
    if name == "knowledge_transfer":
        for r in res["runs"]:
            for k in ("adapter_in_mean", "adapter_in_flat", "llm_hidden_mean"):
                assert 0.0 <= r["metrics"][f"probe/weather/{k}"] <= 1.0
    if name == "reasoning":
        for r in res["runs"]:
            assert 0.0 <= r["metrics"]["indirect/all/accuracy"] <= 1.0
            assert r["metrics"]["indirect/images_generated"] == 1.0


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_table_and_plot_agree_with_the_runs(ran, name):
    root = ran(name)
    ec, exp = _quick(name)
    wd = root / name
    with open(wd / "results.json") as f:
        res = json.load(f)
    panels = exp.panels(ec)
    with open(wd / "results.md") as f:
        lines = [l for l in f.read().splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["arm", "group", res["x_label"], "steps", "seeds"] and header[5:] == [p.label for p in panels]
    body = {l.strip("|").split("|")[0].strip(): [c.strip() for c in l.strip("|").split("|")] for l in lines[2:]}
    assert set(body) == {a.name for a in exp.arms(ec)}
    for arm, cells in body.items():
        runs = [r for r in res["runs"] if r["arm"] == arm]
        assert int(cells[4]) == len(runs) == len(ec.seeds)
        for p, cell in zip(panels, cells[5:]):
            vals = [r["metrics"][p.metric] for r in runs if p.metric in r["metrics"]]
            if not vals:
                assert cell == "—"
                continue
            mean, std = (float(x) for x in re.fullmatch(r"(\S+) ± (\S+)", cell).groups())
            assert mean == pytest.approx(np.mean(vals), abs=6e-4)
            assert std == pytest.approx(np.std(vals, ddof=1) if len(vals) > 1 else 0.0, abs=6e-4)
    from PIL import Image
    with Image.open(wd / "results.png") as im:
        from uvjax.experiments.plots import PANELS_PER_ROW
        cols = min(len(panels), PANELS_PER_ROW)
        rows = -(-len(panels) // cols)  # panels wrap into rows of PANELS_PER_ROW
        assert im.format == "PNG" and im.size[0] >= 300 * cols and im.size[1] >= 300 * rows


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n != "layout"])  # layout: equal steps, no matching
def test_matched_arms_see_the_reference_examples(ran, name):
    """Steps of a matched arm = the reference arm's examples of that stream / this arm's per step."""
    root = ran(name)
    ec, exp = _quick(name)
    with open(root / name / "budget.json") as f:
        budget = json.load(f)
    with open(root / name / "results.json") as f:
        steps = {r["arm"]: r["train_steps"] for r in json.load(f)["runs"]}
    matched = [a for a in exp.arms(ec) if a.match]
    assert matched  # every experiment has single-task or added-data arms
    for a in matched:
        stream, ref = a.match
        b, br = budget[a.name], budget[ref]
        examples = steps[ref] * br["examples_per_step"] * br["shares"][stream]
        assert b["matched"]["examples"] == pytest.approx(examples)
        assert steps[a.name] == max(1, round(examples / (b["examples_per_step"] * b["shares"][stream])))
        assert set(b["shares"]) == {s for s in ("understanding", "generation", "interleaved")
                                    if s in b["shares"]} and sum(b["shares"].values()) == pytest.approx(1.0)


def test_learning_curves_per_arm(ran):
    """``curve_every``: every arm × seed logs quick evaluations (judge-read generation included) during training,
    and the driver draws curves.png and stores each arm's curves (mean, min..max over seeds) in results.json,
    equal to the points in the runs' metrics.jsonl."""
    root = ran("ratio")  # its stage cache (judge included) is reused
    wd = root / "ratio_curves"
    proc = subprocess.run([sys.executable, "-m", "uvjax.experiments.ratio", "--config=configs/experiments/ratio.py:quick",
                           f"--workdir={wd}", f"--config.cache_dir={root / 'cache'}", "--config.curve_every=1",
                           "--config.curve_images=4", "--config.ratios=(0.0,1.0)"],
                          cwd=REPO, env=_env(root), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    ec, exp = _quick("ratio")
    assert (wd / "curves.png").exists() and set(res["curves"]) == {r["arm"] for r in res["runs"]}
    for arm, curves in res["curves"].items():
        lines = [json.loads(l) for l in (wd / arm / "seed_0" / "metrics.jsonl").read_text().splitlines() if l.strip()]
        logged = {l["step"]: l["eval/gen/all/accuracy"] for l in lines if "eval/gen/all/accuracy" in l}
        steps = next(r["train_steps"] for r in res["runs"] if r["arm"] == arm)
        assert sorted(logged) == list(range(1, steps))  # every step before the last (the driver evaluates that one)
        from uvjax.evaluation.curves import CURVE_METRICS
        drawn = [k for k, _ in CURVE_METRICS if any(k in l for l in lines)]
        assert drawn and set(curves) == set(drawn)  # the attributes the 4 test images ask about
        for key in drawn:
            pts = {l["step"]: l[key] for l in lines if key in l}
            assert curves[key]["steps"] == sorted(pts) and len(pts) >= 2 and curves[key]["n"] == 1
            assert curves[key]["mean"] == pytest.approx([pts[s] for s in sorted(pts)])
            assert curves[key]["lo"] == curves[key]["hi"] == curves[key]["mean"]  # one seed


def test_rerun_skips_finished_runs(ran):
    name = "knowledge_transfer"
    root = ran(name)
    wd = root / name
    ec, exp = _quick(name)
    done = {p: os.path.getmtime(p) for p in (wd / a.name / f"seed_{s}" / "DONE.json"
                                             for a in exp.arms(ec) for s in ec.seeds)}
    logs = {p: os.path.getsize(p.parent / "stages.jsonl") for p in done}
    out = _drive(root, name)
    assert f"{len(done)} already done" in out and "0 to run" in out
    assert {p: os.path.getmtime(p) for p in done} == done
    assert {p: os.path.getsize(p.parent / "stages.jsonl") for p in done} == logs  # nothing re-ran


def test_a_finished_run_of_another_config_is_refused(ran):
    root = ran("knowledge_transfer")
    proc = subprocess.run([sys.executable, "-m", "uvjax.experiments.knowledge_transfer",
                           "--config=configs/experiments/knowledge_transfer.py:quick",
                           f"--workdir={root / 'knowledge_transfer'}", f"--config.cache_dir={root / 'cache'}",
                           "--config.weather_keep=0.5"], cwd=REPO, env=_env(root), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "another configuration of arm" in proc.stderr


def test_a_removed_run_is_the_only_one_redone(ran):
    """Deleting one run's DONE marker re-runs that run only (it resumes from its final checkpoint)."""
    name = "alignment"
    root = ran(name)
    wd = root / name
    ec, exp = _quick(name)
    arms = exp.arms(ec)
    victim = wd / arms[-1].name / "seed_0" / "DONE.json"
    others = {p: os.path.getmtime(p) for p in (wd / a.name / "seed_0" / "DONE.json" for a in arms[:-1])}
    before = json.loads(victim.read_text())
    victim.unlink()
    out = _drive(root, name)
    assert "1 to run" in out
    assert {p: os.path.getmtime(p) for p in others} == others
    after = json.loads(victim.read_text())
    assert after["steps_run"] == 0 and after["train_steps"] == before["train_steps"]  # resumed, not retrained
    assert after["metrics"] == before["metrics"]  # same checkpoint, same greedy evaluation


def test_stream_fraction_is_a_prefix_of_the_stream(ran):
    """``data.streams.<s>.fraction`` keeps the first records: with shuffling and packing off, the pipeline
    cycles through exactly the first round(f·n) records of the full stream, in order."""
    from uvjax.data import pipeline
    from uvjax.data.storage import RecordReader, expand_paths
    from uvjax.data.tokenizer import TextTokenizer
    from uvjax.stage_log import read_stage_log
    root = ran("alignment")  # its run's stages: the shared smoke dataset and tokenizer
    log = {r["stage"]: r["path"] for r in read_stage_log(str(root / "alignment" / "unified-s0" / "seed_0"))}
    ds, tok = os.path.join(log["dataset"], "train"), TextTokenizer.load(log["tokenizer"])
    paths = os.path.join(ds, "train-understanding-*.array_record")
    n = len(RecordReader(expand_paths([paths])))

    def rows(fraction, count):
        c = pipeline.default_data_config()
        c.streams.understanding.paths, c.streams.generation.weight = (paths,), 0.0
        c.streams.understanding.fraction = fraction
        c.shuffle, c.packing, c.system_prompt = False, False, ""
        it = pipeline.make_train_iterator(c, tok, seq_len=192, local_batch_size=1)
        return [next(it)["tokens"][0] for _ in range(count)]

    k = round(0.25 * n)
    assert 2 <= k < n
    full, part = rows(1.0, k), rows(0.25, 2 * k)
    for i in range(2 * k):
        assert np.array_equal(part[i], full[i % k])
    c = pipeline.default_data_config()
    c.streams.understanding.paths, c.streams.understanding.fraction = (paths,), 1.5
    with pytest.raises(ValueError, match="fraction"):
        pipeline.make_train_iterator(c, tok, seq_len=192, local_batch_size=1)


def test_biased_and_reasoning_stages(ran):
    """knowledge_transfer's dataset thins weather in understanding records only; reasoning's stage writes
    interleaved records with rationales in one arm and without in the other, from the same prompts."""
    import glob
    from uvjax.data.records import record_from_bytes
    from uvjax.data.storage import RecordReader, expand_paths
    from uvjax.stage_log import read_stage_log
    root = ran("knowledge_transfer", "reasoning")

    def records(directory, stream):
        r = RecordReader(expand_paths([os.path.join(directory, f"train-{stream}-*.array_record")]))
        return [record_from_bytes(r.read_bytes(i)) for i in range(len(r))]

    kt = root / "knowledge_transfer" / "unified" / "seed_0"
    ds = [r["path"] for r in read_stage_log(str(kt)) if r["stage"] == "dataset"][-1]
    def weather_share(directory):
        und = records(os.path.join(directory, "train"), "understanding")
        asked = [q for r in und if r.task == "vqa" for q in r.attributes["questions"]]
        named = [m for r in und if r.task == "caption" for m in r.attributes["mentioned"]]
        gen = records(os.path.join(directory, "train"), "generation")
        return (asked.count("weather") / len(asked), named.count("weather") / len(named),
                sum("weather" in r.attributes["mentioned"] for r in gen) / len(gen), len(gen))

    others = [d for d in glob.glob(str(root / "cache" / "dataset-*")) if d != ds and os.path.isdir(os.path.join(d, "train"))]
    assert others, "the biased dataset must be a stage of its own, beside the shared one"
    b_vqa, b_cap, b_gen, b_n = weather_share(ds)
    f_vqa, f_cap, f_gen, f_n = weather_share(others[0])
    assert f_vqa > 0.1 and b_vqa < 0.4 * f_vqa  # keep rate 0.1
    assert f_cap > 0.1 and b_cap < 0.4 * f_cap
    assert (b_gen, b_n) == (f_gen, f_n)  # generation records untouched

    rs = {}
    for arm in ("rationale", "no-rationale"):
        rd = root / "reasoning" / arm / "seed_0"
        path = [r["path"] for r in read_stage_log(str(rd)) if r["stage"] == "reasoning"][-1]
        rs[arm] = records(os.path.join(path, "train"), "interleaved")
    assert [r.id for r in rs["rationale"]] == [r.id for r in rs["no-rationale"]] and rs["rationale"]
    for a, b in zip(rs["rationale"], rs["no-rationale"]):
        assert a.segments[0].text == b.segments[0].text  # the same prompt
        assert len(a.segments) == len(b.segments) + 1 and a.attributes["rationale_segments"]
        assert np.array_equal(a.segments[-1].codes, b.segments[-1].codes)  # the same image


def test_layout_arms_differ_only_in_the_layout(ran):
    """The layout experiment's two arms: same data (one dataset stage), steps and seed; the shared-vocabulary
    arm has no adapters or generation head, and its code -> token map was read from the tokenizer's names."""
    from uvjax.data.tokenizer import image_token_name
    from uvjax.stage_log import read_stage_log
    root = ran("layout")
    cfgs, stages = {}, {}
    for arm in ("two-heads", "shared-vocab"):
        rd = root / "layout" / arm / "seed_0"
        with open(rd / "config.json") as f:
            cfgs[arm] = json.load(f)
        stages[arm] = [r["path"] for r in read_stage_log(str(rd)) if r["stage"] == "dataset"][-1]
    assert stages["two-heads"] == stages["shared-vocab"]
    a, b = cfgs["two-heads"], cfgs["shared-vocab"]
    assert a["model"]["image"]["layout"] == "two_heads" and b["model"]["image"]["layout"] == "shared_vocab"
    assert a["train"] == b["train"] and a["data"] == b["data"]
    ids = b["model"]["image"]["code_token_ids"]
    assert len(ids) == b["model"]["image"]["num_codes"] == 64
    import ml_collections as mlc
    from uvjax.training.workdir import load_text_tokenizer
    tok = load_text_tokenizer(mlc.ConfigDict(b), str(root / "layout" / "shared-vocab" / "seed_0"))
    assert [tok.tok.id_to_token(i) for i in ids[:3]] == [image_token_name(c) for c in range(3)]


def test_the_layout_switch_of_every_experiment(tmp_path):
    """``--config.layout=shared_vocab`` turns any experiment's arms into the shared-vocabulary layout (their
    data and overrides unchanged; a LoRA preset trains the code rows instead of the adapters), and the
    layout joins the arm's key so a work dir never mixes the two. (That such a config trains and evaluates
    through the driver: the layout experiment's shared-vocab arm above.)"""
    from uvjax.config import ADAPTER_PATTERN, validate
    from uvjax.experiments.arms import arm_config, arm_key
    ec, exp = _quick("reasoning")
    arm = exp.arms(ec)[0]
    two = arm_config(ec, arm, 0, str(tmp_path / "w"))
    key_two = arm_key(ec, arm)
    with ec.unlocked():
        ec.layout = "shared_vocab"
    shared = arm_config(ec, arm, 0, str(tmp_path / "w"))
    validate(shared)
    assert two.model.image.layout == "two_heads" and shared.model.image.layout == "shared_vocab"
    assert shared.model.vocab_size >= shared.stages.tokenizer.vocab_size + shared.model.image.num_codes
    assert shared.data == two.data and shared.stages.reasoning == two.stages.reasoning
    assert arm_key(ec, arm) != key_two
    with ec.unlocked():
        ec.base = "vqvq.py:smollm2"  # a LoRA preset: the code rows train in place of the adapters
    lora = arm_config(ec, arm, 0, str(tmp_path / "w"))
    assert ADAPTER_PATTERN not in lora.train.trainable and "params/(embed|lm_head)/.*" in lora.train.trainable
    with ec.unlocked():
        ec.layout = "three_heads"
    with pytest.raises(ValueError, match="layout='three_heads'"):
        arm_config(ec, arm, 0, str(tmp_path / "w"))


def test_smollm2_gpu_preset_builds_the_documented_runs(tmp_path):
    """``mutual_benefit.py:smollm2_gpu`` (docs/RESULTS.md §1d) is the smollm2 + LoRA model in bf16 with cuDNN
    attention at batch 32 and 2,000 unified steps, the single-task arms dropping the other stream. Checked on
    the arm configs the driver builds, not on the preset file's text."""
    from uvjax.config import load_config_file
    from uvjax.experiments.arms import arm_config
    ec = load_config_file("experiments/mutual_benefit", "smollm2_gpu")
    arms = {a.name: a for a in importlib.import_module("uvjax.experiments.mutual_benefit").arms(ec)}
    assert sorted(arms) == ["vqvq-generation", "vqvq-understanding", "vqvq-understanding-steps", "vqvq-unified"]
    uni = arm_config(ec, arms["vqvq-unified"], 0, str(tmp_path / "mb"))
    assert (uni.model.layers, uni.model.hidden, uni.model.lora.rank) == (30, 576, 16)
    assert uni.model.pretrained.kind == "gguf" and uni.model.param_dtype == "float32"
    assert (uni.model.dtype, uni.model.attention) == ("bfloat16", "cudnn")
    assert (uni.train.steps, uni.train.batch_size, uni.train.seq_len, uni.optim.warmup_steps) == (2000, 32, 192, 100)
    gen = arm_config(ec, arms["vqvq-generation"], 2, str(tmp_path / "mb"), steps=656)
    assert gen.data.streams.understanding.weight == 0.0 and gen.data.streams.generation.weight > 0
    assert (gen.train.seed, gen.train.steps, gen.model.dtype) == (2, 656, "bfloat16")
    assert (ec.eval.num_images, tuple(ec.seeds)) == (200, (0, 1, 2))
