"""training/optimizer.py against references written here: the learning-rate schedule against its formula,
per-group peak rates (``optim.lr_rules``), and whole AdamW steps (global-norm clipping, decoupled weight
decay, per-group warmup + cosine) against a float64 NumPy AdamW and against torch.optim.AdamW."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uvjax.config import base_config
from uvjax.training import optimizer as opt


def _optim(**kw):
    o = base_config().optim
    for k, v in kw.items():
        o[k] = v
    return o


def formula_lr(count, peak, warmup, total, min_ratio, kind="cosine"):
    """The schedule as documented: linear warmup to ``peak`` over ``warmup`` steps, then cosine down to
    ``peak·min_ratio`` at ``total`` (or flat for "constant"), read at ``count + 1`` so the first update
    already moves (peak / warmup)."""
    s = count + 1
    w = max(1, min(warmup, total))
    if s < w:
        return peak * s / w
    if kind == "constant":
        return peak
    end = peak * min_ratio
    frac = min((s - w) / max(total - w, 1), 1.0)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


@pytest.mark.parametrize("warmup,total,min_ratio,kind", [
    (4, 20, 0.1, "cosine"), (0, 10, 0.0, "cosine"), (7, 7, 0.25, "cosine"), (30, 10, 0.1, "cosine"),
    (5, 12, 0.1, "constant"), (0, 5, 0.1, "constant")])
def test_schedule_values_match_formula(warmup, total, min_ratio, kind):
    peak = 3e-4
    sched = opt.schedule(peak, warmup, total, min_ratio, kind)
    got = np.array([float(sched(jnp.asarray(c))) for c in range(total + 3)])
    want = np.array([formula_lr(c, peak, warmup, total, min_ratio, kind) for c in range(total + 3)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    if warmup and warmup < total:  # landmarks, by hand: first step peak/warmup, the peak, the floor
        assert got[0] == pytest.approx(peak / warmup, rel=1e-6)
        assert got[warmup - 1] == pytest.approx(peak, rel=1e-6)
        assert got[total - 1] == pytest.approx(peak * (min_ratio if kind == "cosine" else 1.0), rel=1e-6)


def test_schedule_rejects_unknown_kind():
    with pytest.raises(ValueError, match="optim.schedule"):
        opt.schedule(1e-3, 2, 10, 0.1, "linear")


def test_learning_rates_logged_per_group():
    o = _optim(lr=1e-3, warmup_steps=2, min_lr_ratio=0.1, lr_rules=(("params/a/.*", 4e-3), ("lora/.*", 2e-4)))
    for step in (0, 1, 5, 9):
        got = opt.learning_rates(o, 10, step)
        assert got == pytest.approx({"lr": formula_lr(step, 1e-3, 2, 10, 0.1),
                                     "lr/rule0": formula_lr(step, 4e-3, 2, 10, 0.1),
                                     "lr/rule1": formula_lr(step, 2e-4, 2, 10, 0.1)}, rel=1e-6)


def test_lr_group_labels_first_matching_rule_wins_full_match():
    tree = {"params": {"a": {"kernel": 0, "bias": 0}, "ab": {"kernel": 0}, "b": {"kernel": 0}},
            "lora": {"x": {"a": 0}}}
    rules = (("params/a/.*", 1.0), ("params/.*", 2.0), ("lora/x/a", 3.0))
    got = opt.flatten(opt.lr_group_labels(tree, rules))
    # params/ab/kernel does not fullmatch "params/a/.*": rule1, not rule0
    assert got == {"params/a/kernel": "rule0", "params/a/bias": "rule0", "params/ab/kernel": "rule1",
                   "params/b/kernel": "rule1", "lora/x/a": "rule2"}
    assert set(opt.flatten(opt.lr_group_labels(tree, ())).values()) == {"default"}


# ------------------------------------------------------------------------------------- whole updates
def _variables(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"params": {"understanding_adapter": {"fc1": {"kernel": f(3, 4), "bias": f(4)}},
                       "decoder": {"norm": {"scale": f(4)}, "w": f(4, 5)},
                       "embed": {"embedding": f(6, 4)}},
            "lora": {"decoder": {"q": {"a": f(4, 2), "b": f(2, 5)}}}}


TRAINABLE = ("lora/.*", r"params/understanding_adapter/.*", r"params/decoder/.*")
RULES = ((r"params/understanding_adapter/.*", 1e-2), (r"lora/.*", 2e-3))


def _grads(rng, tree, steps):
    """Gradient sequences whose global norm is sometimes under, sometimes over the clip norm of 1."""
    scales = [0.3, 4.0, 0.8, 2.5, 0.05, 6.0][:steps]
    out = []
    for s in scales:
        g = jax.tree_util.tree_map(lambda p: rng.standard_normal(p.shape), tree)
        n = math.sqrt(sum(float((x ** 2).sum()) for x in jax.tree_util.tree_leaves(g)))
        out.append(jax.tree_util.tree_map(lambda x, f=s / n: (x * f).astype(np.float32), g))
    return out


def numpy_adamw(params, grads, o, total, peaks):
    """float64 AdamW written out: clip the global norm, Adam moments with bias correction, then
    p ← p − lr_group(t)·(m̂/(√v̂ + eps) + wd·p)."""
    p = {k: v.astype(np.float64) for k, v in opt.flatten(params).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, gt in enumerate(grads):
        g = {k: x.astype(np.float64) for k, x in opt.flatten(gt).items()}
        norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
        if o.clip_norm and norm > o.clip_norm:
            g = {k: x * (o.clip_norm / norm) for k, x in g.items()}
        for k in p:
            m[k] = o.b1 * m[k] + (1 - o.b1) * g[k]
            v2[k] = o.b2 * v2[k] + (1 - o.b2) * g[k] ** 2
            mh, vh = m[k] / (1 - o.b1 ** (t + 1)), v2[k] / (1 - o.b2 ** (t + 1))
            lr = formula_lr(t, peaks(k), o.warmup_steps, total, o.min_lr_ratio, o.schedule)
            p[k] = p[k] - lr * (mh / (np.sqrt(vh) + o.eps) + o.weight_decay * p[k])
    return p


def _run_optimizer(o, trainable, grads, total):
    tx = opt.make_optimizer(o, trainable, total)
    state = tx.init(trainable)
    params = trainable
    step = jax.jit(tx.update)
    for g in grads:
        upd, state = step(g, state, params)
        params = optax.apply_updates(params, upd)
    return params


@pytest.mark.parametrize("wd,clip,kind", [(0.1, 1.0, "cosine"), (0.0, 0.0, "cosine"), (0.05, 1.0, "constant")])
def test_adamw_steps_match_float64_numpy(wd, clip, kind):
    rng = np.random.default_rng(0)
    variables = _variables(rng)
    trainable, frozen = opt.split_trainable(variables, TRAINABLE)
    assert set(opt.flatten(frozen)) == {"params/embed/embedding"}
    total = 6
    o = _optim(lr=1e-3, lr_rules=RULES, warmup_steps=2, min_lr_ratio=0.1, weight_decay=wd, clip_norm=clip,
               schedule=kind)
    grads = _grads(rng, trainable, total)
    got = opt.flatten(_run_optimizer(o, trainable, grads, total))

    peak_of = {"params/understanding_adapter/fc1/kernel": 1e-2, "params/understanding_adapter/fc1/bias": 1e-2,
               "lora/decoder/q/a": 2e-3, "lora/decoder/q/b": 2e-3,
               "params/decoder/norm/scale": 1e-3, "params/decoder/w": 1e-3}
    want = numpy_adamw(trainable, grads, o, total, peak_of.__getitem__)
    assert set(got) == set(want) == set(peak_of)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=0, atol=2e-6, err_msg=k)
        assert not np.allclose(np.asarray(got[k]), opt.flatten(trainable)[k])  # every trainable leaf moved


def test_weight_decay_is_decoupled_and_reaches_every_trainable_leaf():
    """Zero gradients: Adam's direction is 0, so a step is exactly p·(1 − lr·wd) — decoupled decay
    (AdamW), not an L2 term through the moments (which would give p − lr·sign(p)). Every trainable leaf
    decays, 1-D ones (biases, norm scales) included: the optimizer has no decay mask."""
    rng = np.random.default_rng(1)
    trainable, _ = opt.split_trainable(_variables(rng), TRAINABLE)
    o = _optim(lr=1e-2, lr_rules=(), warmup_steps=1, min_lr_ratio=1.0, weight_decay=0.5, clip_norm=1.0)
    zeros = jax.tree_util.tree_map(np.zeros_like, trainable)
    got = opt.flatten(_run_optimizer(o, trainable, [zeros], 10))
    for k, p in opt.flatten(trainable).items():
        np.testing.assert_allclose(np.asarray(got[k]), p * (1 - 1e-2 * 0.5), rtol=1e-6, err_msg=k)


def test_first_step_size_is_each_groups_lr():
    """Adam's first step is lr·g/(|g| + eps) ≈ lr·sign(g): the per-leaf step reads its group's rate."""
    rng = np.random.default_rng(2)
    trainable, _ = opt.split_trainable(_variables(rng), TRAINABLE)
    o = _optim(lr=1e-3, lr_rules=RULES, warmup_steps=1, min_lr_ratio=1.0, weight_decay=0.0, clip_norm=0.0)
    g = jax.tree_util.tree_map(lambda p: np.sign(rng.standard_normal(p.shape)).astype(np.float32), trainable)
    tx = opt.make_optimizer(o, trainable, 10)
    upd, _ = tx.update(g, tx.init(trainable), trainable)
    want = {"params/understanding_adapter": 1e-2, "lora": 2e-3, "params/decoder": 1e-3}
    for k, u in opt.flatten(upd).items():
        lr = next(v for pre, v in want.items() if k.startswith(pre))
        np.testing.assert_allclose(np.asarray(u), -lr * np.asarray(opt.flatten(g)[k]), rtol=2e-5, err_msg=k)


def test_adamw_matches_torch():
    """torch.optim.AdamW + clip_grad_norm_ as a second reference, the per-step learning rates set from the
    formula (torch clips by max/(norm + 1e-6): a 1e-6 relative difference, inside the tolerance)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    trainable, _ = opt.split_trainable(_variables(rng), TRAINABLE)
    total = 6
    o = _optim(lr=1e-3, lr_rules=RULES, warmup_steps=3, min_lr_ratio=0.2, weight_decay=0.1, clip_norm=1.0)
    grads = _grads(rng, trainable, total)
    got = opt.flatten(_run_optimizer(o, trainable, grads, total))
    flat = opt.flatten(trainable)
    peak = {k: 1e-2 if "understanding_adapter" in k else 2e-3 if k.startswith("lora") else 1e-3 for k in flat}
    tp = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in flat.items()}
    groups = [{"params": [tp[k]], "key": k, "lr": 0.0} for k in flat]
    topt = torch.optim.AdamW(groups, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    for t, g in enumerate(grads):
        gf = opt.flatten(g)
        for k in flat:
            tp[k].grad = torch.tensor(np.asarray(gf[k], np.float64))
        torch.nn.utils.clip_grad_norm_(list(tp.values()), o.clip_norm)
        for grp in topt.param_groups:
            grp["lr"] = formula_lr(t, peak[grp["key"]], o.warmup_steps, total, o.min_lr_ratio)
        topt.step()
    for k in flat:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), tp[k].detach().numpy(), rtol=0, atol=3e-6,
                                   err_msg=k)
