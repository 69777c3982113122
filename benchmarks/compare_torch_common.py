"""What both sides of benchmarks/compare_torch.py share: one config spec, one set of weights, one batch, one
target mask, the decode prompts and the timing of a unit.

Both sides (``compare_torch_hf``: HF transformers + peft, ``compare_torch_uvjax``: uvjax) are built from what is
here, so their losses must agree. No jax and no torch: both workers import this module, and neither side's
framework may count in the other's peak RSS.
"""
from __future__ import annotations

import os
import time

import numpy as np

from benchmarks.train_step import CONFIGS
from uvjax.data.arrays import TEXT
from uvjax.weights.hf_llama import GLOBAL_ROLES, LAYER_ROLES, hf_shapes

PROJ_HF = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def spec_of(name: str, **over) -> dict:
    """A config spec: benchmarks/train_step.py's S/M plus kv_heads, alpha and the prompt fraction."""
    s = dict(CONFIGS[name]) if name in CONFIGS else {}
    s.update(over)
    s.setdefault("kv_heads", s["heads"])
    s.setdefault("alpha", 2.0 * s["rank"])
    return s


def model_dict(s: dict) -> dict:
    """uvjax ``config.model`` keys (the form uvjax.weights.hf_llama uses) for a spec."""
    return dict(vocab_size=s["vocab"], hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
                kv_heads=s["kv_heads"], head_dim=s["hidden"] // s["heads"], intermediate=s["intermediate"],
                tie_embeddings=False)


def make_weights(s: dict, seed: int = 0, lora_b_std: float = 0.02) -> dict:
    """HF-named fp32 numpy weights: the Llama base (norms randomised around 1 so a swapped norm would
    show) and peft-layout LoRA factors ``lora.<layer>.<proj>.A`` [r, in] / ``.B`` [out, r] (B non-zero)."""
    rng = np.random.default_rng(seed)
    m = model_dict(s)
    shapes = hf_shapes(m)
    w = {}
    for role, shp in shapes.items():
        per_layer = role in LAYER_ROLES
        for i in range(s["layers"] if per_layer else 1):
            name = f"model.layers.{i}.{LAYER_ROLES[role][1]}" if per_layer else GLOBAL_ROLES[role][1]
            if len(shp) == 1:
                w[name] = (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float32)
            else:
                w[name] = (0.02 * rng.standard_normal(shp)).astype(np.float32)
    r = s["rank"]
    for i in range(s["layers"]):
        for proj in PROJ_HF:
            out_f, in_f = shapes[proj]
            bound = 1.0 / np.sqrt(in_f)  # peft's default A init: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(in))
            w[f"lora.{i}.{proj}.A"] = rng.uniform(-bound, bound, (r, in_f)).astype(np.float32)
            w[f"lora.{i}.{proj}.B"] = (lora_b_std * rng.standard_normal((out_f, r))).astype(np.float32)
    return w


def text_batch(s: dict, seed: int = 1, prompt_fraction: float = 0.25) -> dict:
    """Text-only LM batch: every row one segment, the first ``prompt_fraction`` without targets."""
    B, T = s["batch"], s["seq"]
    n_prompt = int(T * prompt_fraction)
    rng = np.random.default_rng(seed)
    tt = np.zeros((B, T), np.int32)
    tt[:, n_prompt:] = 1
    return dict(tokens=rng.integers(2, s["vocab"], (B, T)).astype(np.int32),
                modality=np.full((B, T), TEXT, np.int32), text_target=tt,
                image_target=np.zeros((B, T), np.int32), segment_ids=np.ones((B, T), np.int32),
                positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))


def source_mask(batch: dict):
    """[B, T-1] bool: position t's logits predict a text target at t+1 (uvjax.training.loss.target_masks
    semantics: the next token is a target and in the same, non-padding segment)."""
    seg = np.asarray(batch["segment_ids"])
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (np.asarray(batch["text_target"])[:, 1:] > 0) & same


def logits_to_keep(batch: dict) -> int:
    """Smallest suffix of positions whose logits cover every text target (HF's ``logits_to_keep``)."""
    src = source_mask(batch).any(0)
    return int(batch["tokens"].shape[1] - np.argmax(src)) if src.any() else 1


def decode_prompts(s, batch, prompt, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(2, s["vocab"], (batch, prompt)).astype(np.int32)


def load_weights(path: str) -> dict:
    """The weights ``np.savez`` wrote (the parent writes them once; every worker loads them)."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def timed(fn):
    """(fn(), wall seconds, (user, system) CPU seconds of this worker process, all threads): one timed unit,
    measured the same way on both sides. System time is where page faults and the kernel's page zeroing
    show (PERFORMANCE.md, change 22)."""
    c0, t0 = os.times(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), os.times()
    return out, t1 - t0, (c1.user - c0.user, c1.system - c0.system)
