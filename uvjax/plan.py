"""``python -m uvjax.plan --config=configs/vqvq.py:tiny --topology=v5e-16``: will it fit, how fast?

Lowers and compiles the real train step for a target topology with abstract inputs (no weights are
allocated) and reports per-device argument / temporary / output bytes against the chip's HBM, the
analytic FLOPs of a step (uvjax/training/flops.py) and the step time expected at a stated MFU.
Exits 1 when the program does not fit.

With libtpu installed (``pip install -e ".[tpu-aot]"``) TPU topologies compile for the real chip
through deviceless topology descriptions. Otherwise the program is compiled for N CPU devices, which
gives the same sharding but *approximate* memory (the CPU backend upcasts bf16 and schedules
differently); the report says so.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# chip: (HBM GiB per chip, peak dense bf16 TFLOP/s per chip, devices per chip seen by JAX)
CHIPS = {
    "v4": (32.0, 275.0), "v5e": (16.0, 197.0), "v5p": (95.0, 459.0), "v6e": (32.0, 918.0),
    "h100": (80.0, 989.0), "h200": (141.0, 989.0), "cpu": (24.0, 0.4),
}
TPU_NAMES = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}

FLAGS = flags.FLAGS


def _define_flags():
    """Only when run as a command: importing uvjax.plan next to uvjax.train must not define --config twice."""
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/vqvq.py:tiny", lock_config=True)
    flags.DEFINE_string("topology", "cpu-8", "chip-count, e.g. v5e-16, v4-32, v5p-8, h100-8, cpu-8")
    flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation assumed for the step-time estimate")
    flags.DEFINE_string("backend", "auto", "auto | tpu | cpu (cpu: approximate memory)")
    flags.DEFINE_string("out", None, "optional JSON output path")


def parse_topology(topo: str) -> tuple[str, int]:
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", topo.strip().lower())
    if not m or m.group(1) not in CHIPS:
        raise ValueError(f"--topology={topo!r}: expected <chip>-<count> with chip in {sorted(CHIPS)}")
    chip, n = m.group(1), int(m.group(2))
    # v4/v5p names count TensorCores (2 per chip, one JAX device per chip with megacore)
    devices = n // 2 if chip in ("v4", "v5p") else n
    return chip, max(devices, 1)


def _tpu_devices(chip: str, n: int):
    from jax.experimental import topologies
    shapes = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    if chip in ("v4", "v5p"):
        cube = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
        desc = topologies.get_topology_desc(f"{chip}:{cube[n]}", "tpu", chip_config_name="megacore")
    else:
        desc = topologies.get_topology_desc(f"{chip}:{shapes[n]}", "tpu")
    return desc.devices


def _exhausted_bytes(message: str):
    """Bytes the compiler said the program needs, from an out-of-memory compile error (None otherwise):
    "... memory required for HLO temporaries (35.05G) exceeds available HBM (15.75G)"."""
    m = re.search(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\)", message, re.S)
    if not m:
        return None
    return int(float(m.group(1)) * 2 ** (10 * "KMGT".index(m.group(2)) + 10))


def _image_vocabulary_for_plan(cfg) -> bool:
    """shared_vocab: the code -> token-id map only picks rows (no shape depends on it). The plan reads it
    from the run's tokenizer when that exists, else uses the last ``num_codes`` rows and says so (a plan
    is made before the weights are on this machine). Returns whether the placeholder was used."""
    im = cfg.model.image
    if im.get("layout", "two_heads") != "shared_vocab" or tuple(im.code_token_ids):
        return False
    from uvjax.data.tokenizer import TextTokenizer, image_code_ids, with_image_tokens
    n, v = int(im.num_codes), int(cfg.model.vocab_size)
    path = cfg.data.get("tokenizer", "") or ""
    if path and os.path.exists(os.path.join(path, "tokenizer.json")):
        ids, placeholder = image_code_ids(with_image_tokens(TextTokenizer.load(path), n), n), False
    else:
        ids, placeholder = tuple(range(v - n, v)), True
    with cfg.unlocked():
        cfg.model.image.code_token_ids = ids
    return placeholder


def plan(cfg, topology: str, *, mfu: float = 0.4, backend: str = "auto") -> dict:
    chip, n = parse_topology(topology)
    import jax
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

    import numpy as np
    from uvjax.config import model_config, validate
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.flops import train_flops_per_step
    from uvjax.training.sharding import make_mesh, check_batch_divisibility
    from uvjax.training.step import make_train_step, plan_trainer

    validate(cfg)
    mesh = make_mesh(cfg.mesh.shape, devices)
    check_batch_divisibility(cfg.train.batch_size, cfg.train.grad_accum, mesh, 1)
    placeholder_map = _image_vocabulary_for_plan(cfg)
    model = UnifiedModel(model_config(cfg).validate())
    trainer, abs_state, _ = plan_trainer(model, cfg, mesh, cfg.sharding.rules)
    B, T = int(cfg.train.batch_size), int(cfg.train.seq_len)
    batch = {k: jax.ShapeDtypeStruct((B, T), np.int32) for k in
             ("tokens", "modality", "text_target", "image_target", "segment_ids", "positions")}
    if "features" in (cfg.model.image.input_kind, cfg.model.image.output_kind):
        batch["features"] = jax.ShapeDtypeStruct((B, T, int(cfg.model.image.feature_dim)), np.float32)
    step = make_train_step(trainer, batch)
    b_sh = trainer.batch_shardings(batch)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in batch.items()}
    t0 = time.time()
    lowered = step.lower(abs_state, batch)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError: the compiler ran out of memory for this program)
        need = _exhausted_bytes(str(e))
        if need is None:
            raise
        compiled = None
    compile_s = time.time() - t0
    # the chip cannot hold the step's temporaries: an answer (the bytes it needed), not a traceback
    mem = compiled.memory_analysis() if compiled is not None else None
    per_dev = {
        "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0)),
        "output_bytes": int(getattr(mem, "output_size_in_bytes", 0)),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else need,
        "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
        "generated_code_bytes": int(getattr(mem, "generated_code_size_in_bytes", 0)),
    }
    # donated state aliases its outputs: peak ≈ arguments + temporaries + non-aliased outputs
    peak = per_dev["argument_bytes"] + per_dev["temp_bytes"] + max(per_dev["output_bytes"] - per_dev["alias_bytes"], 0)
    hbm_gib, tflops = CHIPS[chip]
    m = cfg.model
    n_text = T * 0.375
    n_img = T * 0.375
    fl = train_flops_per_step(batch=B, seq=T, hidden=m.hidden, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads,
                              head_dim=m.head_dim or m.hidden // m.heads, intermediate=m.intermediate,
                              vocab=m.vocab_size, num_codes=m.image.num_codes, text_targets=n_text,
                              image_targets=n_img, lora_rank=m.lora.rank, lora_targets=tuple(m.lora.targets),
                              base_trainable=any(p in (".*", "params/.*") for p in cfg.train.trainable))
    n_chips = len(devices)
    step_s = fl["total"] / (n_chips * tflops * 1e12 * mfu) if tflops else None
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abs_state.trainable)) + \
        sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abs_state.frozen))
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abs_state.trainable))
    return {
        "topology": topology, "chip": chip, "devices": n_chips, "backend": "tpu (deviceless AOT)" if real else "cpu",
        "approximate": not real, "mesh": dict(mesh.shape), "global_batch": B, "seq_len": T,
        "params": n_params, "trainable_params": n_train,
        "per_device": per_dev, "peak_bytes_per_device": peak, "hbm_bytes_per_chip": int(hbm_gib * 2 ** 30),
        "headroom_bytes": int(hbm_gib * 2 ** 30) - peak, "fits": peak <= hbm_gib * 2 ** 30,
        "flops_per_step": fl["total"], "assumed_mfu": mfu, "expected_step_s": step_s,
        "expected_tokens_per_s": (B * T / step_s) if step_s else None, "compile_s": compile_s,
        "code_token_map": "placeholder (no tokenizer here; shapes only)" if placeholder_map else None,
        "compiler_out_of_memory": compiled is None,
    }


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
    pd = r["per_device"]
    lines = [
        f"plan for {r['topology']} ({r['devices']} devices, backend {r['backend']}"
        + (", APPROXIMATE memory" if r["approximate"] else "") + f"), mesh {r['mesh']}",
        f"  params {r['params'] / 1e6:.1f} M (trainable {r['trainable_params'] / 1e6:.1f} M), global batch "
        f"{r['global_batch']} x {r['seq_len']}",
        f"  per device: arguments {gib(pd['argument_bytes'])}, temporaries {gib(pd['temp_bytes'])}, outputs "
        f"{gib(pd['output_bytes'])} (aliased {gib(pd['alias_bytes'])}) -> peak {gib(r['peak_bytes_per_device'])}",
        f"  chip HBM {gib(r['hbm_bytes_per_chip'])}, headroom {gib(r['headroom_bytes'])}: "
        + ("FITS" if r["fits"] else "DOES NOT FIT"),
        f"  {r['flops_per_step'] / 1e12:.2f} TFLOP per step; at MFU {r['assumed_mfu']:.0%}: "
        + (f"{r['expected_step_s']:.3f} s/step, {r['expected_tokens_per_s']:.0f} tokens/s" if r["expected_step_s"]
           else "n/a"),
        f"  compile {r['compile_s']:.1f} s",
    ] + ([f"  code -> token map: {r['code_token_map']}"] if r.get("code_token_map") else []) \
      + (["  the compiler ran out of memory: the temporaries alone need the size above (arguments not "
          "counted); fewer sequences or shorter ones per chip, or a larger chip"] if r.get("compiler_out_of_memory") else [])
    return "\n".join(lines)


def main(argv):
    del argv
    chip, n = parse_topology(FLAGS.topology)
    import jax
    if chip not in TPU_NAMES or FLAGS.backend == "cpu":
        jax.config.update("jax_num_cpu_devices", n)
    if FLAGS.backend == "cpu" or chip not in TPU_NAMES:
        jax.config.update("jax_platforms", "cpu")
    r = plan(FLAGS.config, FLAGS.topology, mfu=FLAGS.mfu, backend=FLAGS.backend)
    print(format_report(r))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(r, f, indent=2)
    sys.exit(0 if r["fits"] else 1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
