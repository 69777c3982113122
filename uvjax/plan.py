"""``python -m uvjax.plan --config=configs/vqvq.py:tiny --topology=v5e-16``: will it fit, how fast?

Lowers and compiles the real train step for a target topology with abstract inputs (no weights are
allocated) and reports per-device argument / temporary / output bytes against the chip's HBM, the
analytic FLOPs of a step (uvjax/training/flops.py) and the step time expected at a stated MFU.
When the program does not fit (the compiler runs out of memory, or the peak exceeds the chip) it compiles
the step at smaller batches (``largest_fitting``: bisection over sequences per batch shard) and answers with
the largest per-chip batch that fits and the ``grad_accum`` that keeps the configured global batch
(``--search=false``: no search; ``--hbm_gib``: another memory per chip). Exits 1 when the configured
program does not fit.

With libtpu installed (``pip install -e ".[tpu-aot]"``) TPU topologies compile for the real chip
through deviceless topology descriptions. Otherwise the program is compiled for N CPU devices, which
gives the same sharding but *approximate* memory (the CPU backend upcasts bf16 and schedules
differently); the report says so.

Over ~400 lines on purpose: one command (targets, AOT compile, batch search, report) whose parts are only
used together.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from jax.experimental import topologies

from uvjax import cli
from uvjax.config import model_config, validate
from uvjax.data.arrays import INT_KEYS
from uvjax.data.tokenizer import TextTokenizer, image_code_ids, with_image_tokens
from uvjax.models.unified import UnifiedModel
from uvjax.training.flops import train_flops_per_step
from uvjax.training.sharding import check_batch_divisibility, make_mesh
from uvjax.training.step import make_train_step, plan_trainer

# chip: (HBM GiB per chip, peak dense bf16 TFLOP/s per chip, devices per chip seen by JAX)
CHIPS = {
    "v4": (32.0, 275.0), "v5e": (16.0, 197.0), "v5p": (95.0, 459.0), "v6e": (32.0, 918.0),
    "h100": (80.0, 989.0), "h200": (141.0, 989.0), "cpu": (24.0, 0.4),
}
TPU_NAMES = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}

FLAGS = flags.FLAGS


def _define_flags():
    """Only when run as a command (the tests import uvjax.plan as a library)."""
    cli.define_config_flag()
    flags.DEFINE_string("topology", "cpu-8", "chip-count, e.g. v5e-16, v4-32, v5p-8, h100-8, cpu-8")
    flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation assumed for the step-time estimate")
    flags.DEFINE_string("backend", "auto", "auto | tpu | cpu (cpu: approximate memory)")
    flags.DEFINE_string("out", None, "optional JSON output path")
    flags.DEFINE_bool("search", True, "when it does not fit: compile smaller batches to find the largest that fits")
    flags.DEFINE_float("hbm_gib", 0.0, "memory per chip in GiB (0: the chip's table value, e.g. 40 for an A100-40GB)")


def parse_topology(topo: str) -> tuple[str, int]:
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", topo.strip().lower())
    if not m or m.group(1) not in CHIPS:
        raise ValueError(f"--topology={topo!r}: expected <chip>-<count> with chip in {sorted(CHIPS)}")
    chip, n = m.group(1), int(m.group(2))
    # v4/v5p names count TensorCores (2 per chip, one JAX device per chip with megacore)
    devices = n // 2 if chip in ("v4", "v5p") else n
    return chip, max(devices, 1)


def _tpu_devices(chip: str, n: int):
    shapes = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    if chip in ("v4", "v5p"):
        cube = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
        desc = topologies.get_topology_desc(f"{chip}:{cube[n]}", "tpu", chip_config_name="megacore")
    else:
        desc = topologies.get_topology_desc(f"{chip}:{shapes[n]}", "tpu")
    return desc.devices


def _size(num: str, unit: str) -> int:
    return int(float(num) * 2 ** (10 * "KMGT".index(unit) + 10))


def _exhausted_bytes(message: str):
    """Bytes the compiler said the program needs, from an out-of-memory compile error (None otherwise):
    "... memory required for HLO temporaries (35.05G) exceeds available HBM (15.75G)"."""
    m = re.search(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\)", message, re.S)
    return _size(*m.groups()) if m else None


def _image_vocabulary_for_plan(cfg) -> bool:
    """shared_vocab: the code -> token-id map only picks rows (no shape depends on it). The plan reads it
    from the run's tokenizer when that exists, else uses the last ``num_codes`` rows and says so (a plan
    is made before the weights are on this machine). Returns whether the placeholder was used."""
    im = cfg.model.image
    if im.get("layout", "two_heads") != "shared_vocab" or tuple(im.code_token_ids):
        return False
    n, v = int(im.num_codes), int(cfg.model.vocab_size)
    path = cfg.data.get("tokenizer", "") or ""
    if path and os.path.exists(os.path.join(path, "tokenizer.json")):
        ids, placeholder = image_code_ids(with_image_tokens(TextTokenizer.load(path), n), n), False
    else:
        ids, placeholder = tuple(range(v - n, v)), True
    with cfg.unlocked():
        cfg.model.image.code_token_ids = ids
    return placeholder


def _available_bytes(message: str):
    """The memory the compiler had, from its out-of-memory message ("... exceeds available HBM (15.75G)")."""
    m = re.search(r"exceeds available \w+ \(([\d.]+)([KMGT])\)", message)
    return _size(*m.groups()) if m else None


@dataclasses.dataclass
class Target:
    """What every compile of one plan shares: the devices, the mesh, the abstract state and its trainer."""
    cfg: Any
    chip: str
    real: bool  # compiled for the real chip (deviceless TPU AOT) rather than N CPU devices
    devices: list
    mesh: Any
    trainer: Any
    abs_state: Any
    placeholder_map: bool

    @property
    def batch_shards(self) -> int:
        """The batch is split over data x fsdp (training/sharding.py): the unit of a valid global batch."""
        return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])


def make_target(cfg, topology: str, backend: str = "auto") -> Target:
    chip, n = parse_topology(topology)
    devices, real = None, False
    if backend in ("auto", "tpu") and chip in TPU_NAMES:
        try:
            devices = _tpu_devices(chip, n)
            real = True
        except Exception as e:  # no libtpu: fall back to the CPU backend
            if backend == "tpu":
                raise RuntimeError(f"TPU AOT needs libtpu (pip install -e '.[tpu-aot]'): {e}") from e
    if devices is None:
        if len(jax.devices("cpu")) < n:
            raise RuntimeError(f"{n} CPU devices needed for an approximate plan of {topology}; "
                               f"run via `python -m uvjax.plan` (it sets them) or set jax_num_cpu_devices")
        devices = jax.devices("cpu")[:n]


    validate(cfg)
    mesh = make_mesh(cfg.mesh.shape, devices)
    placeholder_map = _image_vocabulary_for_plan(cfg)
    model = UnifiedModel(model_config(cfg).validate())
    trainer, abs_state, _ = plan_trainer(model, cfg, mesh, cfg.sharding.rules)
    return Target(cfg=cfg, chip=chip, real=real, devices=list(devices), mesh=mesh, trainer=trainer,
                  abs_state=abs_state, placeholder_map=placeholder_map)


def compile_step(t: Target, batch_size: int, grad_accum: int) -> dict:
    """Compiles the train step of ``t`` for a global batch of ``batch_size`` sequences in ``grad_accum``
    microbatches (abstract inputs: nothing is allocated). The compiler running out of memory is an answer
    (``compiler_out_of_memory``, with the temporaries it said it needed), not an exception."""

    check_batch_divisibility(batch_size, grad_accum, t.mesh, 1)
    cfg = t.cfg
    if (batch_size, grad_accum) != (int(cfg.train.batch_size), int(cfg.train.grad_accum)):
        cfg = copy.deepcopy(cfg)
        with cfg.unlocked():
            cfg.train.batch_size, cfg.train.grad_accum = batch_size, grad_accum
    trainer = dataclasses.replace(t.trainer, cfg=cfg)
    B, T = batch_size, int(cfg.train.seq_len)
    batch = {k: jax.ShapeDtypeStruct((B, T), np.int32) for k in INT_KEYS}
    if "features" in (cfg.model.image.input_kind, cfg.model.image.output_kind):
        batch["features"] = jax.ShapeDtypeStruct((B, T, int(cfg.model.image.feature_dim)), np.float32)
    step = make_train_step(trainer, batch)
    b_sh = trainer.batch_shardings(batch)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in batch.items()}
    t0 = time.time()
    lowered = step.lower(t.abs_state, batch)
    available = None
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError: the compiler ran out of memory for this program)
        need = _exhausted_bytes(str(e))
        if need is None:
            raise
        compiled, available = None, _available_bytes(str(e))
    compile_s = time.time() - t0
    mem = compiled.memory_analysis() if compiled is not None else None
    per_dev = {
        "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0)),
        "output_bytes": int(getattr(mem, "output_size_in_bytes", 0)),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else need,
        "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
        "generated_code_bytes": int(getattr(mem, "generated_code_size_in_bytes", 0)),
        "compiler_peak_bytes": int(getattr(mem, "peak_memory_in_bytes", 0) or 0),
    }
    # donated state aliases its outputs: peak <= arguments + temporaries + non-aliased outputs. The TPU
    # compiler's own peak (its buffer assignment's, over the live ranges) is lower: the arguments are not all
    # live next to the largest temporaries (vicuna7b on v5e-8 at 4 sequences per chip: 14.28 GiB against
    # the sum's 16.33; the compiler accepted the program under its 15.75 GiB). On the CPU backend that field
    # is not a device peak (it stays near the arguments' size), so the plan keeps the sum there.
    peak = per_dev["argument_bytes"] + per_dev["temp_bytes"] + max(per_dev["output_bytes"] - per_dev["alias_bytes"], 0)
    compiler_peak = t.real and per_dev["compiler_peak_bytes"] > 0
    if compiler_peak:
        peak = per_dev["compiler_peak_bytes"]
    return {"batch_size": B, "grad_accum": grad_accum, "per_device": per_dev, "peak_bytes_per_device": peak,
            "peak_source": "compiler" if compiler_peak else "arguments + temporaries + unaliased outputs",
            "compile_s": compile_s, "compiler_out_of_memory": compiled is None, "compiler_hbm_bytes": available}


def _fits(c: dict, hbm: int) -> bool:
    return not c["compiler_out_of_memory"] and c["peak_bytes_per_device"] <= hbm


def largest_fitting(fits, n: int) -> int:
    """The largest b in [1, n] with ``fits(b)``, or 0 when none does, for a ``fits`` that is monotone (a
    batch that fits, fits with fewer sequences). Bisection: at most ceil(log2(n + 1)) calls.

    Why bisection and not a walk down from the top: a walk costs n - b compiles. On the CPU and GPU
    backends every probe is a full compile, and n (sequences per chip) can be hundreds. On TPU a probe that
    does not fit ends in seconds (the compiler's out-of-memory error) while one that fits takes minutes, so
    there a walk would cost n - b fast failures and one slow fit against bisection's <= log2 n probes, of
    which several may fit; per-chip batches on TPU are small (n <= ~16), so the two are within a few
    minutes of each other there while only bisection stays bounded everywhere. The midpoint rounds up:
    the upper probe is the one more likely to fail fast."""
    lo, hi = 0, n + 1  # fits(lo) holds (0: trivially) and fits(hi) does not (n + 1: the caller's failure)
    while hi - lo > 1:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _state_bytes(abs_state) -> tuple[int, int]:
    """(bytes of the whole train state, bytes of one device's shards of it)."""
    total = per_dev = 0
    for x in jax.tree_util.tree_leaves(abs_state):
        item = np.dtype(x.dtype).itemsize if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else 8
        total += int(np.prod(x.shape)) * item
        shard = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        per_dev += int(np.prod(shard)) * item
    return total, per_dev


def search_batch(t: Target, configured: dict, hbm: int) -> dict:
    """The program of ``configured`` does not fit in ``hbm`` bytes per chip: the largest per-chip batch that
    does (compiled at grad_accum=1), and the smallest grad_accum that keeps the configured global batch with
    microbatches no larger than that (compiled too: accumulation adds a gradient buffer and the whole batch)."""
    S = t.batch_shards
    G, A = int(configured["batch_size"]), int(configured["grad_accum"])
    per_chip = G // A // S
    t0 = time.time()
    probes = {}

    def fits(b: int) -> bool:
        probes[b] = compile_step(t, b * S, 1)
        return _fits(probes[b], hbm)

    b = largest_fitting(fits, per_chip - 1)
    out = {"largest_fitting_batch_per_chip": b, "largest_fitting_global_batch": b * S if b else None,
           "largest_fitting_peak_bytes_per_device": probes[b]["peak_bytes_per_device"] if b else None,
           "grad_accum_for_global_batch": None, "grad_accum_peak_bytes_per_device": None}
    accums = [k for k in range(2, G + 1) if G % k == 0 and (G // k) % S == 0 and 0 < G // k // S <= b]
    for k in accums:  # smallest first: the fewest microbatches; a larger k only if the accumulation did not fit
        probes[(k,)] = c = compile_step(t, G, k)
        if _fits(c, hbm):
            out["grad_accum_for_global_batch"], out["grad_accum_peak_bytes_per_device"] = k, c["peak_bytes_per_device"]
            break
    if not b:  # not even one sequence per chip: how far the state and one sequence's temporaries are from the chip
        one = probes.get(1, configured)
        state_total, state_dev = _state_bytes(t.abs_state)
        act = one["peak_bytes_per_device"] - one["per_device"]["argument_bytes"]
        out.update(one_sequence_peak_bytes_per_device=one["peak_bytes_per_device"],
                   one_sequence_out_of_memory=one["compiler_out_of_memory"],
                   state_bytes=state_total, state_bytes_per_device=state_dev, one_sequence_temp_bytes=act,
                   # FSDP divides the state over more chips; one sequence's temporaries stay per chip
                   estimated_chips_needed=(math.ceil(state_dev * len(t.devices) / (hbm - act)) if act < hbm else None))
    out["search_probes"] = [
        {"batch_per_chip": (c["batch_size"] // c["grad_accum"]) // S, "global_batch": c["batch_size"],
         "grad_accum": c["grad_accum"], "fits": _fits(c, hbm), "peak_bytes_per_device": c["peak_bytes_per_device"],
         "compiler_out_of_memory": c["compiler_out_of_memory"], "compile_s": c["compile_s"]} for c in probes.values()]
    out["search_s"] = time.time() - t0
    return out


def plan(cfg, topology: str, *, mfu: float = 0.4, backend: str = "auto", search: bool = True,
         hbm_gib: float = 0.0) -> dict:
    """The plan of ``cfg`` on ``topology``. When it does not fit and ``search``: the largest per-chip batch
    that does, and the grad_accum that keeps the configured global batch (``search_batch``). ``hbm_gib``:
    the chip's memory (0: CHIPS' value)."""

    t = make_target(cfg, topology, backend)
    B, T, A = int(cfg.train.batch_size), int(cfg.train.seq_len), int(cfg.train.grad_accum)
    c = compile_step(t, B, A)
    table_gib, tflops = CHIPS[t.chip]
    hbm = int((hbm_gib or table_gib) * 2 ** 30)
    m = cfg.model
    n_text = T * 0.375
    n_img = T * 0.375
    fl = train_flops_per_step(batch=B, seq=T, hidden=m.hidden, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads,
                              head_dim=m.head_dim or m.hidden // m.heads, intermediate=m.intermediate,
                              vocab=m.vocab_size, num_codes=m.image.num_codes, text_targets=n_text,
                              image_targets=n_img, lora_rank=m.lora.rank, lora_targets=tuple(m.lora.targets),
                              base_trainable=any(p in (".*", "params/.*") for p in cfg.train.trainable))
    n_chips = len(t.devices)
    step_s = fl["total"] / (n_chips * tflops * 1e12 * mfu) if tflops else None
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(t.abs_state.trainable)) + \
        sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(t.abs_state.frozen))
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(t.abs_state.trainable))
    peak = c["peak_bytes_per_device"]
    r = {
        "topology": topology, "chip": t.chip, "devices": n_chips,
        "backend": "tpu (deviceless AOT)" if t.real else "cpu", "approximate": not t.real, "mesh": dict(t.mesh.shape),
        "global_batch": B, "grad_accum": A, "batch_shards": t.batch_shards, "seq_len": T,
        "params": n_params, "trainable_params": n_train,
        "per_device": c["per_device"], "peak_bytes_per_device": peak, "peak_source": c["peak_source"],
        "hbm_bytes_per_chip": hbm,
        "headroom_bytes": hbm - peak, "fits": _fits(c, hbm),
        "flops_per_step": fl["total"], "assumed_mfu": mfu, "expected_step_s": step_s,
        "expected_tokens_per_s": (B * T / step_s) if step_s else None, "compile_s": c["compile_s"],
        "code_token_map": "placeholder (no tokenizer here; shapes only)" if t.placeholder_map else None,
        # the chip cannot hold the step's temporaries: an answer (the bytes it needed), not a traceback
        "compiler_out_of_memory": c["compiler_out_of_memory"], "compiler_hbm_bytes": c["compiler_hbm_bytes"],
        "searched": False,
    }
    if not r["fits"] and search:
        r.update(search_batch(t, c, hbm), searched=True)
    return r


def _gib(b) -> str:
    """GiB with two decimals; MiB below 0.1 GiB (a small model's plan on the CPU backend)."""
    return f"{b / 2 ** 30:.2f} GiB" if abs(b) >= 2 ** 30 / 10 else f"{b / 2 ** 20:.2f} MiB"


def answer(r: dict) -> str:
    """One line: FITS, or DOES NOT FIT with what it needed and (after the search) the batch that fits."""
    if r["fits"]:
        return f"FITS: peak {_gib(r['peak_bytes_per_device'])} of {_gib(r['hbm_bytes_per_chip'])} per chip"
    if r["compiler_out_of_memory"]:
        need = (f"needs {_gib(r['per_device']['temp_bytes'])} of temporaries against "
                f"{_gib(r['compiler_hbm_bytes'] or r['hbm_bytes_per_chip'])} HBM per chip")
    else:
        need = f"needs {_gib(r['peak_bytes_per_device'])} against {_gib(r['hbm_bytes_per_chip'])} per chip"
    if not r.get("searched"):
        return f"DOES NOT FIT: {need} (--search finds the largest batch that fits)"
    b, G = r["largest_fitting_batch_per_chip"], r["global_batch"]
    if b:
        s = (f"DOES NOT FIT: {need}; the largest batch that fits is {b} sequence{'s' if b > 1 else ''} per chip "
             f"(global batch {r['largest_fitting_global_batch']}, "
             f"peak {_gib(r['largest_fitting_peak_bytes_per_device'])} per chip): ")
        k = r["grad_accum_for_global_batch"]
        if k:
            return s + (f"keep the global batch {G} with --config.train.grad_accum={k} "
                        f"(peak {_gib(r['grad_accum_peak_bytes_per_device'])} per chip)")
        return s + (f"no grad_accum keeps the global batch {G} (its microbatches must be a multiple of the "
                    f"{r['batch_shards']} batch shards and at most {b} per chip, and fit with the accumulation)")
    one = ("the compiler ran out of memory" if r["one_sequence_out_of_memory"] else
           f"peak {_gib(r['one_sequence_peak_bytes_per_device'])}")
    s = (f"DOES NOT FIT: {need}; not even 1 sequence per chip fits ({one}): the train state is "
         f"{_gib(r['state_bytes_per_device'])} per chip over {r['devices']} chips ({_gib(r['state_bytes'])} in all), "
         f"one sequence's temporaries {_gib(r['one_sequence_temp_bytes'])}: ")
    if r["estimated_chips_needed"]:
        return s + (f"a larger slice (more FSDP shards; about {r['estimated_chips_needed']} chips by this estimate), "
                    "shorter sequences (--config.train.seq_len) or a chip with more memory")
    return s + ("more chips do not shrink one sequence's temporaries: shorter sequences (--config.train.seq_len) "
                "or a chip with more memory")


def format_report(r: dict) -> str:
    gib = _gib
    pd = r["per_device"]
    lines = [
        f"plan for {r['topology']} ({r['devices']} devices, backend {r['backend']}"
        + (", APPROXIMATE memory" if r["approximate"] else "") + f"), mesh {r['mesh']}",
        f"  params {r['params'] / 1e6:.1f} M (trainable {r['trainable_params'] / 1e6:.1f} M), global batch "
        f"{r['global_batch']} x {r['seq_len']}"
        + (f" in {r['grad_accum']} microbatches" if r["grad_accum"] > 1 else ""),
        (f"  per device: temporaries {gib(pd['temp_bytes'])} (the compiler's out-of-memory message; arguments and "
         "outputs not known)" if r["compiler_out_of_memory"] else
         f"  per device: arguments {gib(pd['argument_bytes'])}, temporaries {gib(pd['temp_bytes'])}, outputs "
         f"{gib(pd['output_bytes'])} (aliased {gib(pd['alias_bytes'])}) -> peak {gib(r['peak_bytes_per_device'])}"
         + (" (the compiler's)" if r.get("peak_source") == "compiler" else "")),
        f"  chip HBM {gib(r['hbm_bytes_per_chip'])}, headroom {gib(r['headroom_bytes'])}: "
        + ("FITS" if r["fits"] else "DOES NOT FIT"),
        f"  {r['flops_per_step'] / 1e12:.2f} TFLOP per step; at MFU {r['assumed_mfu']:.0%}: "
        + (f"{r['expected_step_s']:.3f} s/step, {r['expected_tokens_per_s']:.0f} tokens/s" if r["expected_step_s"]
           else "n/a"),
        f"  compile {r['compile_s']:.1f} s",
    ] + ([f"  code -> token map: {r['code_token_map']}"] if r.get("code_token_map") else [])
    if r.get("searched"):
        probes = ", ".join(
            f"{p['batch_per_chip']}/chip" + (f" (grad_accum {p['grad_accum']})" if p["grad_accum"] > 1 else "")
            + (": fits " + gib(p["peak_bytes_per_device"]) if p["fits"] else
               f": out of memory ({gib(p['peak_bytes_per_device'])} of temporaries)" if p["compiler_out_of_memory"]
               else ": " + gib(p["peak_bytes_per_device"]))
            + f" [{p['compile_s']:.0f} s]" for p in r["search_probes"])
        n = len(r["search_probes"])
        lines.append(f"  search ({n} compile{'s' if n > 1 else ''}, {r['search_s']:.0f} s): {probes}")
    lines.append(answer(r))
    return "\n".join(lines)


def main(argv):
    del argv
    chip, n = parse_topology(FLAGS.topology)
    if chip not in TPU_NAMES or FLAGS.backend == "cpu":
        jax.config.update("jax_num_cpu_devices", n)
    if FLAGS.backend == "cpu" or chip not in TPU_NAMES:
        jax.config.update("jax_platforms", "cpu")
    r = plan(FLAGS.config, FLAGS.topology, mfu=FLAGS.mfu, backend=FLAGS.backend, search=FLAGS.search,
             hbm_gib=FLAGS.hbm_gib)
    print(format_report(r))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(r, f, indent=2)
    sys.exit(0 if r["fits"] else 1)


def console_main():
    """``uvjax-plan`` (the console script) and ``python -m uvjax.plan``."""
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    console_main()
