"""uvjax.plan on the CPU backend: numbers consistent with the compiled program and the state size."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke():
    from uvjax.config import load_config_file
    return load_config_file("vqvq", "smoke")


def test_plan_reports_state_bytes_per_device():
    from uvjax import plan as P
    cfg = _smoke()
    r = P.plan(cfg, "cpu-8")
    assert r["approximate"] and r["devices"] == 8 and r["mesh"]["fsdp"] == 8
    # independent bound: every parameter in fp32, Adam keeps two moments of each trainable one
    state_bytes = 4 * (r["params"] + 2 * r["trainable_params"])
    batch_bytes = 6 * 4 * cfg.train.batch_size * cfg.train.seq_len
    args = r["per_device"]["argument_bytes"]
    # FSDP over 8 devices: an eighth of the state and of the batch per device, plus the few arrays with no
    # dimension on the fsdp axis (norm scales, the 64x8 codebook: ~4% here) whole on each; a replicated
    # state would be 8x this
    assert state_bytes / 8 <= args <= 1.1 * state_bytes / 8 + batch_bytes / 8
    # the donated state comes back in place: outputs alias (almost all of) the arguments
    assert r["per_device"]["alias_bytes"] >= 0.9 * (args - batch_bytes / 8)
    assert r["peak_bytes_per_device"] >= args and r["fits"]
    assert r["flops_per_step"] > 0 and r["expected_step_s"] > 0


def test_fsdp_splits_named_parameters_and_their_adam_moments():
    """The smoke config's mesh (1, 8, 1) with the default rules ("embed" -> fsdp): the embedding, the MLP and
    attention kernels, the LM head and both Adam moments of each are split along their embed dimension,
    one eighth (hidden 64 -> 8) on each device, every device a different slice; norm scales stay whole."""
    import jax
    from uvjax import plan as P
    cfg = _smoke()
    t = P.make_target(cfg, "cpu-8")
    assert dict(t.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    E, I, V, L = cfg.model.hidden, cfg.model.intermediate, cfg.model.vocab_size, cfg.model.layers
    # param path -> (full shape, the dimension that holds "embed")
    want = {"embed/embedding": ((V, E), 1), "decoder/layers/mlp/gate/kernel": ((L, E, I), 1),
            "decoder/layers/mlp/down/kernel": ((L, I, E), 2), "decoder/layers/attn/q/kernel": ((L, E, E), 1),
            "lm_head/kernel": ((E, V), 0)}
    found = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(t.abs_state):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = "/".join(keys[keys.index("params") + 1:]) if "params" in keys else ""
        kind = "param" if keys[0] == "trainable" else next((k for k in keys if k in ("mu", "nu")), None)
        if name in want and kind:
            shape, dim = want[name]
            assert leaf.shape == shape, (name, kind)
            assert leaf.sharding.spec[dim] == "fsdp", (name, kind, leaf.sharding.spec)
            shard = tuple(n // 8 if i == dim else n for i, n in enumerate(shape))
            x = jax.device_put(np.zeros(shape, np.float32), leaf.sharding)
            assert len(x.addressable_shards) == 8
            assert all(s.data.shape == shard for s in x.addressable_shards), (name, kind)
            assert len({s.index[dim].start for s in x.addressable_shards}) == 8  # eight different slices
            found[name, kind] = True
        if name == "decoder/final_norm/scale" and kind == "param":
            assert leaf.sharding.shard_shape(leaf.shape) == (E,)
    assert len(found) == 3 * len(want), sorted(found)


def test_plan_exits_nonzero_when_it_does_not_fit():
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-m", "uvjax.plan", "--config=configs/vqvq.py:smoke", "--topology=cpu-2",
                        "--config.model.hidden=2048", "--config.model.intermediate=16384", "--config.model.heads=16",
                        "--config.model.kv_heads=16", "--config.model.layers=12", "--config.train.batch_size=512",
                        "--config.train.seq_len=1024", "--search=false"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr[-2000:]
    assert "DOES NOT FIT" in p.stdout and "--search finds" in p.stdout


def test_topology_names():
    from uvjax.plan import parse_topology
    assert parse_topology("v5e-16") == ("v5e", 16)
    assert parse_topology("v4-32") == ("v4", 16)  # v4 names count TensorCores: 2 per chip
    with pytest.raises(ValueError, match="topology"):
        parse_topology("tpu9-8")


def test_an_out_of_memory_compile_is_read_as_the_bytes_it_needed():
    """The TPU compiler's out-of-memory message (as libtpu 0.0.42 words it) becomes the plan's answer."""
    from uvjax.plan import _exhausted_bytes
    msg = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
           "for HLO temporaries (35.05G) exceeds available HBM (15.75G).")
    assert _exhausted_bytes(msg) == int(35.05 * 2 ** 30)
    assert _exhausted_bytes("RESOURCE_EXHAUSTED: ... temporaries (512.5M) exceeds") == int(512.5 * 2 ** 20)
    assert _exhausted_bytes("INVALID_ARGUMENT: shapes differ") is None


class _Counted:
    """fits(b) = b <= threshold, counting the calls."""

    def __init__(self, threshold):
        self.threshold, self.calls = threshold, []

    def __call__(self, b):
        assert b >= 1
        self.calls.append(b)
        return b <= self.threshold


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 15, 16, 100, 511])
def test_the_search_finds_the_threshold_in_log2_calls(n):
    from uvjax.plan import largest_fitting
    for threshold in sorted({0, 1, n // 3, n // 2, n - 1, n, 2 * n}):  # 0: none fits; >= n: all fit
        f = _Counted(threshold)
        assert largest_fitting(f, n) == min(threshold, n), (n, threshold, f.calls)
        assert len(f.calls) <= math.ceil(math.log2(n)) + 1, (n, threshold, f.calls)
        assert all(1 <= b <= n for b in f.calls)
    f = _Counted(5)
    assert largest_fitting(f, 0) == 0 and f.calls == []  # nothing below one sequence per chip to try


def _smoke_at(batch, grad_accum=1, seq_len=64):
    cfg = _smoke()
    with cfg.unlocked():
        cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seq_len = batch, grad_accum, seq_len
    return cfg


def test_the_plan_finds_the_largest_batch_that_fits():
    """Global batch 8 on cpu-2 (4 sequences per chip) against 4.5 MiB per chip: the plan's answer b is checked
    by planning b and b + 1 sequences per chip from scratch, and its grad_accum by planning the global batch
    with it (seven compiles of ~5 s)."""
    from uvjax import plan as P
    hbm_gib = 4.5 / 1024
    r = P.plan(_smoke_at(8), "cpu-2", hbm_gib=hbm_gib)
    assert not r["fits"] and r["searched"] and r["batch_shards"] == 2
    b = r["largest_fitting_batch_per_chip"]
    assert 1 <= b <= 3, r
    assert r["largest_fitting_global_batch"] == 2 * b
    at_b = P.plan(_smoke_at(2 * b), "cpu-2", hbm_gib=hbm_gib, search=False)
    above = P.plan(_smoke_at(2 * (b + 1)), "cpu-2", hbm_gib=hbm_gib, search=False)
    assert at_b["fits"] and not above["fits"], (b, at_b["peak_bytes_per_device"], above["peak_bytes_per_device"])
    assert r["largest_fitting_peak_bytes_per_device"] == at_b["peak_bytes_per_device"]
    # the smallest grad_accum whose microbatch (a multiple of the 2 shards) has at most b sequences per chip
    k = next(k for k in range(1, 9) if 8 % k == 0 and (8 // k) % 2 == 0 and 8 // k // 2 <= b)
    assert r["grad_accum_for_global_batch"] == k
    accum = P.plan(_smoke_at(8, grad_accum=k), "cpu-2", hbm_gib=hbm_gib, search=False)
    assert accum["fits"] and accum["peak_bytes_per_device"] == r["grad_accum_peak_bytes_per_device"]
    # bisection over 1..3: at most 2 batch probes, plus the grad_accum one
    assert len(r["search_probes"]) <= 3
    text = P.format_report(r)
    assert (f"DOES NOT FIT: needs {r['peak_bytes_per_device'] / 2 ** 20:.2f} MiB against 4.50 MiB per chip; "
            f"the largest batch that fits is {b} sequence") in text
    assert f"keep the global batch 8 with --config.train.grad_accum={k}" in text


def test_when_one_sequence_per_chip_does_not_fit_the_plan_says_so():
    from uvjax import plan as P
    r = P.plan(_smoke_at(4), "cpu-2", hbm_gib=1 / 1024)  # 2 per chip; 1 per chip needs ~2.5 MB
    assert not r["fits"] and r["largest_fitting_batch_per_chip"] == 0
    assert r["grad_accum_for_global_batch"] is None
    assert [p["batch_per_chip"] for p in r["search_probes"]] == [1]
    # independent: the whole state in fp32 (params and two Adam moments), FSDP halves it over 2 chips
    fp32_state = 4 * (r["params"] + 2 * r["trainable_params"])
    assert fp32_state <= r["state_bytes"] <= fp32_state + 64  # + step, Adam's count, the rng key
    assert r["state_bytes"] / 2 <= r["state_bytes_per_device"] <= r["state_bytes"]
    assert "not even 1 sequence per chip fits" in P.format_report(r)
