"""What checkpoint integrity costs (issue #33): digests, read-back verification, checked restore, the probe.

For a train state of the default first run (``configs/vqvq.py``, 3 layers) and a synthetic state of
``--mb`` MB of float32 arrays, each number the median of ``--repeats``:

- ``digest_s``: the on-device digests of every array (``training/integrity.tree_digests``) and their GB/s;
- ``orbax_save_s`` / ``orbax_restore_s``: plain orbax (synchronous save, restore onto the same shardings);
- ``save_s`` / ``verify_s`` / ``restore_s``: uvjax's ``Checkpointer`` (digests at save; read-back + digests once
  the save has finished; digests checked at restore);
- for the first-run state only: ``probe_compile_s`` / ``probe_s``: the forward-only loss a restored state must
  reproduce (compiled once per run, one call per checkpoint), beside ``train_step_s``.

``python benchmarks/checkpoint.py [--mb 256] [--repeats 3] [--out benchmarks/results/checkpoint.json]``
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from benchmarks.common import idle_check, machine, machine_line, write_json  # noqa: E402
from uvjax.training.checkpoint import Checkpointer  # noqa: E402
from uvjax.training.integrity import tree_digests  # noqa: E402


def _median(fn, repeats):
    ts = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "size")
               and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def measure(state, repeats, root):
    template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    tree_digests(state)  # compile
    out = {"state_mb": _nbytes(state) / 2**20, "arrays": len(jax.tree_util.tree_leaves(state))}
    out["digest_s"] = _median(lambda i: tree_digests(state), repeats)
    out["digest_gb_per_s"] = out["state_mb"] / 1024 / max(out["digest_s"], 1e-9)

    plain = os.path.join(root, "plain")
    mgr = ocp.CheckpointManager(plain, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False,
                                                                           max_to_keep=None))
    out["orbax_save_s"] = _median(lambda i: mgr.save(i + 1, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state))), repeats)
    out["orbax_restore_s"] = _median(lambda i: mgr.restore(i + 1, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template))), repeats)
    mgr.close()

    ck = Checkpointer(os.path.join(root, "uvjax"), keep=repeats + 2, async_save=False)
    saves, verifies = [], []
    for i in range(repeats):
        t = time.perf_counter()
        ck.save(i + 1, state)  # waits for (and verifies) the previous step first: timed apart below
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        ck.wait()  # read back + digests of step i + 1
        verifies.append(time.perf_counter() - t)
    out["save_s"] = statistics.median(saves)
    out["verify_s"] = statistics.median(verifies)
    out["restore_s"] = _median(lambda i: ck.restore(i + 1, template), repeats)
    ck.close()
    return out


def first_run_state():
    """The first run's LM shape (``benchmarks/train_step.py``'s ``tiny`` = configs/vqvq.py's default model)."""
    from benchmarks.train_step import build
    from uvjax.config import model_config
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.sharding import make_mesh
    from uvjax.training.step import create_trainer
    cfg, batch, _ = build("tiny")
    mesh = make_mesh(cfg.mesh.shape)
    model = UnifiedModel(model_config(cfg).validate())
    trainer, state = create_trainer(model, cfg, mesh, cfg.sharding.rules)
    return cfg, trainer, mesh, state, batch


def probe_cost(trainer, mesh, state, local_batch, repeats):
    from uvjax.training.sharding import global_batch_from_local
    from uvjax.training.step import make_probe_loss, make_train_step
    batch = global_batch_from_local(local_batch, mesh)
    t = time.perf_counter()
    probe = make_probe_loss(trainer, batch)
    jax.block_until_ready(probe(state, batch))
    compile_s = time.perf_counter() - t
    probe_s = _median(lambda i: jax.block_until_ready(probe(state, batch)), repeats)
    step = make_train_step(trainer, batch)
    holder = {"s": jax.tree_util.tree_map(lambda x: x.copy() if hasattr(x, "copy") else x, state)}

    def one(i):
        holder["s"], m = step(holder["s"], batch)
        jax.block_until_ready(m)
    one(0)  # compile
    step_s = _median(one, repeats)
    return {"probe_compile_s": compile_s, "probe_s": probe_s, "train_step_s": step_s}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/checkpoint.json")
    args = ap.parse_args()
    print(machine_line())
    idle = idle_check()
    rows = {}
    cfg, trainer, mesh, state, batch = first_run_state()
    with tempfile.TemporaryDirectory() as root:
        rows["first_run_state"] = {**measure(state, args.repeats, os.path.join(root, "a")),
                                   **probe_cost(trainer, mesh, state, batch, args.repeats)}
        n = args.mb * 2**20 // 4 // 8
        rng = np.random.default_rng(0)
        big = {f"w{i}": jnp.asarray(rng.standard_normal(n, dtype=np.float32)) for i in range(8)}
        rows[f"synthetic_{args.mb}mb"] = measure(big, args.repeats, os.path.join(root, "b"))
        shutil.rmtree(root, ignore_errors=True)
    write_json(args.out, {"machine": machine(), "idle": idle, "results": rows})
    keys = ("state_mb", "digest_s", "digest_gb_per_s", "orbax_save_s", "save_s", "verify_s", "orbax_restore_s",
            "restore_s")
    print("| state | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    fr = rows["first_run_state"]
    print(f"probe: compile {fr['probe_compile_s']:.2f} s, call {fr['probe_s'] * 1e3:.1f} ms "
          f"(train step {fr['train_step_s'] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
