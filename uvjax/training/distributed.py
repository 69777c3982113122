"""Multi-controller start-up: the same command on every host.

``initialize`` calls ``jax.distributed.initialize`` when there is more than one process: from explicit
flags (``--coordinator``, ``--num_processes``, ``--process_id``: the localhost launcher and tests), or
from the environment JAX detects itself (TPU pod workers, SLURM). On CPU it also selects gloo
collectives and the number of local CPU devices. Failures name what was tried.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint  # noqa: F401  (defines the barrier flag checkpoint_barriers_through_coordinator sets)
from absl import flags, logging


def _cluster_env() -> str | None:
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        if "," in hosts:
            return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, cpu_devices: int | None = None, timeout_s: int = 300) -> dict:
    """Starts the distributed runtime if needed (call before any other JAX use). Returns a summary."""
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    explicit = coordinator is not None or (num_processes or 1) > 1
    env = None if explicit else _cluster_env()
    if not explicit and env is None:
        return {"mode": "single", "process_index": 0, "process_count": 1}
    if explicit:
        missing = [n for n, v in (("--coordinator", coordinator), ("--num_processes", num_processes),
                                  ("--process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-process start needs {missing} (got coordinator={coordinator}, "
                             f"num_processes={num_processes}, process_id={process_id})")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
    gloo = jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu"
    if gloo:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if explicit:
            jax.distributed.initialize(coordinator, int(num_processes), int(process_id),
                                       initialization_timeout=int(timeout_s))
        else:
            jax.distributed.initialize(initialization_timeout=int(timeout_s))
    except Exception as e:  # the runtime's own errors are terse; say what we tried
        raise RuntimeError(f"jax.distributed.initialize failed ({'flags' if explicit else env}: coordinator="
                           f"{coordinator}, num_processes={num_processes}, process_id={process_id}, timeout "
                           f"{timeout_s}s): {e}") from e
    if gloo:
        checkpoint_barriers_through_coordinator()
    info = {"mode": "flags" if explicit else env, "process_index": jax.process_index(),
            "process_count": jax.process_count(), "local_devices": jax.local_device_count(),
            "global_devices": jax.device_count()}
    logging.info("distributed runtime up: %s", info)
    return info


ORBAX_BARRIER_FLAG = "experimental_orbax_use_distributed_barrier"


def checkpoint_barriers_through_coordinator() -> None:
    """Orbax's checkpoint barriers wait on the coordination service instead of a gloo collective (CPU runs).

    By default orbax synchronises hosts with a collective over a device set of its own; with gloo, every
    process must enter it within gloo's fixed 30 s, its context set-up included, so a host that reached a
    checkpoint more than 30 s after the other (a slower step on a loaded 2-core machine) failed the run with
    "Gloo context initialization failed: DEADLINE_EXCEEDED". The coordinator's barrier waits up to orbax's
    barrier timeout (300 s) and needs no collective. Orbax reads its absl flag when it synchronises, so this
    takes effect where absl has parsed the flags: `python -m uvjax.train` and the launchers that run it."""
    if ORBAX_BARRIER_FLAG not in flags.FLAGS:
        logging.warning("orbax has no --%s flag: checkpoint barriers stay gloo collectives", ORBAX_BARRIER_FLAG)
        return
    setattr(flags.FLAGS, ORBAX_BARRIER_FLAG, True)
