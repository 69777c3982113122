"""benchmarks/compare_torch.py's comparison logic: given the same weights, uvjax and HF transformers + peft
(the independent reference) compute the same per-token loss, the same LoRA gradients, and — after AdamW
steps on both sides — the same losses. Tiny config with GQA, a right-padded row and partial target masks."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the torch extra is part of the README's test line

from benchmarks import attention
from benchmarks import compare_torch_common as common
from benchmarks import compare_torch_hf as hf_side
from benchmarks import compare_torch_report as report
from benchmarks import compare_torch_uvjax as uv_side
from benchmarks import compare_torch_worker as harness
from uvjax.config import model_config
from uvjax.inference.sampling import argmax_last, sample_logits
from uvjax.models import llama
from uvjax.models.unified import UnifiedModel
from uvjax.training.optimizer import flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

hf_side.import_hf()  # transformers + peft, with the registry's torchvision made importable

SPEC = common.spec_of("tiny", vocab=97, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, rank=4,
                  alpha=8.0, seq=16, batch=3, codes=16)


@pytest.fixture(scope="module")
def setup():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    w = common.make_weights(SPEC, seed=0, lora_b_std=0.05)
    b = common.text_batch(SPEC, seed=1)
    b["segment_ids"][1, 12:] = 0  # right padding: never attended to, no targets
    b["text_target"][2, 9:11] = 0  # a gap in the targets
    hf = hf_side.hf_model(SPEC, w)
    yield w, b, hf
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def uv(setup):
    """uvjax per-token CE, masks, LoRA gradients of the mean CE (one jitted call), and the CE with B = 0."""
    w, b, _ = setup
    model = UnifiedModel(model_config(uv_side.uvjax_config(SPEC)).validate())
    v = uv_side.uvjax_variables(model, SPEC, w)

    def loss(lora, rest):
        ce, m = uv_side.uvjax_token_losses(model, {**rest, "lora": lora}, b)
        return ce.sum() / m.sum(), (ce, m)

    rest = {k: x for k, x in v.items() if k != "lora"}
    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, (ce, m)), g = f(v["lora"], rest)
    zero_b = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 0 if getattr(p[-1], "key", None) == "b" else x, v["lora"])
    (_, (ce0, _)), _ = f(zero_b, rest)
    return np.asarray(ce), np.asarray(m), g, np.asarray(ce0)


def test_masks_follow_uvjax_targets(setup):
    _, b, _ = setup
    m = common.source_mask(b)
    assert m.shape == (3, 15)
    assert not m[1, 11:].any() and m[1, 4:11].all()  # padding after position 12 has no targets
    assert not m[2, 8:10].any() and m[2, 10]
    assert common.logits_to_keep(b) == 16 - 3  # first target source position is 3 (prompt = 4 tokens)


def test_same_per_token_loss(setup, uv):
    _, b, hf = setup
    ce_j, m_j, _, ce_0 = uv
    with torch.no_grad():
        ce_t, m_t = hf_side.hf_token_losses(hf, b)
        ce_k, _ = hf_side.hf_token_losses(hf, b, common.logits_to_keep(b))  # the benchmark's logits_to_keep path
    np.testing.assert_array_equal(m_j, m_t.numpy())
    assert m_t.sum() > 20
    np.testing.assert_allclose(ce_j, ce_t.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(ce_k.numpy(), ce_t.numpy(), rtol=0, atol=1e-6)
    # the LoRA delta matters: with B = 0 the loss differs (so the comparison covers LoRA)
    assert np.abs(ce_0 - ce_j).max() > 1e-3


def test_same_lora_gradients(setup, uv):
    _, b, hf = setup
    g = flatten(uv[2])
    hf.zero_grad(set_to_none=True)
    hf_side.hf_loss(hf, b).backward()
    layers = hf.base_model.model.model.layers
    checked = 0
    for proj, path in common.PROJ_HF.items():
        group = "attn" if proj in ("q", "k", "v", "o") else "mlp"
        for i, layer in enumerate(layers):
            mod = layer.get_submodule(path)
            ga = mod.lora_A["default"].weight.grad.numpy().T  # [in, r]
            gb = mod.lora_B["default"].weight.grad.numpy().T  # [r, out]
            ja = np.asarray(g[f"decoder/layers/{group}/{proj}/a"][i])
            jb = np.asarray(g[f"decoder/layers/{group}/{proj}/b"][i])
            for mine, ref in ((ja, ga), (jb, gb)):
                assert np.abs(ref).max() > 0
                np.testing.assert_allclose(mine, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
            checked += 1
    assert checked == 7 * SPEC["layers"]
    hf.zero_grad(set_to_none=True)


def test_same_losses_through_adamw_steps():
    """The benchmark's two train steps (uvjax train step vs torch AdamW) stay in lockstep."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = dict(SPEC)
        w = common.make_weights(s, seed=3)
        b = common.text_batch(s, seed=4)
        lr = 1e-2  # large, so the later losses depend on the updates being the same
        step, state, gb = uv_side.uvjax_trainer(s, w, b, lr, devices=jax.devices()[:1])
        hf = hf_side.hf_model(s, w)
        hf.train()
        opt = hf_side.torch_optimizer(hf, lr)
        lj, lt = [], []
        for _ in range(3):
            state, m = step(state, gb)
            lj.append(float(m["loss/text"]))
            lt.append(hf_side.torch_train_step(hf, opt, b, common.logits_to_keep(b)))
    finally:
        torch.set_num_threads(n)
    assert lj[0] - lj[2] > 1e-3  # the steps changed the loss
    np.testing.assert_allclose(lj, lt, rtol=0, atol=5e-5)


def test_query_blocked_attention_matches_hf(setup, monkeypatch):
    """uvjax's query-blocked causal attention (llama.causal_blocked_attention, used for T >= 2 blocks;
    the tiny T = 16 otherwise runs the one-block path) against the HF reference: 4 blocks of 4 here."""
    w, b, hf = setup
    calls = []
    real = llama.causal_blocked_attention
    monkeypatch.setattr(llama, "ATTN_BLOCK", 4)
    monkeypatch.setattr(llama, "causal_blocked_attention", lambda *a: calls.append(a[-1]) or real(*a))
    model = UnifiedModel(model_config(uv_side.uvjax_config(SPEC)).validate())
    v = uv_side.uvjax_variables(model, SPEC, w)
    ce_j, m_j = jax.jit(lambda v: uv_side.uvjax_token_losses(model, v, b))(v)
    assert calls and set(calls) == {4}  # the blocked path ran (nn.scan traces the layer body)
    with torch.no_grad():
        ce_t, m_t = hf_side.hf_token_losses(hf, b)
    np.testing.assert_array_equal(np.asarray(m_j), m_t.numpy())
    np.testing.assert_allclose(np.asarray(ce_j), ce_t.numpy(), rtol=0, atol=2e-5)


def test_argmax_last_is_first_index_of_max():
    """The greedy pick the decode loop now uses (uvjax.inference.sampling.argmax_last) equals argmax,
    ties included (first index); used by both decoders compared in the benchmark."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, (64, 50)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(np.asarray(argmax_last(jnp.asarray(x))), x.argmax(-1))
    assert [int(sample_logits(jax.random.key(0), jnp.asarray(r), 0.0)) for r in x[:8]] == list(x[:8].argmax(-1))


def test_report_matmul_floor_and_cpu_table():
    """The report's matmul floor (hand-derived: 173 GFLOP at 179 GFLOP/s = 0.966 s; HF's 2.056 s over it
    = ×2.13) and its CPU-seconds table (medians of the per-step user / system times; '–' for a run
    recorded before the CPU times were)."""
    floor, ratio = report.matmul_floor(173e9, 179.0, 2.056)
    assert floor == pytest.approx(0.96648, rel=1e-4) and ratio == pytest.approx(2.12730, rel=1e-4)
    side = lambda tps, user, sys: dict(tokens_per_s=tps, peak_rss_mb=1000.0, cpu_user_s_all=user,
                                       cpu_sys_s_all=sys, idle=dict(cpu_busy_percent_median=1.0,
                                                                    cpu_busy_percent_max=2.0))
    row = dict(config="S", jax=side(2745.0, [2.6, 2.7, 3.4], [0.0, 0.02, 0.01]),
               torch=side(1993.0, [3.9, 3.5, 4.0, 4.5], [0.2, 0.0, 0.1, 0.0]),
               ratio_tokens_per_s=2745 / 1993, ratio_at_matmul_floor=ratio, loss_max_abs_diff=9.5e-7,
               matmul_peak_gflops=179.0, fraction_of_matmul_peak=0.65, compile_s=6.0)
    row["jax"]["achieved_gflops"] = 116.0
    old = {**row, "config": "M", "jax": {**row["jax"], "cpu_user_s_all": None}}
    del old["ratio_at_matmul_floor"]
    payload = dict(machine=dict(date="d", platform="p", jax="j"), idle=dict(cores=2, cpu_busy_percent=0.0,
                   loadavg_1m=1.0), torch_version="t", transformers_version="tf", peft_version="pf",
                   args=dict(torch_threads=2), command="c", train=[row, old], decode=[])
    md = report.markdown(payload)
    assert "| S | 2745 | 1993 | ×1.38 | ≥ ×2.0 | ×2.13 |" in md
    assert "| S | 2.70 / 0.01 | 3.95 / 0.05 |" in md  # medians; four HF steps: mean of the middle two
    assert "| M | – | 3.95 / 0.05 |" in md and "| M | 2745 | 1993 | ×1.38 | ≥ ×1.5 | – |" in md


def test_attention_benchmark_torch_side_computes_the_same_gradients():
    """benchmarks/attention.py --torch: torch's sdpa worker, given uvjax's head-major inputs (GQA, two packed
    documents, two query blocks), returns the gradients of uvjax's hand-written attention backward — and a
    reference with one wrong gradient is reported as far off."""

    B, K, G, T, D = 2, 2, 2, 256, 16
    rng = np.random.default_rng(0)
    q, d_out = (rng.standard_normal((B, K, G, T, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, K, T, D)).astype(np.float32) for _ in range(2))
    seg = np.ones((B, T), np.int32)
    seg[:, 100:] = 2
    idx = np.arange(T)
    mask = jnp.asarray((idx[None, None, :] <= idx[None, :, None]) & (seg[:, :, None] == seg[:, None, :]))
    grads = jax.grad(lambda q, k, v: jnp.sum(llama._blocked_attention(q, k, v, mask, 128) * d_out),
                     argnums=(0, 1, 2))(q, k, v)
    grads = [np.asarray(g) for g in grads]
    worker = attention._TorchWorker([q, k, v, d_out], seg)
    try:
        assert worker.max_grad_diff(grads) < 1e-4
        wrong = [grads[0], grads[1] * 0.5, grads[2]]
        assert worker.max_grad_diff(wrong) > 0.1 * float(np.abs(grads[1]).max())
    finally:
        worker.close()


def test_cpus_option_pins_a_process_and_names_bad_ids():
    """``--cpus``: a process pinned with it runs on exactly those CPUs (checked in a child process, so this
    test's own affinity is untouched); ids the machine does not offer, or no ids, are errors that name them."""
    first = min(os.sched_getaffinity(0))
    code = ("import os; from benchmarks.compare_torch_worker import pin_cpus; "
            f"print(pin_cpus('{first}'), sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.split()
    assert out == [f"({first},)", f"[{first}]"]
    missing = max(os.sched_getaffinity(0)) + 1000
    with pytest.raises(ValueError, match=f"{missing}"):
        harness.parse_cpus(f"{first},{missing}")
    with pytest.raises(ValueError, match="comma-separated CPU ids"):
        harness.parse_cpus("zero")
    with pytest.raises(ValueError, match="none"):
        harness.parse_cpus(",")
    assert harness.parse_cpus(f"{first},{first}") == (first,)


def test_worker_entry_loads_no_framework_before_pinning():
    """A worker runs benchmarks/compare_torch.py and pins its CPUs in worker_main, so the file's own imports
    must load neither numpy (its BLAS threads start on import, before the pinning) nor jax or torch (the
    other side's framework would count in a worker's peak RSS)."""
    code = ("import sys; sys.argv = ['x']; import benchmarks.compare_torch; "
            "print(sorted(m for m in ('numpy', 'jax', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["[]"]
