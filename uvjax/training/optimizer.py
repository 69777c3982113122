"""What trains and how: one declarative rule for the trainable subset, optax AdamW on it only.

Variables are ``{"params": ..., "lora": ...}``; every leaf has a path like
``params/understanding_adapter/fc1/kernel`` or ``lora/decoder/layers/attn/q/a``. ``train.trainable``
is a list of regular expressions (full match): matching leaves are differentiated and optimised, the
rest are frozen and get no optimizer state. ``optim.lr_rules`` gives some trainable leaves their own
peak learning rate (paper: LoRA 2e-4, adapters/heads 1e-4), each with warmup + cosine.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def flatten(tree: dict) -> dict[str, object]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: dict[str, object]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def split_trainable(variables: dict, patterns: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; raises when a pattern matches nothing (a typo would
    otherwise silently freeze the model)."""
    compiled = [re.compile(p) for p in patterns]
    flat = flatten(variables)
    used = [False] * len(compiled)
    train, frozen = {}, {}
    for path, v in flat.items():
        hit = False
        for i, c in enumerate(compiled):
            if c.fullmatch(path):
                used[i] = hit = True
        (train if hit else frozen)[path] = v
    unused = [p for p, u in zip(patterns, used) if not u]
    if unused:
        raise ValueError(f"train.trainable patterns {unused} match no variable; paths look like "
                         f"{sorted(flat)[:3]}")
    if not train:
        raise ValueError("train.trainable selects no variable: nothing would train")
    return unflatten(train), unflatten(frozen)


def merge_variables(trainable: dict, frozen: dict) -> dict:
    return unflatten({**flatten(frozen), **flatten(trainable)})


def lr_group_labels(trainable: dict, lr_rules: Sequence[tuple[str, float]]) -> dict:
    """A pytree of group names ("default" or "rule<i>") shaped like ``trainable``."""
    compiled = [re.compile(p) for p, _ in lr_rules]
    labels = {}
    for path in flatten(trainable):
        label = "default"
        for i, c in enumerate(compiled):
            if c.fullmatch(path):
                label = f"rule{i}"
                break
        labels[path] = label
    return unflatten(labels)


def schedule(peak: float, warmup: int, total: int, min_ratio: float, kind: str = "cosine"):
    """Linear warmup then cosine (or constant). Evaluated at step+1 so the first update already has
    a non-zero rate (peak / warmup) instead of a wasted zero-rate step."""
    base = _schedule(peak, warmup, total, min_ratio, kind)
    return lambda count: base(count + 1)


def _schedule(peak: float, warmup: int, total: int, min_ratio: float, kind: str):
    warmup = max(0, min(warmup, total))
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                     optax.constant_schedule(peak)], [max(warmup, 1)])
    if kind != "cosine":
        raise ValueError(f"optim.schedule={kind!r}; expected 'cosine' or 'constant'")
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(total, warmup + 1),
                                              end_value=peak * min_ratio)


class GroupLRState(NamedTuple):
    count: jax.Array


def scale_by_group_schedules(labels: dict, schedules: dict) -> optax.GradientTransformation:
    """Multiplies each leaf's update by −lr_group(step). Stateless apart from a step count, so the
    Adam moments stay shaped exactly like the trainable tree (simple shardings, simple restore)."""

    def init(params):
        del params
        return GroupLRState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        lrs = {g: fn(state.count) for g, fn in schedules.items()}
        new = jax.tree_util.tree_map(lambda u, g: -lrs[g] * u, updates, labels)
        return new, GroupLRState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(optim_cfg, trainable: dict, total_steps: int) -> optax.GradientTransformation:
    """clip → Adam moments → decoupled weight decay → per-group warmup+cosine learning rate."""
    rules = [(str(p), float(lr)) for p, lr in optim_cfg.lr_rules]
    peaks = {"default": float(optim_cfg.lr), **{f"rule{i}": lr for i, (_, lr) in enumerate(rules)}}
    labels = lr_group_labels(trainable, rules)
    used = sorted(set(flatten(labels).values()))
    schedules = {g: schedule(peaks[g], optim_cfg.warmup_steps, total_steps, optim_cfg.min_lr_ratio,
                             optim_cfg.schedule) for g in used}
    chain = []
    if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    chain.append(optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps))
    if optim_cfg.weight_decay:
        chain.append(optax.add_decayed_weights(optim_cfg.weight_decay))
    chain.append(scale_by_group_schedules(labels, schedules))
    return optax.chain(*chain)


def learning_rates(optim_cfg, total_steps: int, step: int) -> dict[str, float]:
    """Current learning rate per group, for logging."""
    out = {"lr": float(schedule(optim_cfg.lr, optim_cfg.warmup_steps, total_steps, optim_cfg.min_lr_ratio,
                                optim_cfg.schedule)(step))}
    for i, (_, lr) in enumerate(optim_cfg.lr_rules):
        out[f"lr/rule{i}"] = float(schedule(float(lr), optim_cfg.warmup_steps, total_steps,
                                            optim_cfg.min_lr_ratio, optim_cfg.schedule)(step))
    return out
