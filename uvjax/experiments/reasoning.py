"""Reasoning in generation data (UnifiedVisual, 2509.14738): do rationales in the generation data help?

Both arms train on the Smart Watch understanding and generation data plus procedural UnifiedVisual-style
reasoning records (``stages.reasoning``, ``uvjax/data/reasoning.py``; by default ``gen_reasoning``: an
indirect prompt such as "two hours after 10:15" or "the weather that needs an umbrella" → rationale →
the watch), in the interleaved stream:

- ``rationale``: the records with their rationales, ``train.steps`` steps;
- ``no-rationale``: the same prompts and images without the rationale text (the ablation), as many
  reasoning examples as the rationale arm.

Metrics: judge generation accuracy on **indirect prompts** of a held-out set (``indirect/...``: the model
may write its own rationale before the image; the judge reads the image against the attributes the prompt
implies), plain generation accuracy and VQA accuracy (``uvjax.evaluate``).

``python -m uvjax.experiments.reasoning --config=configs/experiments/reasoning.py[:quick]``
"""
from __future__ import annotations

import dataclasses

import numpy as np

from uvjax.data import reasoning as rs
from uvjax.data.records import Record
from uvjax.data.tokenizer import get_template
from uvjax.evaluation import judge as judge_mod
from uvjax.evaluation.metrics import Accumulator
from uvjax.evaluation.run import default_judge_dir
from uvjax.evaluation.vqa import Item, run_items
from uvjax.experiments.arms import Arm, Experiment, Panel
from uvjax.experiments.common import main
from uvjax.experiments.runs import load_run_and_vq
from uvjax.inference.decode import DecodeSettings, Generator, SpecialIds

JUDGE_ATTRS = {"time": ("time_hour", "time_quarter", "time_5min"), "weather": ("weather",),
               "battery": ("battery",), "positions": ("weather_pos", "battery_pos")}


def arms(ec) -> list[Arm]:
    return [Arm("rationale", (("stages.reasoning.rationale", True),), group="with rationales", x="with rationales"),
            Arm("no-rationale", (("stages.reasoning.rationale", False),), group="without rationales",
                x="without rationales", match=("interleaved", "rationale"))]


def panels(ec) -> list[Panel]:
    return [Panel("indirect/all/accuracy", "generation accuracy, indirect prompts (judge)"),
            Panel("gen/all/accuracy", "generation accuracy, plain prompts (judge)"),
            Panel("vqa/all/strict", "VQA accuracy (all, strict)")]


def judge_scores(pred: dict, labels: dict, mentioned) -> dict[str, float]:
    """Per judge attribute: 1 if the judge reads the implied value; time counts at three resolutions."""
    out = {}
    for m in mentioned:
        for a in JUDGE_ATTRS[m]:
            if a == "time_hour":
                out[a] = float(pred["hour"] == labels["hour"])
            elif a == "time_quarter":
                out[a] = float(pred["hour"] == labels["hour"] and pred["minute_q"] == labels["minute_q"])
            elif a == "time_5min":
                out[a] = float(pred["hour"] == labels["hour"] and pred["minute_5"] == labels["minute_5"])
            else:
                out[a] = float(pred[a] == labels[a])
    return out


def indirect_eval(ec, arm: Arm, run_dir: str, cfg) -> dict:
    run, codec = load_run_and_vq(run_dir, "indirect evaluation")
    size = int(cfg.stages.data.image_size)
    n_codes = int(cfg.data.image_tokens)
    spec = rs.ReasoningSpec("test", seed=int(cfg.stages.data.seed), num_scenes=int(ec.eval.indirect_prompts),
                            start_index=10 ** 9, image_size=size, rationale=True, tasks=("gen_reasoning",))
    items, targets, mentioned = [], [], []
    for r in rs.generate(spec):
        user = [s for s in r.segments if s.role == "user"]
        items.append(Item("generation", r.id, Record(r.id, "generation", user), r.attributes,
                          truth=" ".join(s.text for s in user)))
        targets.append(r.attributes["images"][-1]["attributes"])
        mentioned.append(tuple(r.attributes["mentioned"]))
    max_text = int(ec.eval.indirect_max_text)
    settings = DecodeSettings(max_new_tokens=max_text + n_codes + 2, image_tokens=n_codes, max_images=1,
                              force_image_within=max_text, image_temperature=1.0)
    gen = Generator(run.model, run.variables, SpecialIds.from_tokenizer(run.tokenizer))
    template = get_template(cfg.data.get("template", "vicuna_v1"), cfg.data.get("system_prompt"))
    res = run_items(gen, run.tokenizer, template, items, settings, batch_size=int(ec.eval.batch_size),
                    seed=int(ec.eval.get("sample_seed", 0)))
    made = [i for i, r in enumerate(res) if r["images"] and len(r["images"][0]) == n_codes]
    jdir = default_judge_dir(run_dir, cfg, str(ec.eval.judge_preset), size)
    jd = judge_mod.load_or_train(jdir, dataclasses.replace(judge_mod.PRESETS[str(ec.eval.judge_preset)], image_size=size))
    labels = judge_mod.labels_array(targets)
    pred = jd.predict(np.asarray(codec.decode(np.stack([res[i]["images"][0] for i in made])))) if made else {}
    acc = Accumulator()
    pos = {i: k for k, i in enumerate(made)}
    for i in range(len(items)):
        lab = {k: int(v[i]) for k, v in labels.items()}
        if i in pos:
            sc = judge_scores({k: int(v[pos[i]]) for k, v in pred.items()}, lab, mentioned[i])
        else:  # no image: every implied attribute is wrong
            sc = {a: 0.0 for m in mentioned[i] for a in JUDGE_ATTRS[m]}
        for a, v in sc.items():
            acc.add(a, {"accuracy": v})
    out = {f"indirect/{a}/accuracy": d["accuracy"] for a, d in acc.result().items()}
    out["indirect/images_generated"] = len(made) / max(1, len(items))
    out["indirect/text_chars"] = float(np.mean([len(r["text"]) for r in res])) if res else 0.0
    return out


EXPERIMENT = Experiment("reasoning", arms, panels, "generation data", extra=indirect_eval,
                        description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    main(EXPERIMENT)
