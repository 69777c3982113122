"""uvjax.plan on the CPU backend: numbers consistent with the compiled program and the state size."""
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
    assert state_bytes / 8 <= args <= state_bytes + batch_bytes
    # the donated state comes back in place: outputs alias (almost all of) the arguments
    assert r["per_device"]["alias_bytes"] >= 0.9 * (args - batch_bytes / 8)
    assert r["peak_bytes_per_device"] >= args and r["fits"]
    assert r["flops_per_step"] > 0 and r["expected_step_s"] > 0


def test_plan_exits_nonzero_when_it_does_not_fit():
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-m", "uvjax.plan", "--config=configs/vqvq.py:smoke", "--topology=cpu-2",
                        "--config.model.hidden=2048", "--config.model.intermediate=16384", "--config.model.heads=16",
                        "--config.model.kv_heads=16", "--config.model.layers=12", "--config.train.batch_size=512",
                        "--config.train.seq_len=1024"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr[-2000:]
    assert "DOES NOT FIT" in p.stdout


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
