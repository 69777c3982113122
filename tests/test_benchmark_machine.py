"""Every benchmark's JSON names the CPU it ran on (issue 34): model, vendor family, vector/matrix units,
cores. Checked against /proc/cpuinfo read here, and the family key against hand-written CPUs."""
from __future__ import annotations

import os

import pytest


def _proc_cpuinfo():
    model, flags = None, None
    with open("/proc/cpuinfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k.strip() == "model name" and model is None:
                model = v.strip()
            elif k.strip() == "flags" and flags is None:
                flags = set(v.split())
    return model, flags


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs Linux /proc/cpuinfo")
def test_cpu_info_matches_proc_cpuinfo():
    from benchmarks.common import CPU_FLAGS, cpu_info, machine, machine_line
    model, flags = _proc_cpuinfo()
    info = cpu_info()
    assert info["cpu_model"] == model
    assert info["flags"] == {f: f in flags for f in CPU_FLAGS}
    assert info["cores"] == os.cpu_count()
    m = machine()
    assert m["cpu_model"] == model and m["cpu_family"] == info["cpu_family"]
    line = machine_line(m)
    assert model in line and f"{os.cpu_count()} cores" in line
    listed = set(line.split("flags: ")[1].split(";")[0].split())
    have = {f for f in CPU_FLAGS if f in flags}
    assert listed == have if have else line.split("flags: ")[1].startswith("none of")


@pytest.mark.parametrize("model, vendor, on, expected", [
    ("Intel(R) Xeon(R) CPU @ 2.80GHz", "GenuineIntel", {"avx2", "avx512f"}, "Intel Xeon (AVX-512)"),
    ("Intel(R) Xeon(R) Platinum 8480+", "GenuineIntel", {"avx2", "avx512f", "avx512_bf16", "amx_tile"},
     "Intel Xeon (AVX-512, BF16, AMX)"),
    ("AMD EPYC", "AuthenticAMD", {"avx2", "avx512f", "avx512_bf16"}, "AMD EPYC (AVX-512, BF16)"),
    ("AMD EPYC 7B12", "AuthenticAMD", {"avx2"}, "AMD EPYC (AVX2)"),
    ("AMD Ryzen 9 7950X", "AuthenticAMD", {"avx2", "avx512f"}, "AMD (AVX-512)"),
    ("Neoverse-V2", "ARM", set(), "Neoverse-V2 (no AVX2)"),
])
def test_cpu_family_names_vendor_and_units(model, vendor, on, expected):
    from benchmarks.common import CPU_FLAGS, cpu_family
    assert cpu_family(model, vendor, {f: f in on for f in CPU_FLAGS}) == expected


@pytest.mark.parametrize("name, group", [
    ("ynn_fusion.50", "gemm"), ("dot.3", "gemm"), ("xnn_fusion", "gemm"),
    ("slice_concatenate_fusion.1", "copy/transpose"), ("copy_bitcast_fusion", "copy/transpose"),
    ("transpose.4", "copy/transpose"), ("dynamic-update-slice.1", "copy/transpose"),
    ("wrapped_broadcast.2", "copy/transpose"), ("input_reduce_fusion.2", "reduce"),
    ("bitcast_multiply_fusion.7", "elementwise"), ("subtract_exponential_fusion.5", "elementwise"),
    ("SlinkyThreadPool::Await", "wait"), ("ThunkExecutor::Execute", None), ("ThreadpoolListener::StartRegion", None),
])
def test_step_profile_groups_xla_op_names(name, group):
    from benchmarks.step_profile import category
    assert category(name) == group


def test_step_profile_shares_by_hand():
    from benchmarks.step_profile import summarize
    ops = {"ynn_fusion.1": 0.30, "dot.2": 0.10, "copy.1": 0.05, "add_multiply_fusion": 0.04,
           "input_reduce_fusion": 0.01, "ThunkExecutor::Execute": 0.45}
    s = summarize(ops, top=2)
    assert s["summed_op_s"] == pytest.approx(0.50)
    assert s["shares"] == pytest.approx({"gemm": 0.8, "copy/transpose": 0.1, "elementwise": 0.08, "reduce": 0.02})
    assert [t["op"] for t in s["top_non_gemm"]] == ["copy.1", "add_multiply_fusion"]
