"""What the Smart Watch stages fingerprint and render: ``stages.data`` as hashed, the train split's spec and
the reasoning records' spec (shared by the VQ-code and the feature pipelines)."""
from __future__ import annotations

import dataclasses

from uvjax.data import reasoning as rs
from uvjax.data import smartwatch as sw


def data_fp_parts(sc, *, for_tokenizer: bool = False) -> dict:
    """``stages.data`` as fingerprinted. Options at their defaults are left out, so adding an option never
    changes existing fingerprints; ``understanding_keep`` does not change the tokenizer's corpus."""
    d = dict(sc.data)
    keep = d.pop("understanding_keep", ())
    if keep and not for_tokenizer:
        d["understanding_keep"] = [list(kv) for kv in keep]
    if not d.get("generation_mention_all", 0.0):
        d.pop("generation_mention_all", None)
    else:  # True and 1.0 are the same data
        d["generation_mention_all"] = float(d["generation_mention_all"])
    if not d.get("generation_plan", False):
        d.pop("generation_plan", None)
    else:
        d["generation_plan"] = True
    return d


def reasoning_enabled(sc) -> bool:
    r = sc.get("reasoning")
    return r is not None and int(r.get("num_scenes", 0)) > 0


def train_split_spec(sc):
    """The Smart Watch train split of ``stages.data`` (with ``understanding_keep`` applied)."""
    d = sc.data
    spec = sw.default_splits(seed=int(d.seed), num_train=int(d.num_train), num_test=int(d.num_test),
                             image_size=int(d.image_size))["train"]
    keep = tuple(sorted((str(k), float(r)) for k, r in (d.get("understanding_keep") or ())))
    return dataclasses.replace(spec, understanding_keep=keep, time_seconds=bool(d.time_seconds),
                               generation_mention_all=float(d.get("generation_mention_all", 0.0)),
                               generation_plan=bool(d.get("generation_plan", False)))


def _reasoning_spec(sc, image_size: int | None = None):
    r = sc.reasoning
    return rs.ReasoningSpec("train", seed=int(sc.data.seed), num_scenes=int(r.num_scenes),
                            image_size=int(image_size or sc.data.image_size), rationale=bool(r.rationale),
                            tasks=tuple(r.tasks))


def _reasoning_tokenizer_parts(sc) -> tuple:
    """Extra tokenizer fingerprint parts when reasoning records are on (none otherwise, so the other
    configs keep their fingerprints); the rationale switch does not change the corpus."""
    if not reasoning_enabled(sc):
        return ()
    return (["reasoning", int(sc.reasoning.num_scenes), list(sc.reasoning.tasks)],)
