"""The sharded train step: mesh-independence, trainable subset, exact gradient accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from uvjax.config import lora_preset, model_config
from uvjax.models.unified import UnifiedModel
from uvjax.training.optimizer import flatten
from uvjax.training.sharding import global_batch_from_local, make_mesh
from uvjax.training.step import create_trainer, make_train_step


def _lora_cfg(**over):
    c = tiny_config(**over)
    lora_preset(c, 4, 8.0, lr=1e-2, adapter_lr=5e-3)
    return c


def _run(cfg, mesh, batch, steps=2):
    model = UnifiedModel(model_config(cfg).validate())
    trainer, state = create_trainer(model, cfg, mesh, cfg.sharding.rules)
    step = make_train_step(trainer, batch)
    losses = []
    for _ in range(steps):
        state, m = step(state, global_batch_from_local(batch, mesh))
        losses.append(float(m["loss"]))
    return state, losses, trainer


@pytest.fixture(scope="module")
def batch():
    return random_batch(np.random.default_rng(0), 8, 16, 24, 96)


def test_same_result_on_every_mesh(batch):
    cfg = _lora_cfg()
    results = {}
    meshes = {"1dev": make_mesh((1, 1, 1), jax.devices()[:1]), "1x8x1": make_mesh((1, 8, 1)),
              "2x4x1": make_mesh((2, 4, 1)), "2x2x2": make_mesh((2, 2, 2))}
    for name, mesh in meshes.items():
        state, losses, _ = _run(cfg, mesh, batch)
        results[name] = (losses, {k: np.asarray(v) for k, v in flatten(jax.device_get(state.trainable)).items()})
    ref_losses, ref_params = results["1dev"]
    for name, (losses, params) in results.items():
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, err_msg=name)
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], atol=1e-5, err_msg=f"{name}: {k}")


def test_only_trainable_leaves_change_and_frozen_have_no_optimizer_state(batch):
    cfg = _lora_cfg()
    mesh = make_mesh((1, 8, 1))
    model = UnifiedModel(model_config(cfg).validate())
    trainer, state0 = create_trainer(model, cfg, mesh, cfg.sharding.rules)
    before_tr = {k: np.asarray(v) for k, v in flatten(jax.device_get(state0.trainable)).items()}
    before_fr = {k: np.asarray(v) for k, v in flatten(jax.device_get(state0.frozen)).items()}
    assert all(k.startswith("lora/") or "adapter" in k or "generation_head" in k or "image_codebook" in k
               for k in before_tr)
    assert any(k.startswith("params/decoder/layers/attn/q/kernel") for k in before_fr)
    step = make_train_step(trainer, batch)
    state, _ = step(state0, global_batch_from_local(batch, mesh))
    after_tr = {k: np.asarray(v) for k, v in flatten(jax.device_get(state.trainable)).items()}
    after_fr = {k: np.asarray(v) for k, v in flatten(jax.device_get(state.frozen)).items()}
    for k in before_fr:
        assert np.array_equal(before_fr[k], after_fr[k]), k
    changed = [k for k in before_tr if not np.array_equal(before_tr[k], after_tr[k])]
    # every LoRA B moves off zero after one step (A moves only once B is non-zero)
    assert all(k in changed for k in before_tr if k.endswith("/b")), changed
    # optimizer moments exist for trainable leaves only: their count equals the trainable count
    n_train = len(before_tr)
    n_big = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
    assert len(n_big) == 2 * n_train  # Adam mu and nu
    n_params = sum(np.size(v) for v in before_tr.values())
    assert sum(np.size(x) for x in n_big) == 2 * n_params


def test_gradient_accumulation_is_exact(batch):
    mesh = make_mesh((1, 4, 1), jax.devices()[:4])
    _, l1, _ = _run(_lora_cfg(), mesh, batch, steps=2)
    s1 = _run(_lora_cfg(), mesh, batch, steps=2)[0]
    s2, l2, _ = _run(_lora_cfg(**{"train.grad_accum": 2}), mesh, batch, steps=2)
    np.testing.assert_allclose(l1, l2, atol=1e-6)
    a, b = flatten(jax.device_get(s1.trainable)), flatten(jax.device_get(s2.trainable))
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-6, err_msg=k)


def test_nonfinite_update_is_skipped(batch):
    cfg = _lora_cfg()
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    model = UnifiedModel(model_config(cfg).validate())
    trainer, state = create_trainer(model, cfg, mesh, cfg.sharding.rules)
    # poison a trainable leaf's input path: a NaN in the understanding adapter makes the loss NaN
    tr = jax.device_get(state.trainable)
    tr["params"]["understanding_adapter"]["fc1"]["bias"] = np.full_like(
        tr["params"]["understanding_adapter"]["fc1"]["bias"], np.nan)
    state = state.replace(trainable=jax.device_put(tr, trainer.state_shardings.trainable))
    before = {k: np.asarray(v) for k, v in flatten(tr).items()}
    step = make_train_step(trainer, batch)
    state, m = step(state, global_batch_from_local(batch, mesh))
    assert float(m["skipped_nonfinite"]) == 1.0
    after = flatten(jax.device_get(state.trainable))
    for k in before:
        np.testing.assert_array_equal(np.asarray(after[k]), before[k])


def test_batch_not_divisible_is_a_clear_error():
    from uvjax.training.sharding import check_batch_divisibility
    with pytest.raises(ValueError, match="data×fsdp=8"):
        check_batch_divisibility(12, 1, make_mesh((1, 8, 1)), 1)
    with pytest.raises(ValueError, match="grad_accum"):
        check_batch_divisibility(8, 3, make_mesh((1, 8, 1)), 1)
    with pytest.raises(ValueError, match="does not divide|uses"):
        make_mesh((3, -1, 1))


def test_remat_policy_gives_the_same_step(batch):
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    _, l0, _ = _run(_lora_cfg(), mesh, batch, steps=2)
    _, l1, _ = _run(_lora_cfg(**{"model.remat": "full"}), mesh, batch, steps=2)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)


def test_bf16_compute_keeps_fp32_params_and_logits(batch):
    from uvjax.models.unified import UnifiedModel as UM
    cfg = _lora_cfg(**{"model.dtype": "bfloat16"})
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    state, losses, _ = _run(cfg, mesh, batch, steps=1)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.trainable))
    assert all(np.isfinite(losses))
    _, ref, _ = _run(_lora_cfg(), mesh, batch, steps=1)
    assert abs(losses[0] - ref[0]) < 0.05 * abs(ref[0])  # bf16 matmuls, same model
    model = UM(model_config(cfg).validate())
    v = {"params": jax.device_get(state.trainable["params"])}
    v["params"].update(jax.device_get(state.frozen["params"]))
    v["lora"] = jax.device_get(state.trainable["lora"])
    h = model.apply(v, {k: jnp.asarray(x) for k, x in batch.items()})
    assert h.dtype == jnp.bfloat16
    assert model.apply(v, h, method=UM.text_logits).dtype == jnp.float32


def _initial_head(cfg, path):
    model = UnifiedModel(model_config(cfg).validate())
    _, state = create_trainer(model, cfg, make_mesh((1, 1, 1), jax.devices()[:1]), cfg.sharding.rules)
    return flatten(jax.device_get(state.trainable))[path]


@pytest.mark.parametrize("tied", [False, True])
def test_fused_text_head_equals_the_logits_matrix_path(batch, tied):
    """loss.fused_head_chunk (chunked head + CE, gradient formed in the forward; float64-tested in
    test_loss.py) wired into the step: same losses and same trained parameters — the head trains too —
    as the one-logits-matrix path, with a z-loss, 3-row chunks, a tied or untied head, on a 2×2×2 mesh."""
    over = {"model.tie_embeddings": tied, "loss.z_loss": 1e-2}
    cfg = _lora_cfg(**over)
    cfg.train.trainable = cfg.train.trainable + ("params/(lm_head|embed)/.*",)
    ref = _lora_cfg(**over, **{"loss.fused_head_chunk": 0})
    ref.train.trainable = cfg.train.trainable
    cfg.loss.fused_head_chunk = 3
    s0, l0, _ = _run(ref, make_mesh((1, 1, 1), jax.devices()[:1]), batch)
    s1, l1, _ = _run(cfg, make_mesh((2, 2, 2)), batch)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    p0, p1 = flatten(jax.device_get(s0.trainable)), flatten(jax.device_get(s1.trainable))
    head = "params/embed/embedding" if tied else "params/lm_head/kernel"  # spelled out: checks text_head_path
    assert head in p1
    for k in p0:  # Adam turns rounding-level gradient differences into ≤ 1e-4 of lr = 1e-2 on near-zero grads
        np.testing.assert_allclose(p1[k], p0[k], atol=1e-4, err_msg=k)
    assert float(np.abs(p1[head] - _initial_head(ref, head)).max()) > 1e-3  # the head's gradient reached Adam
