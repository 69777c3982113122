"""lmms-eval (0.7.3) plugin: ``--model uvjax`` evaluates a uvjax run or export on lmms-eval tasks, and
``write-task`` turns a run's Smart Watch test split into a local lmms-eval task.

Evaluate (a run directory or an export directory; ``--batch_size`` = questions per decoding call)::

    python -m uvjax.integrations.lmms_eval --model uvjax --model_args path=runs/vqvq-tiny \\
        --tasks uvjax_smartwatch_vqa --include_path task_dir --batch_size 16 --output_path out
    lmms-eval --model uvjax ...          # the same, once uvjax's ``lmms_eval.models`` entry point is installed

``python -m uvjax.integrations.lmms_eval ARGS`` is lmms-eval's own command line with the model registered (no
entry point needed) and two import problems of this environment worked around before lmms-eval starts: a
CUDA-built torchvision next to a CPU torch (:func:`make_torchvision_importable`) and filelock 4, which lacks the
``filelock._api`` module lmms-eval 0.7.3 patches (:func:`make_filelock_api_importable`). It exits non-zero when
an evaluation fails (lmms-eval's own command line logs the error and exits 0).

Model args: ``path`` (required), ``step`` (default: latest), ``seed`` (sampling seed, default 0),
``max_new_tokens`` (used when a task gives none, default 64). Generation kwargs of a task: ``max_new_tokens``,
``temperature`` (> 0 samples unless ``do_sample`` is false), ``until`` (the answer is cut at the first stop string;
decoding is causal, so this equals stopping there). Each request is one image + one question
(``run.answer_batch``); a request without an image is answered by ``run.chat``. Requests are answered in document
order, ``--batch_size`` per decoding call, batch k sampled with ``seed + k``: the answers are those of
``run.answer_batch(images, questions, batch_size=B, seed=seed)`` over the task's documents. ``loglikelihood`` (multiple-choice
tasks) and multi-round generation are not served: they raise ``NotImplementedError`` naming the task type.

Local task (offline: the yaml names an absolute parquet file that ``datasets.load_dataset("parquet")`` reads)::

    python -m uvjax.integrations.lmms_eval write-task --workdir=RUN --out=DIR [--num_images=N]

writes ``DIR/<task>.yaml``, ``DIR/utils.py`` and ``DIR/data/test.parquet``: one document per VQA turn of the run's
Smart Watch test split (the split ``uvjax.evaluate`` scores), each turn asked alone with its image; the metric
is uvjax's strict VQA accuracy (``uvjax.evaluation.metrics``: normalised answer = normalised truth), overall and
per attribute. ``uvjax.evaluate`` gives later turns of a conversation the earlier turns as context; a harness
document is one question, so scores of turns after the first can differ from ``uvjax.evaluate``'s.

Over ~400 lines on purpose: one plugin (the lmms-eval model class, its task and its command), loaded by
lmms-eval by module path.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import os
import sys
from collections.abc import Sequence

from PIL import Image
from tqdm import tqdm

import uvjax
from uvjax import storage_paths as sp
from uvjax.api import image_size_of
from uvjax.data import smartwatch as sw
from uvjax.evaluation import metrics
from uvjax.evaluation.run import test_spec
from uvjax.evaluation.vqa import build_items
from uvjax.inference.decode import find_vq
from uvjax.inference.loading import load_config
from uvjax.integrations import LMMS_EVAL_MODEL, lmms_eval_models
from uvjax.integrations.torch_compat import make_filelock_api_importable, make_torchvision_importable

TASK_NAME = "uvjax_smartwatch_vqa"
VQA_MAX_NEW_TOKENS = 16  # uvjax.evaluate's VQA budget
DEFAULT_UNTIL = ("\n\n",)  # lmms-eval's default stop (its fewshot delimiter), written out explicitly


def register() -> None:
    """Makes ``--model uvjax`` known to lmms-eval in this process (what the entry point does on install): the
    manifest goes into lmms-eval's model registry, the class into its legacy ``register_model`` table."""
    make_torchvision_importable()
    make_filelock_api_importable()
    from lmms_eval.models import AVAILABLE_MODELS, MODEL_REGISTRY_V2
    for m in lmms_eval_models():
        MODEL_REGISTRY_V2.register_manifest(m, overwrite=True)
        AVAILABLE_MODELS[m.model_id] = m.simple_class_path.rsplit(".", 1)[-1]
    _model_class()


# ================================================================================ the model
def _stop_at(text: str, until: Sequence[str]) -> str:
    """``text`` cut before the earliest occurrence of any stop string (empty strings ignored)."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def _options(gen_kwargs: dict | None, default_max_new_tokens: int) -> tuple[int, float, tuple[str, ...]]:
    """(max_new_tokens, temperature, until) from a request's generation kwargs, with clear errors."""
    g = dict(gen_kwargs or {})
    until = g.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"generation kwarg 'until': expected a string or a list of strings, got {until!r}")
    mnt = g.get("max_new_tokens", default_max_new_tokens)
    try:
        mnt = int(mnt)
    except (TypeError, ValueError):
        raise ValueError(f"generation kwarg 'max_new_tokens': expected an integer, got {mnt!r}") from None
    if mnt < 1:
        raise ValueError(f"generation kwarg 'max_new_tokens': expected >= 1, got {mnt}")
    temp = float(g.get("temperature", 0.0) or 0.0)
    if g.get("do_sample") is False:
        temp = 0.0  # transformers' meaning: do_sample false = greedy whatever the temperature
    return mnt, temp, tuple(until)


_UNSERVED_KWARGS = {"num_beams": 1, "top_p": 1.0, "top_k": 0}


def _model_class():
    """Builds (once) the ``lmms`` subclass; kept out of module import so that ``write-task`` and ``import
    uvjax.integrations.lmms_eval`` do not import lmms-eval (torch, transformers, accelerate)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    make_torchvision_importable()
    make_filelock_api_importable()  # lmms-eval resolves the model before it loads task data: in time for its patch
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model

    class UvjaxLMM(lmms):
        """A uvjax run (``path`` = run or export directory) as an lmms-eval model."""
        is_simple = True

        def __init__(self, path: str | None = None, step: int | None = None, seed: int = 0,
                     max_new_tokens: int = 64, batch_size=16, max_batch_size=None, device=None, **unknown):
            super().__init__()
            if unknown:
                raise ValueError(f"--model_args for uvjax: unknown {sorted(unknown)}; expected path=RUN_OR_EXPORT_DIR"
                                 ", step=N, seed=N, max_new_tokens=N (batch size: lmms-eval's --batch_size)")
            if not path:
                raise ValueError("--model_args for uvjax: path=RUN_OR_EXPORT_DIR is required")
            if device not in (None, "", "cpu") and not str(device).startswith(("cuda", "gpu", "tpu")):
                raise ValueError(f"--device {device!r}: uvjax runs on JAX's default device; leave --device out")
            self.run = uvjax.load(str(path), step=None if step in (None, "") else int(step))
            self.seed = int(seed)
            self.max_new_tokens = int(max_new_tokens)
            bs = str(batch_size).strip().lower()
            self.batch_size = 16 if bs.startswith("auto") else int(bs)
            if self.batch_size < 1:
                raise ValueError(f"--batch_size: expected >= 1, got {batch_size!r}")
            self._warned: set[str] = set()

        def _warn_once(self, key: str, msg: str) -> None:
            if key not in self._warned:
                self._warned.add(key)
                from loguru import logger
                logger.warning(msg)

        def _visuals(self, req):
            doc_to_visual, doc_id, task, split = req.args[2:6]
            v = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
            v = [] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v])
            if len(v) == 1 and isinstance(v[0], (list, tuple)):
                v = list(v[0])
            if len(v) > 1:
                raise ValueError(f"task {task!r} doc {doc_id}: {len(v)} visuals; a uvjax request answers about one "
                                 "image (or none)")
            if v and isinstance(v[0], dict):
                raise ValueError(f"task {task!r} doc {doc_id}: audio/video visuals ({sorted(v[0])}) are not "
                                 "supported; uvjax reads one image")
            return v[0] if v else None

        def generate_until(self, requests) -> list[str]:
            groups: dict[tuple, list[int]] = {}
            for i, req in enumerate(requests):
                gk = req.args[1] or {}
                for k, neutral in _UNSERVED_KWARGS.items():
                    if k in gk and gk[k] not in (None, neutral):
                        self._warn_once(k, f"uvjax: generation kwarg {k}={gk[k]!r} is not supported and is ignored")
                groups.setdefault(_options(gk, self.max_new_tokens), []).append(i)
            out: list[str | None] = [None] * len(requests)
            bar = tqdm(total=len(requests), desc="uvjax answering", disable=self.rank != 0)
            for (mnt, temp, until), idx in groups.items():
                # documents in their task order (lmms-eval hands requests over in an order of its own): chunk k of
                # B documents is answer_batch's batch k (seed + k), so a sampled answer depends on the document
                # order and --batch_size only, as it would in answer_batch
                idx = sorted(idx, key=lambda i: (str(requests[i].args[4]), str(requests[i].args[5]),
                                                 int(requests[i].args[3])))
                for k, start in enumerate(range(0, len(idx), self.batch_size)):
                    rows = idx[start:start + self.batch_size]
                    texts = [requests[i].args[0].replace("<image>", "").strip() for i in rows]
                    images = [self._visuals(requests[i]) for i in rows]
                    with_image = [j for j, im in enumerate(images) if im is not None]
                    answers: dict[int, str] = {}
                    if with_image:
                        got = self.run.answer_batch([images[j] for j in with_image], [texts[j] for j in with_image],
                                                    max_new_tokens=mnt, temperature=temp, seed=self.seed + k,
                                                    batch_size=self.batch_size)
                        answers.update(zip(with_image, got))
                    for j in (j for j in range(len(rows)) if images[j] is None):
                        parts = self.run.chat(texts[j], max_new_tokens=mnt, max_images=0, temperature=temp,
                                              seed=self.seed + k)
                        answers[j] = " ".join(p for p in parts if isinstance(p, str))
                    for j, i in enumerate(rows):
                        text = _stop_at(answers[j], until)
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
                    bar.update(len(rows))
            bar.close()
            return out  # type: ignore[return-value]

        def loglikelihood(self, requests):
            raise NotImplementedError(
                "uvjax's lmms-eval model serves generation tasks (output_type: generate_until); this task asks for "
                "log-likelihoods (loglikelihood / multiple_choice), which it does not compute. Use a generate_until "
                "variant of the task")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError(
                "uvjax's lmms-eval model serves single-round generation (output_type: generate_until); "
                "generate_until_multi_round tasks are not supported")

    register_model(LMMS_EVAL_MODEL)(UvjaxLMM)
    UvjaxLMM.__module__ = __name__
    UvjaxLMM.__qualname__ = "UvjaxLMM"
    _CLASS = UvjaxLMM
    return _CLASS


_CLASS = None


def __getattr__(name: str):
    """``UvjaxLMM`` is built on first access (lmms-eval's registry resolves it by attribute)."""
    if name == "UvjaxLMM":
        return _model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ================================================================================ the local task
def smartwatch_vqa_docs(workdir: str, num_images: int | None = None, image_size: int | None = None):
    """The task's documents: every VQA turn of the run's Smart Watch test split (the split ``uvjax.evaluate``
    builds: :func:`uvjax.evaluation.run.test_spec`, at the run's image size), as dicts with the image (uint8 array),
    the turn's question, its ground-truth answer and attribute. Reads only the run's config (no weights)."""
    wd = sp.resolve(workdir)
    cfg = load_config(wd)
    if image_size is None:
        vq_path, _ = find_vq(wd, cfg)
        image_size = image_size_of(wd, cfg, vq_path)
    spec = test_spec(cfg, num_images, int(image_size))
    records = [r for r in sw.generate(spec) if r.task == "vqa"]
    docs = []
    for it in build_items(records):
        segs = it.prompt.segments
        image = next(s.pixels for s in segs if s.kind == "image")
        question = [s.text for s in segs if s.role == "user" and s.kind == "text"][-1]
        turn = it.prompt.id.rsplit("/", 1)[1]
        docs.append({"id": it.prompt.id, "image_index": int(it.attrs["index"]), "turn": int(turn),
                     "attribute": it.attribute, "question": question, "answer": it.truth, "image": image})
    return docs, spec


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


_UTILS_HEAD = '''"""lmms-eval functions of the {task} task, written by ``python -m uvjax.integrations.lmms_eval write-task``.

Strict VQA accuracy is uvjax's rule (``uvjax/evaluation/metrics.py``: lower case, whitespace collapsed, trailing
``.!,`` dropped, then equality); ``normalize`` below is its source, copied at write time so the task runs without
uvjax installed (any lmms-eval model can be scored on it). Per-attribute scores average the documents that ask
about that attribute.
"""
import math

ATTRIBUTES = {attributes!r}


'''

_UTILS_TAIL = '''

def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def strict_score(prediction, truth):
    return float(normalize(prediction) == normalize(truth))


def process_results(doc, results):
    score = strict_score(results[0] if results else "", doc["answer"])
    out = {"strict_accuracy": score}
    for a in ATTRIBUTES:
        out[f"strict_{a}"] = score if doc["attribute"] == a else None
    return out


def mean_of_asked(items):
    """Mean over the documents that asked about the attribute (None marks the others); NaN when none did."""
    vals = [x for x in items if x is not None]
    return sum(vals) / len(vals) if vals else math.nan
'''


def utils_source(task_name: str = TASK_NAME) -> str:
    """The task's ``utils.py``: doc_to_visual / doc_to_text / process_results, with uvjax's ``normalize``."""
    return (_UTILS_HEAD.format(task=task_name, attributes=tuple(sw.VQA_ATTRIBUTES))
            + inspect.getsource(metrics.normalize) + _UTILS_TAIL)


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def write_task(workdir: str, out: str, *, num_images: int | None = None, task_name: str = TASK_NAME,
               max_new_tokens: int = VQA_MAX_NEW_TOKENS, until: Sequence[str] = DEFAULT_UNTIL,
               image_size: int | None = None) -> dict:
    """Writes the local lmms-eval task (yaml + utils.py + data/test.parquet) into ``out``; returns a summary
    (also written as ``out/task_info.json``)."""
    if not task_name.replace("_", "").isalnum():
        raise ValueError(f"--task_name {task_name!r}: use letters, digits and underscores")
    docs, spec = smartwatch_vqa_docs(workdir, num_images, image_size)
    if not docs:
        raise ValueError(f"{workdir}: the Smart Watch test split ({spec.num_images} images) has no VQA turns")
    import datasets  # HF datasets (the lmms extra): writes the parquet with its Image feature, as lmms-eval reads it
    out = os.path.abspath(out)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    features = datasets.Features({
        "id": datasets.Value("string"), "image_index": datasets.Value("int64"), "turn": datasets.Value("int32"),
        "attribute": datasets.Value("string"), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "image": datasets.Image()})
    pngs: dict[int, bytes] = {}  # the turns of an image share its PNG bytes
    rows = {k: [] for k in features}
    for d in docs:
        for k in features:
            if k == "image":
                png = pngs.setdefault(d["image_index"], _png(d["image"]))
                rows[k].append({"bytes": png, "path": None})
            else:
                rows[k].append(d[k])
    parquet = os.path.join(out, "data", "test.parquet")
    datasets.Dataset.from_dict(rows, features=features).to_parquet(parquet)
    with open(os.path.join(out, "utils.py"), "w") as f:
        f.write(utils_source(task_name))
    metric_lines = ["  - metric: strict_accuracy\n    aggregation: mean\n    higher_is_better: true"]
    metric_lines += [f"  - metric: strict_{a}\n    aggregation: !function utils.mean_of_asked\n    higher_is_better: true"
                     for a in sw.VQA_ATTRIBUTES]
    yaml_text = "\n".join([
        f"# written by python -m uvjax.integrations.lmms_eval write-task --workdir={workdir}",
        f"task: {task_name}",
        "dataset_path: parquet",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_yaml_str(parquet)}",
        "test_split: test",
        "output_type: generate_until",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text",
        "doc_to_target: answer",
        "generation_kwargs:",
        f"  max_new_tokens: {int(max_new_tokens)}",
        "  temperature: 0.0",
        "  do_sample: false",
        "  until: [" + ", ".join(_yaml_str(u) for u in until) + "]",
        "process_results: !function utils.process_results",
        "metric_list:",
        *metric_lines,
        "lmms_eval_specific_kwargs:",
        "  default:",
        '    pre_prompt: ""',
        '    post_prompt: ""',
        "metadata:",
        "  version: 1.0",
        ""])
    with open(os.path.join(out, f"{task_name}.yaml"), "w") as f:
        f.write(yaml_text)
    counts: dict[str, int] = {}
    for d in docs:
        counts[d["attribute"]] = counts.get(d["attribute"], 0) + 1
    info = {"task": task_name, "workdir": workdir, "split": dataclasses.asdict(spec), "documents": len(docs),
            "images": len(pngs), "per_attribute": counts, "parquet": parquet, "max_new_tokens": int(max_new_tokens),
            "until": list(until)}
    with open(os.path.join(out, "task_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


# ================================================================================ command line
def _write_task_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m uvjax.integrations.lmms_eval write-task",
                                description="Write the run's Smart Watch test split as a local lmms-eval task")
    p.add_argument("--workdir", required=True, help="uvjax run (or export) directory")
    p.add_argument("--out", required=True, help="directory for the task (give it to lmms-eval as --include_path)")
    p.add_argument("--num_images", type=int, default=None, help="first N test images (default: the whole split)")
    p.add_argument("--task_name", default=TASK_NAME)
    p.add_argument("--max_new_tokens", type=int, default=VQA_MAX_NEW_TOKENS)
    p.add_argument("--image_size", type=int, default=None, help="default: the run's training image size")
    a = p.parse_args(argv)
    info = write_task(a.workdir, a.out, num_images=a.num_images, task_name=a.task_name,
                      max_new_tokens=a.max_new_tokens, image_size=a.image_size)
    print(json.dumps({k: info[k] for k in ("task", "documents", "images", "per_attribute", "parquet")}))
    print(f"evaluate: python -m uvjax.integrations.lmms_eval --model uvjax --model_args path={a.workdir} "
          f"--tasks {a.task_name} --include_path {os.path.abspath(a.out)} --batch_size 16")


def main(argv: list[str] | None = None) -> None:
    """``write-task ...`` writes a task; anything else is handed to lmms-eval's command line with the uvjax model
    registered."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "write-task":
        return _write_task_main(argv[1:])
    register()
    import lmms_eval.__main__ as lmms_cli
    from lmms_eval.cli.dispatch import main as lmms_main
    # lmms-eval logs a failed evaluation and exits 0; record it so that scripts and CI see a failure
    failures: list[BaseException] = []
    evaluate_one = lmms_cli.cli_evaluate_single

    def _evaluate_one(*a, **kw):
        try:
            return evaluate_one(*a, **kw)
        except Exception as e:
            failures.append(e)
            raise

    lmms_cli.cli_evaluate_single = _evaluate_one
    sys.argv = ["lmms-eval", *argv]
    try:
        lmms_main()
    finally:
        lmms_cli.cli_evaluate_single = evaluate_one
    if failures:
        raise SystemExit(f"lmms-eval: evaluation failed: {failures[0]!r} (traceback above)")


if __name__ == "__main__":  # run the imported module's main: lmms-eval resolves the class there by path
    from uvjax.integrations.lmms_eval import main as _main
    _main()
