"""The train state and the jitted, sharded train step.

State = {step, trainable, frozen, opt_state, rng} (plain pytrees). Gradients and optimizer state cover
``trainable`` only. One step: global target counts from the whole batch → per microbatch loss sums
normalised by those global counts → summed gradients (exact accumulation) → non-finite / loss-spike skip
→ optax update. Initialisation goes eval_shape → shardings → jitted init with out_shardings, so no
host ever materialises unsharded parameters.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from uvjax.data.arrays import INT_KEYS
from uvjax.models.partitioning import activation_sharding
from uvjax.models.unified import UnifiedModel, text_head_path
from uvjax.training import loss as L
from uvjax.training.optimizer import flatten, make_optimizer, merge_variables, split_trainable
from uvjax.training.sharding import batch_sharding, replicated, variable_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array


def dummy_batch(feature_dim: int = 0, batch: int = 1, seq: int = 2) -> dict:
    b = {k: jnp.zeros((batch, seq), jnp.int32) for k in INT_KEYS}
    if feature_dim:
        b["features"] = jnp.zeros((batch, seq, feature_dim), jnp.float32)
    return b


def _init_variables(model: UnifiedModel, rng):
    return model.init({"params": rng}, dummy_batch(model.cfg.image.feature_dim), method=UnifiedModel.init_all)


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs: model, optimizer, mesh, shardings and the compiled step."""

    model: UnifiedModel
    tx: optax.GradientTransformation
    mesh: Any
    rules: Any
    state_shardings: Any
    cfg: Any  # the full ml_collections config

    def batch_shardings(self, batch_like: dict):
        return {k: batch_sharding(self.mesh, len(getattr(v, "shape", np.shape(v)))) for k, v in batch_like.items()}


def plan_trainer(model: UnifiedModel, cfg, mesh, rules, *, seed: int | None = None):
    """Optimizer, shardings and the *abstract* initial state (ShapeDtypeStructs carrying shardings);
    allocates nothing, so it also serves AOT planning of models that do not fit this host."""
    seed = cfg.train.seed if seed is None else seed
    init_rng, state_rng = jax.random.split(jax.random.key(seed))
    with activation_sharding(mesh, rules):
        boxed = jax.eval_shape(functools.partial(_init_variables, model), init_rng)
    var_sh = variable_shardings(boxed, mesh, rules)
    abstract = nn.unbox(boxed)
    tr_abs, fr_abs = split_trainable(abstract, cfg.train.trainable)
    tr_sh, fr_sh = split_trainable(var_sh, cfg.train.trainable)
    tx = make_optimizer(cfg.optim, tr_abs, cfg.train.steps)
    opt_abs = jax.eval_shape(tx.init, tr_abs)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, tr_sh,
                                   transform_non_params=lambda _: replicated(mesh),
                                   is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    # optax leaves that are not params (counts, MaskedNode) are replicated
    opt_sh = jax.tree_util.tree_map(
        lambda s: s if isinstance(s, jax.sharding.Sharding) else replicated(mesh), opt_sh,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    state_sh = TrainState(step=replicated(mesh), trainable=tr_sh, frozen=fr_sh, opt_state=opt_sh,
                          rng=replicated(mesh))
    abs_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=tr_abs, frozen=fr_abs,
                           opt_state=opt_abs, rng=jax.eval_shape(lambda: state_rng))
    abs_state = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                       abs_state, state_sh)
    trainer = Trainer(model=model, tx=tx, mesh=mesh, rules=rules, state_shardings=state_sh, cfg=cfg)
    return trainer, abs_state, (init_rng, state_rng)


def create_trainer(model: UnifiedModel, cfg, mesh, rules, *, seed: int | None = None):
    """Builds the optimizer and a sharded initial state. Returns (trainer, state)."""
    trainer, _, (init_rng, state_rng) = plan_trainer(model, cfg, mesh, rules, seed=seed)
    tx = trainer.tx

    def init_state(init_rng, state_rng):
        variables = nn.unbox(_init_variables(model, init_rng))
        tr, fr = split_trainable(variables, cfg.train.trainable)
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=tr, frozen=fr, opt_state=tx.init(tr),
                          rng=state_rng)

    with activation_sharding(mesh, rules):
        state = jax.jit(init_state, out_shardings=trainer.state_shardings)(init_rng, state_rng)
    return trainer, state


def abstract_state(trainer: Trainer, state_like=None):
    """ShapeDtypeStructs with shardings for restore-by-template (onto any mesh)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, trainer.state_shardings)


def loss_options(cfg) -> dict:
    im = cfg.model.image
    return dict(image_output=im.output_kind, image_loss=cfg.loss.image_loss,
                text_capacity=cfg.loss.text_target_capacity, image_capacity=cfg.loss.image_target_capacity,
                dense=cfg.loss.dense_logits)


def make_loss_fn(model: UnifiedModel, cfg):
    """(trainable, frozen, microbatch, counts, rng) → (loss, sums)."""
    opts = loss_options(cfg)
    weights = dict(w_text=cfg.loss.w_text, w_image=cfg.loss.w_image, z_loss=cfg.loss.z_loss)
    deterministic = cfg.model.lora.dropout == 0

    fused = int(cfg.loss.fused_head_chunk) > 0 and cfg.model.dtype == "float32" and not opts["dense"]

    def loss_fn(trainable, frozen, mb, counts, rng):
        variables = merge_variables(trainable, frozen)
        h = model.apply(variables, mb, deterministic=deterministic, rngs={"dropout": rng})
        head = {}
        if fused:  # the text head's weight, and whether it trains (static: the trainable tree's paths)
            head = dict(text_head=model.apply(variables, method=UnifiedModel.text_head),
                        head_chunk=int(cfg.loss.fused_head_chunk), z_grad=float(cfg.loss.z_loss) > 0,
                        head_grad=text_head_path(model.cfg) in flatten(trainable))
        image_method = UnifiedModel.image_logits
        if model.cfg.shared_vocab:  # image logits are LM-head rows: the image rows, or the whole vocabulary
            if model.cfg.image.image_ce == "full_vocab":
                image_method = UnifiedModel.text_logits
                head["image_label_ids"] = jnp.asarray(model.cfg.image.code_token_ids, jnp.int32)
                if fused:
                    head["image_head"] = head["text_head"]
            elif fused:
                head["image_head"] = model.apply(variables, method=UnifiedModel.image_head)
        sums = L.loss_sums(
            h, mb,
            lambda x: model.apply(variables, x, method=UnifiedModel.text_logits),
            lambda x: model.apply(variables, x, method=image_method),
            **opts, **head)
        return L.total_loss(sums, counts, **weights), sums

    return loss_fn


def make_train_step(trainer: Trainer, batch_like: dict):
    cfg = trainer.cfg
    loss_fn = make_loss_fn(trainer.model, cfg)
    accum = int(cfg.train.grad_accum)
    weights = dict(w_text=cfg.loss.w_text, w_image=cfg.loss.w_image, z_loss=cfg.loss.z_loss)

    def step_fn(state: TrainState, batch: dict, max_loss):
        counts = L.global_counts(batch)
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.grad(loss_fn, has_aux=True)
        if accum == 1:
            grads, sums = grad_fn(state.trainable, state.frozen, batch, counts, rng)
        else:
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

            def body(carry, xs):
                g_acc, s_acc = carry
                mb, i = xs
                g, s = grad_fn(state.trainable, state.frozen, mb, counts, jax.random.fold_in(rng, i))
                return (jax.tree_util.tree_map(jnp.add, g_acc, g),
                        jax.tree_util.tree_map(jnp.add, s_acc, s)), None

            zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
            zeros_s = {k: jnp.zeros((), jnp.float32) for k in L.SUM_KEYS}
            (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), (micro, jnp.arange(accum)))
        sums = {k: v.astype(jnp.float32) for k, v in sums.items()}
        metrics = L.metrics_from_sums(sums, **weights)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(gnorm)
        spike = finite & (metrics["loss"] > max_loss)  # training/guard.py: train.spike_factor
        apply = finite & ~spike
        updates, new_opt = trainer.tx.update(grads, state.opt_state, state.trainable)
        new_tr = optax.apply_updates(state.trainable, updates)
        # a skipped update leaves params and optimizer state as they were (train.nonfinite='halt'
        # also skips it, then stops the run), so parameters never become NaN
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(apply, a, b), new, old)
        new_tr, new_opt = keep(new_tr, state.trainable), keep(new_opt, state.opt_state)
        metrics.update({"grad_norm": gnorm, "skipped_nonfinite": 1.0 - finite.astype(jnp.float32),
                        "skipped_spike": spike.astype(jnp.float32)})
        new_state = state.replace(step=state.step + 1, trainable=new_tr, opt_state=new_opt)
        return new_state, metrics

    b_sh = trainer.batch_shardings(batch_like)
    jitted = jax.jit(step_fn, in_shardings=(trainer.state_shardings, b_sh, replicated(trainer.mesh)),
                     out_shardings=(trainer.state_shardings, replicated(trainer.mesh)), donate_argnums=(0,))

    def run(state, batch, max_loss=None):
        """``max_loss``: skip the update when the loss exceeds it (loss-spike guard; None = never)."""
        limit = np.float32(np.inf if max_loss is None else max_loss)
        with activation_sharding(trainer.mesh, trainer.rules):
            return jitted(state, batch, limit)

    run.jitted = jitted
    run.lower = lambda state, batch: _lower(trainer, jitted, state, batch)
    return run


def make_probe_loss(trainer: Trainer, batch_like: dict):
    """(state, batch) → the loss the train step would report for ``batch`` from ``state``, without an update
    and without donating ``state``: the probe that lets a restored checkpoint prove itself (train.py).
    The whole batch is one microbatch (the loss is a sum over microbatches normalised by global counts,
    so ``grad_accum`` does not change it) and dropout uses the step's rng (that of ``grad_accum=1``)."""
    loss_fn = make_loss_fn(trainer.model, trainer.cfg)

    def probe(state: TrainState, batch: dict):
        counts = L.global_counts(batch)
        rng = jax.random.fold_in(state.rng, state.step)
        loss, _ = loss_fn(state.trainable, state.frozen, batch, counts, rng)
        return loss.astype(jnp.float32)

    jitted = jax.jit(probe, in_shardings=(trainer.state_shardings, trainer.batch_shardings(batch_like)),
                     out_shardings=replicated(trainer.mesh))

    def run(state, batch):
        with activation_sharding(trainer.mesh, trainer.rules):
            return jitted(state, batch)

    return run


def _lower(trainer, jitted, state, batch):
    with activation_sharding(trainer.mesh, trainer.rules):
        return jitted.lower(state, batch, jax.ShapeDtypeStruct((), jnp.float32))
