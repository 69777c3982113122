"""The lmms-eval plugin: lmms-eval's own evaluator, run on the local Smart Watch task with ``--model uvjax``, gives
the strict VQA accuracy that uvjax's metric gives on ``run.answer_batch``'s answers to the same questions.

lmms-eval runs in subprocesses (its command line, offline): it imports HF ``datasets``, which the test helpers'
``tests/datasets.py`` shadows inside pytest, and its import-time environment fixes belong to the plugin's launcher.
"""
import glob
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("lmms_eval")

from helpers import tiny_vq_run  # noqa: E402  (the smoke LM, 2 steps, + a random-init 32 px VQ)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "uvjax_smartwatch_vqa"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_vq_run(str(tmp_path_factory.mktemp("lmms")))


def _env(tmp) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device is enough (the suite's conftest asks for 8)
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               HF_HOME=os.path.join(tmp, "hf"), HF_DATASETS_CACHE=os.path.join(tmp, "hf", "datasets"),
               JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def reference_turns(num_images: int, size: int = 32):
    """Every VQA turn of the first ``num_images`` Smart Watch test images (split seed 0 from index 10**9, as
    ``uvjax.evaluate`` uses for this config), read straight off the records: (pixels, question, attribute,
    truth)."""
    from uvjax.data import smartwatch as sw
    out = []
    for r in sw.generate(sw.SmartWatchSpec("test", 0, num_images, 10**9, size)):
        if r.task != "vqa":
            continue
        pixels = r.segments[0].pixels
        texts = [s for s in r.segments if s.kind == "text"]
        for k, (q, a) in enumerate(zip(texts[0::2], texts[1::2])):
            assert q.role == "user" and a.role == "assistant"
            out.append((pixels, q.text, r.attributes["questions"][k], a.text))
    return out


def _load_utils(task_dir):
    spec = importlib.util.spec_from_file_location("written_task_utils", os.path.join(task_dir, "utils.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ unit
def test_importing_the_plugin_module_does_not_import_lmms_eval(tmp_path):
    code = ("import sys, uvjax, uvjax.integrations, uvjax.integrations.lmms_eval, uvjax.integrations.geneval; "
            "bad = [m for m in ('lmms_eval', 'torch', 'transformers', 'datasets') if m in sys.modules]; "
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(str(tmp_path)), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_generation_kwargs_and_stop_strings():
    from uvjax.integrations.lmms_eval import _options, _stop_at
    assert _options({"until": ["\n\n"], "max_new_tokens": 16, "temperature": 0, "do_sample": False}, 64) == (16, 0.0, ("\n\n",))
    assert _options({"temperature": 0.7, "do_sample": False}, 64) == (64, 0.0, ())  # greedy: HF's do_sample meaning
    assert _options({"temperature": 0.7, "until": "ASSISTANT:"}, 32) == (32, 0.7, ("ASSISTANT:",))
    assert _options(None, 8) == (8, 0.0, ())
    with pytest.raises(ValueError, match="until"):
        _options({"until": 3}, 8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _options({"max_new_tokens": 0}, 8)
    assert _stop_at("sunny\n\nUSER: more", ["\n\n"]) == "sunny"
    assert _stop_at("a.b;c", [";", "."]) == "a"  # the earliest stop wins, whatever the list order
    assert _stop_at("sunny", ["", "x"]) == "sunny"


# ------------------------------------------------------------------------------------------------ end to end
def test_lmms_eval_strict_accuracy_equals_uvjax_metric(tiny_run, tmp_path):
    import time

    import pyarrow.parquet as pq

    from uvjax.evaluation.metrics import score_answer
    t0 = time.time()
    env, task_dir, out_dir = _env(str(tmp_path)), str(tmp_path / "task"), str(tmp_path / "out")
    w = subprocess.run([sys.executable, "-m", "uvjax.integrations.lmms_eval", "write-task", f"--workdir={tiny_run}",
                        f"--out={task_dir}", "--num_images=8"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert w.returncode == 0, w.stderr[-3000:]
    from uvjax.integrations.lmms_eval import utils_source
    with open(os.path.join(task_dir, "utils.py")) as f:
        assert f.read() == utils_source(TASK)  # scored in the test below
    ref = reference_turns(8)
    n = len(ref)
    assert n >= 8 and n % 2 == 0  # 8 images of this split ask 14 questions: two batches of 7 below
    B, seed, mnt, stop = n // 2, 3, 12, "e"
    # lmms-eval's command line, offline, with sampling on so that every answer is a distinct string: the answers
    # must match row for row (seed + batch index, batch size, max_new_tokens and the stop string all reach uvjax)
    cmd = [sys.executable, "-m", "uvjax.integrations.lmms_eval", "--model", "uvjax",
           "--model_args", f"path={tiny_run},seed={seed}", "--tasks", TASK, "--include_path", task_dir,
           "--batch_size", str(B), "--output_path", out_dir, "--log_samples", "--verbosity", "WARNING",
           "--gen_kwargs", f"temperature=1.0,do_sample=true,until={stop},max_new_tokens={mnt}"]
    # the reference, first (its XLA programs land in the shared compilation cache, so lmms-eval's process reuses
    # them): the task's documents are the records' VQA turns, images PNG-exact; run.answer_batch answers them
    table = pq.read_table(os.path.join(task_dir, "data", "test.parquet")).to_pylist()
    assert [(d["question"], d["attribute"], d["answer"]) for d in table] == [r[1:] for r in ref]
    for d, r in zip(table, ref):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(d["image"]["bytes"])).convert("RGB")), r[0])
    np.save(tmp_path / "pixels.npy", np.stack([r[0] for r in ref]))
    script = ("import json, sys, numpy as np, uvjax; run = uvjax.load(sys.argv[1]); "
              "q = json.loads(sys.argv[3]); a = run.answer_batch(list(np.load(sys.argv[2])), q, "
              f"max_new_tokens={mnt}, temperature=1.0, seed={seed}, batch_size={B}); print(json.dumps(a))")
    r = subprocess.run([sys.executable, "-c", script, tiny_run, str(tmp_path / "pixels.npy"),
                        json.dumps([r[1] for r in ref])], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    t_ref = time.time()
    answers = [a.split(stop)[0] for a in json.loads(r.stdout.strip().splitlines()[-1])]
    strict = [score_answer(att, a, truth)["strict"] for (_, _, att, truth), a in zip(ref, answers)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    log = proc.stdout
    assert proc.returncode == 0, log[-4000:]
    with open(glob.glob(os.path.join(out_dir, "*", "*_results.json"))[0]) as f:
        results = json.load(f)["results"][TASK]
    with open(glob.glob(os.path.join(out_dir, "*", f"*_samples_{TASK}.jsonl"))[0]) as f:
        samples = [json.loads(x) for x in f]
    got = {s["doc_id"]: s["filtered_resps"] for s in samples}
    got = [g[0] if isinstance(g, list) else g for g in (got[i] for i in range(n))]
    assert got == answers
    assert len(set(answers)) > n // 2, answers  # sampled answers differ: the row-for-row match is informative
    assert results["strict_accuracy,none"] == pytest.approx(float(np.mean(strict)), abs=1e-12)
    for att in ("weather", "time", "battery", "weather_pos", "battery_pos"):
        mine = [s for (_, _, a, _), s in zip(ref, strict) if a == att]
        v = results[f"strict_{att},none"]
        assert (math.isnan(v) if not mine else v == pytest.approx(float(np.mean(mine)), abs=1e-12)), (att, v, mine)
    print(f"lmms-eval end to end: {time.time() - t0:.1f} s (write-task + reference {t_ref - t0:.1f} s, lmms-eval "
          f"{time.time() - t_ref:.1f} s), {n} questions, strict {np.mean(strict):.3f}")


def test_written_utils_score_like_uvjax(tmp_path):
    """The task's process_results (standalone: uvjax's normalize copied in) against uvjax's strict rule on
    hand-written answers, including the matches the untrained model never produces."""
    from uvjax.evaluation.metrics import score_answer
    from uvjax.integrations.lmms_eval import utils_source
    (tmp_path / "utils.py").write_text(utils_source(TASK))
    u = _load_utils(str(tmp_path))
    cases = [("weather", "Sunny.", "sunny"), ("weather", "it is sunny", "sunny"), ("time", " 10:15 ", "10:15"),
             ("time", "10:16", "10:15"), ("battery", "45%", "45%"), ("battery", "45 %", "45%"),
             ("weather_pos", "Top-Left!", "top-left"), ("battery_pos", "bottom right", "bottom-right"),
             ("battery", "", "7%")]
    for att, pred, truth in cases:
        res = u.process_results({"attribute": att, "answer": truth}, [pred])
        assert res["strict_accuracy"] == score_answer(att, pred, truth)["strict"], (att, pred, truth)
        assert res[f"strict_{att}"] == res["strict_accuracy"]
        assert all(v is None for k, v in res.items() if k not in ("strict_accuracy", f"strict_{att}"))
    assert sum(u.process_results({"attribute": a, "answer": t}, [p])["strict_accuracy"] for a, p, t in cases) == 4
    assert u.mean_of_asked([None, 1.0, 0.0, None, 1.0]) == pytest.approx(2 / 3)
    assert math.isnan(u.mean_of_asked([None, None]))
    img = Image.new("L", (4, 4))
    assert u.doc_to_visual({"image": img})[0].mode == "RGB"
    assert u.doc_to_text({"question": "Q?"}, {"pre_prompt": "<", "post_prompt": ">"}) == "<Q?>"


def test_write_task_errors_name_the_problem(tmp_path):
    from uvjax.integrations.lmms_eval import write_task
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_task(str(tmp_path / "nothing"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="task_name"):
        write_task(str(tmp_path), str(tmp_path / "out"), task_name="bad name!")


FAKE_RUN_SCRIPT = r'''
import json
from uvjax.integrations.torch_compat import make_torchvision_importable
make_torchvision_importable()
# no register(): the class comes through the lmms_eval.models entry point alone
from lmms_eval.api.model import lmms
from lmms_eval.models import get_model, list_available_models
cls = get_model("uvjax")
resolved = {"listed": "uvjax" in list_available_models(), "path": cls.__module__ + "." + cls.__name__,
            "lmms": issubclass(cls, lmms) and cls.is_simple}

class FakeRun:
    """Records what reaches the API; answers name the question and the seed."""
    def __init__(self):
        self.calls = []
    def answer_batch(self, images, questions, *, max_new_tokens, temperature, seed, batch_size):
        self.calls.append(["answer_batch", list(questions), max_new_tokens, temperature, seed, batch_size,
                           [im.size for im in images]])
        return [f"{q}|s{seed}\n\nrest" for q in questions]
    def chat(self, prompt, *, max_new_tokens, max_images, temperature, seed):
        self.calls.append(["chat", prompt, max_new_tokens, max_images, temperature, seed])
        return [f"{prompt}|chat"]

class Req:
    def __init__(self, *args):
        self.args = args

from PIL import Image
docs = [{"q": f"q{i}", "img": i != 4, "n": 2 if i == 9 else 1} for i in range(10)]
def visual(doc):
    return [Image.new("RGB", (8 + i, 8)) for i in range(doc["n"])] if doc["img"] else []
m = cls.__new__(cls)
m._rank, m._world_size, m.seed, m.batch_size, m.max_new_tokens, m._warned = 0, 1, 10, 2, 64, set()
from lmms_eval.api.model import CacheHook
m.cache_hook = CacheHook(None)
m.task_dict = {"t": {"test": docs}}
m.run = FakeRun()
greedy = {"until": ["\n\n"], "max_new_tokens": 7, "do_sample": False, "temperature": 0.5}
sampled = {"until": "|", "max_new_tokens": 5, "temperature": 0.9, "num_beams": 3}
# handed over out of document order, two kwargs groups interleaved
order = [3, 0, 2, 1, 4, 6, 5, 7]
reqs = [Req("<image>\n" + docs[i]["q"], dict(greedy if i < 5 else sampled), visual, i, "t", "test") for i in order]
out = m.generate_until(reqs)
try:
    m.generate_until([Req("q9", dict(greedy), visual, 9, "t", "test")])
    err = None
except ValueError as e:
    err = str(e)
print(json.dumps({"out": out, "calls": m.run.calls, "err": err, "resolved": resolved}))
'''


@pytest.fixture(scope="module")
def fake_run_result(tmp_path_factory):
    """FAKE_RUN_SCRIPT in a subprocess where uvjax's ``lmms_eval.models`` entry point (the one proposed for
    setup.py: ``uvjax = uvjax.integrations:lmms_eval_models``) is installed as a bare dist-info on the path."""
    tmp = tmp_path_factory.mktemp("fake_run")
    dist = tmp / "site" / "uvjax_entry_point_probe-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: uvjax-entry-point-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\nuvjax = uvjax.integrations:lmms_eval_models\n")
    env = _env(str(tmp))
    env["PYTHONPATH"] = str(tmp / "site") + os.pathsep + env["PYTHONPATH"]
    p = subprocess.run([sys.executable, "-c", FAKE_RUN_SCRIPT], cwd=str(tmp), env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_entry_point_makes_the_model_known_to_lmms_eval(fake_run_result):
    assert fake_run_result["resolved"] == {"listed": True, "path": "uvjax.integrations.lmms_eval.UvjaxLMM",
                                           "lmms": True}


def test_generate_until_batches_in_document_order_and_honours_kwargs(fake_run_result):
    """The plugin class with a stand-in for the API (no model): requests handed over out of order come back in
    that order, answered per kwargs group in document order, chunk k with seed + k; max_new_tokens, temperature
    (do_sample=false: greedy) and the stop strings are applied; an image-less request goes to run.chat; two
    images are refused."""
    res = fake_run_result
    assert res["calls"] == [
        ["answer_batch", ["q0", "q1"], 7, 0.0, 10, 2, [[8, 8], [8, 8]]],
        ["answer_batch", ["q2", "q3"], 7, 0.0, 11, 2, [[8, 8], [8, 8]]],
        ["chat", "q4", 7, 0, 0.0, 12],  # doc 4 has no image: alone in chunk 2 of the greedy group
        ["answer_batch", ["q5", "q6"], 5, 0.9, 10, 2, [[8, 8], [8, 8]]],
        ["answer_batch", ["q7"], 5, 0.9, 11, 2, [[8, 8]]],
    ]
    assert res["out"] == ["q3|s11", "q0|s10", "q2|s11", "q1|s10", "q4|chat", "q6", "q5", "q7"]
    assert "2 visuals" in res["err"] and "doc 9" in res["err"]
