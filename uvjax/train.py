"""``python -m uvjax.train --config=configs/vqvq.py[:preset] --workdir=DIR [--config.a.b=v ...]``

One readable loop: config → mesh → model + sharded state → data iterator → restore (if the work dir
has a checkpoint) → steps with logging, checkpoints and a progress bar → final checkpoint.
SIGTERM/SIGINT save a checkpoint and exit 0; rerunning the same command resumes exactly.

The work directory may be a local path or a ``gs://`` URL (``uvjax/storage_paths.py``): checkpoints, metrics,
TensorBoard, ``config.json`` and the lock then live in the bucket; a ``gs://`` tokenizer directory is read
through a local copy under ``$UVJAX_CACHE`` (default ``~/.cache/uvjax``).
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
from absl import app, flags, logging
from tqdm import tqdm

from uvjax import cli, interrupt
from uvjax import storage_paths as sp
from uvjax.config import model_config, resolve_config_argv, validate
from uvjax.evaluation import run as evaluation  # evaluation.evaluate_run: module access, so tests can stub it
from uvjax.evaluation.curves import plot_run_curves
from uvjax.evaluation.heldout import evaluate_imported_run, is_imported_run
from uvjax.evaluation.summary import run_summary_table
from uvjax.inference.loading import LoadedRun
from uvjax.integrity_files import changed_inputs, input_digests
from uvjax.locks import WorkdirLockedError
from uvjax.models.unified import UnifiedModel
from uvjax.remote_lock import lock_for_workdir
from uvjax.stage_log import StageLog, fingerprint as stage_fingerprint
from uvjax.stages.features import evaluation_kwargs
from uvjax.stages.prepare import prepare
from uvjax.training.checkpoint import Checkpointer, CheckpointError, RestoreRefused, abstract_like
from uvjax.training.codebook_init import init_codebook_from_vq
from uvjax.training.data_feed import build_data_iterator
from uvjax.training.distributed import initialize
from uvjax.training.guard import StepGuard, data_position, nonfinite_leaves
from uvjax.training.metrics import MetricWriter
from uvjax.training.optimizer import learning_rates, merge_variables
from uvjax.training.restore_probe import RestoreProbe
from uvjax.training.sharding import check_batch_divisibility, global_batch_from_local, make_mesh
from uvjax.training.step import create_trainer, make_train_step
from uvjax.training.workdir import (
    bind_image_vocabulary,
    check_workdir_matches,
    load_text_tokenizer,
    resolve_workdir,
    run_inputs,
)
from uvjax.weights import pretrained  # module access: tests stub load_base_into_state

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (idempotent: experiment drivers and tests import this module beside others)."""
    cli.define_config_flag()
    cli.define_workdir_flag()
    if "coordinator" in FLAGS:
        return
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs; TPU/SLURM detect it)")
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
    flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")
    flags.DEFINE_integer("cpu_devices", None, "CPU devices per process (CPU testing of meshes)")
    flags.DEFINE_integer("distributed_timeout", 300, "seconds to wait for all processes to join")


define_flags()


def _quick_eval(cfg, model, state, workdir: str, step: int, writer) -> None:
    """The quick evaluation (a few test images) on the in-memory parameters, logged at ``step``: eval/...
    scalars, the table as text and the generation / VQ reconstruction grids as images (nothing written to
    eval/); needs the stages' VQ tokenizer (and a cached judge for generation scores)."""
    variables = jax.device_get(merge_variables(state.trainable, state.frozen))
    run = LoadedRun(cfg=cfg, model=model, variables=variables, tokenizer=load_text_tokenizer(cfg, workdir),
                    step=step, workdir=workdir)
    judge_preset = str(cfg.stages.evaluate.get("judge_preset", "full")) if cfg.get("stages") else "full"
    try:
        report = evaluation.evaluate_run(workdir, quick=True, num_images=int(cfg.train.get("eval_images", 0) or 0) or None,
                                         judge_preset=judge_preset, loaded=run, write=False)
    except FileNotFoundError as e:  # no VQ/judge yet: training goes on, the reason is logged once
        logging.warning("quick evaluation skipped at step %d: %s", step, e)
        return
    evaluation.log_evaluation(writer, report, step)


def run(cfg, workdir: str, *, data_iterator=None, progress: bool | None = None) -> dict:
    """Trains to ``cfg.train.steps`` (resuming if possible). Returns a summary dict. Holds the work
    directory's lock (``uvjax/locks.py``): a second run on the same directory is refused."""
    with lock_for_workdir(workdir, enabled=jax.process_index() == 0) as lease:
        stop = interrupt.StopFlag()
        stop.install()
        try:
            return _run(cfg, workdir, data_iterator=data_iterator, progress=progress, lease=lease, stop=stop)
        finally:
            stop.restore()


def _run(cfg, workdir: str, *, data_iterator=None, progress: bool | None = None, lease=None, stop=None) -> dict:
    validate(cfg)
    sp.makedirs(workdir)
    primary = jax.process_index() == 0
    if stop is None:
        stop = interrupt.StopFlag()

    mesh = make_mesh(cfg.mesh.shape)
    local_batch = check_batch_divisibility(cfg.train.batch_size, cfg.train.grad_accum, mesh, jax.process_count())
    if data_iterator is None or cfg.data.get("tokenizer"):
        bind_image_vocabulary(cfg, workdir)
    model = UnifiedModel(model_config(cfg).validate())
    t0 = time.time()
    trainer, state = create_trainer(model, cfg, mesh, cfg.sharding.rules)
    it = data_iterator if data_iterator is not None else build_data_iterator(cfg, workdir, local_batch)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpoint,
                        readback=bool(cfg.train.get("checkpoint_readback", True)))
    guard = StepGuard.from_config(cfg, workdir, primary)
    probe = RestoreProbe(trainer, mesh, float(cfg.train.get("probe_tolerance", 1e-3)))
    pushback: list = []  # (position, local batch) peeked while validating the restored step
    inputs = input_digests(run_inputs(cfg, workdir)) if data_iterator is None else {}

    def check_restored(restored, step):
        """A restored step must hold finite parameters and give the loss recorded for the batch after it."""
        bad = nonfinite_leaves(restored["state"].trainable)
        if bad:
            raise ValueError(f"non-finite parameters in {bad}")
        pushback.clear()
        changed = changed_inputs((restored.get("meta") or {}).get("inputs"), inputs)
        if changed:
            raise RestoreRefused(f"checkpoint step {step} was trained with other files than this run would read: "
                                 f"{'; '.join(changed)}. Restore the original files (a damaged stage: see the "
                                 f"message of its check), or train in a new work directory")
        if "data_json" in restored:
            it.set_state(restored["data_json"])
        recorded = ckpt.probe(step)
        if recorded is None or not hasattr(it, "get_state"):
            logging.info("checkpoint step %d has no loss probe; restored on its digests alone", step)
            return
        position = data_position(it)
        local = next(it)
        pushback.append((position, local))
        probe.check(step, restored["state"], global_batch_from_local(local, mesh), recorded)

    start, restored, unreadable = ckpt.restore_latest(abstract_like(state, trainer.state_shardings), it,
                                                      with_meta=True, validate=check_restored)
    if start:
        state = restored["state"]
        guard.load_state_dict((restored.get("meta") or {}).get("guard"))
        logging.info("resumed from %s at step %d", ckpt.directory, start)
    else:  # a fresh run starts from the pretrained LLM when config.model.pretrained is set
        state = pretrained.load_base_into_state(state, trainer, cfg)
        state = init_codebook_from_vq(state, trainer, cfg)
    if primary:
        sp.atomic_write_text(sp.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2))
    writer = MetricWriter(workdir, enabled=primary, config=cfg)  # + HParams, + W&B if train.wandb.enabled
    meta = {"config": json.loads(cfg.to_json_best_effort()), "inputs": inputs}

    total = int(cfg.train.steps)
    if int(cfg.train.get("stop_at", 0) or 0) > 0:
        total = min(total, int(cfg.train.stop_at))
    step_fn = None
    bar = None
    show = cfg.train.progress if progress is None else progress
    if show and primary and start < total:
        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
    last_saved = start
    save_due = False  # a checkpoint deferred because the last update was skipped
    halted = None
    step = start
    compile_s = None
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    t_log, n_log = time.time(), 0

    def save(step_now):
        """Saves unless the last update was skipped or the parameters are not finite (then: not yet /
        halt). Returns a halt message or None."""
        nonlocal last_saved, save_due
        msg = guard.flush()
        if msg:
            return msg
        if guard.consecutive:
            save_due = True
            logging.warning("step %d: not checkpointing while the last %d update(s) were skipped; the last good "
                            "checkpoint is step %d", step_now, guard.consecutive, last_saved)
            return None
        bad = nonfinite_leaves(state.trainable)
        if bad:
            return f"step {step_now}: non-finite parameters {bad}: not saved"
        probe.record(ckpt)
        meta["guard"] = guard.state_dict()
        _save(ckpt, step_now, state, it, meta, writer, lease)
        probe.arm(step_now)
        last_saved, save_due = step_now, False
        return None

    while step < total and not stop:
        if pushback:
            position, local = pushback.pop()
        else:
            position = data_position(it)  # names the batch if its update is skipped (training/guard.py)
            local = next(it)
        batch = global_batch_from_local(local, mesh)
        if step_fn is None:
            step_fn = make_train_step(trainer, batch)
            tc = time.time()
        probe.observe(state, batch, position)  # the batch after a checkpoint: its loss proves that step
        state, metrics = step_fn(state, batch, guard.max_loss(step + 1))
        halted = guard.push(step + 1, position, metrics)
        if halted:
            break
        if compile_s is None:
            jax.block_until_ready(metrics)
            compile_s = time.time() - tc
            t_log, n_log = time.time(), -1  # the compiling step is not timed
        step += 1
        n_log += 1
        if step % cfg.train.log_every == 0 or step == total or stop:
            halted = guard.flush()
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            m.update({f"skipped/{k}_total": float(v) for k, v in guard.counts.items()})
            dt = time.time() - t_log
            if n_log > 0:
                m["tokens_per_s"] = n_log * tokens_per_step / max(dt, 1e-9)
            m.update(learning_rates(cfg.optim, int(cfg.train.steps), step - 1))
            for k, v in getattr(it, "counts", {}).items():
                m[f"data/{k}"] = float(v)
            t_log, n_log = time.time(), 0
            writer.write(step, m)
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.4f}", text=f"{m['loss/text']:.3f}", image=f"{m['loss/image']:.3f}")
            if m["tokens/dropped_targets"] > 0:
                halted = (f"step {step}: {int(m['tokens/dropped_targets'])} targets exceeded the logits capacity; "
                          f"raise loss.text_target_capacity / loss.image_target_capacity")
            if halted:
                break
        if bar is not None:
            bar.update(1)
        if (step % cfg.train.checkpoint_every == 0 or save_due) and step < total:
            halted = save(step)
            if halted:
                break
        eval_every = int(cfg.train.get("eval_every", 0) or 0)
        if eval_every and step % eval_every == 0 and step < total and primary and cfg.stages.build:
            _quick_eval(cfg, model, state, workdir, step, writer)
    if bar is not None:
        bar.close()
    halted = halted or guard.flush()
    if not halted and step > last_saved:
        halted = save(step)
        if not halted and guard.consecutive:  # the run ends on skipped updates: they are not saved
            halted = (f"step {step}: the run ends on {guard.consecutive} skipped update(s); not checkpointed "
                      f"(details in skipped_updates.jsonl)")
        if not halted and (not stop or probe.ready):  # the last checkpoint's probe: peek the next batch
            probe.peek_final(ckpt, step, state, it)
    if halted:
        try:
            probe.record(ckpt)
            ckpt.close()
        finally:
            writer.close()
        raise RuntimeError(halted + f"; last good checkpoint: step {last_saved} in {ckpt.directory}")
    probe.record(ckpt)
    _close(ckpt, writer)
    if data_iterator is None and hasattr(it, "close"):
        it.close()
    if stop and primary:
        if step > start:
            logging.warning("stopped by signal %s at step %d; checkpoint saved", stop.signal, step)
        elif start:
            logging.warning("stopped by signal %s before a step ran; the checkpoint of step %d is unchanged",
                            stop.signal, start)
        else:
            logging.warning("stopped by signal %s before the first step completed: nothing to save yet",
                            stop.signal)
    return {"step": step, "steps_run": step - start, "stopped_by_signal": bool(stop), "compile_s": compile_s,
            "data": {k: int(v) for k, v in getattr(it, "counts", {}).items()},
            "wall_s": time.time() - t0, "workdir": workdir, "checkpoint_step": step if step else None,
            "unreadable_checkpoints": unreadable, "skipped_updates": dict(guard.counts),
            "unverified_checkpoints": ckpt.failed_verification}


def _save(ckpt, step, state, it, meta, writer, lease=None) -> None:
    """A failed save (disk full ...) stops the run with CheckpointError naming the last good step. The
    metrics logged so far are flushed first (on gs:// they are appended in batches). On a ``gs://`` work
    dir the lease is verified first (one request): a run that lost its lock to another must not write a
    checkpoint over the other's (``WorkdirLockedError``)."""
    if lease is not None and hasattr(lease, "verify"):
        try:
            lease.verify()
        except Exception:
            _close(ckpt, writer, quiet=True)
            raise
    writer.flush()
    try:
        ckpt.save(step, state, it, meta)
    except CheckpointError:
        _close(ckpt, writer, quiet=True)
        raise


def _close(ckpt, writer, quiet: bool = False) -> None:
    try:
        ckpt.close()
    except Exception:  # noqa: BLE001
        if not quiet:
            raise
    finally:
        writer.close()


def run_all(cfg, workdir: str) -> dict:
    """The whole first run: cached stages (if ``stages.build``), the LM, then evaluation."""
    times, paths = {}, {}
    t = time.time()
    if cfg.stages.build:
        try:
            with interrupt.stop_on_signals():
                cfg, paths = prepare(cfg, workdir)
        except interrupt.StopRequested as e:
            print(f"[stage] stopped by signal {e.args[0]} during the stages: finished stages (and finished chunks "
                  "of the pre-tokenisation) are kept; run the same command again to resume", flush=True)
            return {"stopped_by_signal": True, "stopped_in": "stages", "workdir": workdir}
        times["stages"] = time.time() - t
    fp = check_workdir_matches(cfg, workdir)
    curves = (cfg.stages.build and int(cfg.train.get("eval_every", 0) or 0) > 0 and not is_imported_run(cfg)
              and "generation" in tuple(cfg.stages.evaluate.get("tasks", ())))
    if curves and jax.process_index() == 0:  # the learning curves read generated images from the first one on
        t = time.time()
        judge_dir, reused = evaluation.ensure_judge(workdir, cfg, progress=bool(cfg.train.progress))
        times["judge"] = time.time() - t
        StageLog(workdir).write(stage="judge", fingerprint=stage_fingerprint("judge", judge_dir), reused=reused,
                                seconds=times["judge"], path=judge_dir)
        print(f"[stage] judge: {'reused' if reused else 'trained'} {judge_dir} ({times['judge']:.0f} s)", flush=True)
    t = time.time()
    summary = run(cfg, workdir)
    times["train"] = time.time() - t
    StageLog(workdir).write(stage="lm", fingerprint=fp, reused=summary.get("steps_run", 1) == 0,
                            seconds=times["train"], path=workdir)
    summary.update(stage_seconds=times, stage_paths=paths, seq_len=int(cfg.train.seq_len))
    evaluate = cfg.stages.build and cfg.stages.evaluate.enabled and not summary["stopped_by_signal"]
    if evaluate:
        t = time.time()
        imported = is_imported_run(cfg)
        if imported:  # other people's data: the run's own held-out split
            if paths.get("test_split"):
                n = int(cfg.stages.evaluate.get("num_images", 0) or 0)
                summary["evaluation"] = evaluate_imported_run(workdir, num_records=n or None,
                                                              progress=bool(cfg.train.progress))
                times["evaluate"] = time.time() - t
                StageLog(workdir).write(stage="evaluate", fingerprint=fp, reused=False, seconds=times["evaluate"],
                                        path=workdir)
            else:
                print("[stage] evaluate: no held-out split (stages.source.test is empty); skipped", flush=True)
        else:  # the Smart Watch test split, read by the judge
            tasks = tuple(cfg.stages.evaluate.get("tasks", ("vqa", "caption", "generation")))
            n = int(cfg.stages.evaluate.get("num_images", 0) or 0)
            # the final evaluation's grids, reconstructions and table go to TensorBoard (and W&B) at the last step
            writer = MetricWriter(workdir, enabled=jax.process_index() == 0, config=cfg)
            try:
                summary["evaluation"] = evaluation.evaluate_run(
                    workdir, quick=bool(cfg.stages.evaluate.quick), tasks=tasks, num_images=n or None,
                    judge_preset=str(cfg.stages.evaluate.get("judge_preset", "full")),
                    progress=bool(cfg.train.progress), writer=writer, **evaluation_kwargs(workdir, cfg))
            finally:
                writer.close()
            if jax.process_index() == 0:
                plotted = plot_run_curves(workdir)
                if plotted:
                    print(f"[stage] learning curves: {plotted}", flush=True)
            times["evaluate"] = time.time() - t
            StageLog(workdir).write(stage="evaluate", fingerprint=fp, reused=False, seconds=times["evaluate"],
                                    path=workdir)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.verbosity <= 0:  # orbax logs every save at INFO; keep the console for the progress bar
        logging.set_verbosity(logging.WARNING)
    initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, cpu_devices=FLAGS.cpu_devices,
               timeout_s=FLAGS.distributed_timeout)
    cfg = FLAGS.config
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/vqvq.py")
    workdir = resolve_workdir(cfg, FLAGS.workdir)
    try:  # the lock covers the stages too; run() takes it again (re-entrant); gs://: a lease object
        with lock_for_workdir(workdir, enabled=jax.process_index() == 0):
            summary = run_all(cfg, workdir)
    except WorkdirLockedError as e:
        raise SystemExit(f"uvjax.train: {e}") from None
    if jax.process_index() == 0:
        print(run_summary_table(summary, workdir))
    print(json.dumps({k: v for k, v in summary.items() if k != "evaluation"}, default=str))


def console_main():
    """``uvjax-train`` (the console script) and ``python -m uvjax.train``."""
    sys.argv = resolve_config_argv(sys.argv)
    app.run(main)


if __name__ == "__main__":
    console_main()
