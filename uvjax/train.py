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
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vqvq.py:tiny", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir or runs/<config.name>)")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs; TPU/SLURM detect it)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")
flags.DEFINE_integer("cpu_devices", None, "CPU devices per process (CPU testing of meshes)")
flags.DEFINE_integer("distributed_timeout", 300, "seconds to wait for all processes to join")


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self):
        self.signal = None

    def install(self):
        """Installs the handlers (main thread only) and remembers the ones they replace (``restore``)."""
        def handler(signum, frame):
            self.signal = signum
            logging.warning("received signal %d: will checkpoint and stop after this step", signum)
        self.previous = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            self.previous[s] = signal.getsignal(s)
            signal.signal(s, handler)

    def restore(self):
        """Puts back the handlers ``install`` replaced: after ``train.run`` returns, Ctrl-C (a notebook's
        "interrupt kernel") works as before."""
        for s, h in getattr(self, "previous", {}).items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self.previous = {}

    def __bool__(self):
        return self.signal is not None


def resolve_workdir(cfg, workdir: str | None) -> str:
    """An absolute local path, or a URL (``gs://bucket/run``) kept as it is."""
    from uvjax import storage_paths as sp
    return sp.resolve(workdir or cfg.workdir or os.path.join("runs", cfg.name))


def load_text_tokenizer(cfg, workdir: str):
    """The run's text tokenizer; a ``gs://`` directory is mirrored into the local cache first
    (``storage_paths.local_tree``, once per version of its files)."""
    from uvjax import storage_paths as sp
    from uvjax.data.tokenizer import TextTokenizer
    path = cfg.data.tokenizer or sp.join(workdir, "tokenizer")
    if not sp.exists(sp.join(path, "tokenizer.json")):
        from uvjax.weights.pretrained import pretrained_spec, save_base_tokenizer
        if pretrained_spec(cfg):  # a GGUF base carries its tokenizer inside: write it out once
            if sp.is_remote(path):  # written locally, then uploaded
                import tempfile
                with tempfile.TemporaryDirectory() as tmp:
                    save_base_tokenizer(cfg, tmp)
                    sp.upload(tmp, path)
            else:
                save_base_tokenizer(cfg, path)
    if not sp.exists(sp.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path} (config.data.tokenizer); the first-run stages "
                                f"train one, or point config.data.tokenizer at a directory that has it")
    path = sp.local_tree(path, sp.remote_cache_dir("trees"))  # a local path: itself, made absolute
    tok = TextTokenizer.load(path)
    if (cfg.model.get("image") or {}).get("layout", "two_heads") == "shared_vocab":  # codes are vocabulary rows
        from uvjax.data.tokenizer import with_image_tokens
        tok = with_image_tokens(tok, int(cfg.model.image.num_codes))
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size} tokens ({path})")
    return tok


class RowShardIterator:
    """``data.host_sharding='rows'``: every host runs the whole pipeline and keeps its rows of each
    global batch. Batches (and so losses) are then identical for any number of hosts, and the
    iterator state is the same on every host (saved once as JSON), so a checkpoint resumes on a
    different host count. Costs every host the full tokenisation; 'records' (default) scales instead."""

    state_is_global = True

    def __init__(self, it, process_index: int, process_count: int, local_batch: int):
        self.it, self.lo, self.hi = it, process_index * local_batch, (process_index + 1) * local_batch

    def __next__(self):
        return {k: v[self.lo:self.hi] for k, v in next(self.it).items()}

    def __iter__(self):
        return self

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    @property
    def counts(self):
        return getattr(self.it, "counts", {})

    def close(self):
        if hasattr(self.it, "close"):
            self.it.close()


def bind_image_vocabulary(cfg, workdir: str, tok=None) -> None:
    """shared_vocab: ``model.image.code_token_ids`` (code -> vocabulary id) read from the tokenizer's
    image-token names, once, into the config the run saves (so a loaded run needs no tokenizer to build
    its model); a map already in the config must equal the tokenizer's."""
    if cfg.model.image.get("layout", "two_heads") != "shared_vocab":
        return
    from uvjax.data.tokenizer import image_code_ids
    tok = tok or load_text_tokenizer(cfg, workdir)
    ids = image_code_ids(tok, int(cfg.model.image.num_codes))
    given = tuple(int(i) for i in cfg.model.image.code_token_ids)
    if given and given != ids:
        raise ValueError(f"model.image.code_token_ids differs from the tokenizer's image tokens (first code "
                         f"-> {given[0]} in the config, {ids[0]} in the tokenizer): the run was trained with "
                         f"another tokenizer")
    with cfg.unlocked():
        cfg.model.image.code_token_ids = ids


def run_inputs(cfg, workdir: str) -> dict[str, str]:
    """The files a trained LM is bound to beyond its config: the text tokenizer and, when the stages set
    ``model.image.codebook_from``, the VQ tokenizer (its weights and config). Their digests go into every
    checkpoint's metadata (``integrity_files.input_digests``)."""
    from uvjax import storage_paths as sp
    paths = {"tokenizer": sp.join(cfg.data.tokenizer or sp.join(workdir, "tokenizer"), "tokenizer.json")}
    vq = cfg.model.image.get("codebook_from", "") if hasattr(cfg.model.image, "get") else ""
    if vq:
        from uvjax.training.vq_train import PARAMS_FILE
        d = vq if sp.isdir(vq) else os.path.dirname(vq)
        paths["vq"] = sp.join(d, PARAMS_FILE)
        paths["vq_config"] = sp.join(d, "vq_config.json")
    return paths


def build_data_iterator(cfg, workdir: str, local_batch: int):
    """The real pipeline: grain over ArrayRecord shards of pre-tokenised records, this host's share."""
    import jax
    from uvjax.data import pipeline
    tok = load_text_tokenizer(cfg, workdir)
    data_cfg = cfg.data.copy_and_resolve_references()
    with data_cfg.unlocked():
        data_cfg.codebook_size = int(cfg.model.image.num_codes)
        if "features" in (cfg.model.image.input_kind, cfg.model.image.output_kind):
            data_cfg.feature_dim = int(cfg.model.image.feature_dim)
    mode = cfg.data.get("host_sharding", "records")
    if mode == "rows":
        full = pipeline.make_train_iterator(data_cfg, tok, seq_len=int(cfg.train.seq_len),
                                            local_batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed))
        return RowShardIterator(full, jax.process_index(), jax.process_count(), local_batch)
    if mode != "records":
        raise ValueError(f"data.host_sharding={mode!r}; expected 'records' or 'rows'")
    return pipeline.make_train_iterator(
        data_cfg, tok, seq_len=int(cfg.train.seq_len), local_batch_size=local_batch,
        process_index=jax.process_index(), process_count=jax.process_count(), seed=int(cfg.train.seed))


def init_codebook_from_vq(state, trainer, cfg):
    """Fresh runs: the model's code vectors (``params/image_codebook``, what the adapters read) start
    as the VQ tokenizer's own l2-normalised codebook, as in the paper (VQ features → adapter), instead
    of random unit vectors; codes that look alike then start alike. Needs ``model.image.codebook_from``
    (set by the stages to the VQ directory)."""
    src = cfg.model.image.get("codebook_from", "") if hasattr(cfg.model.image, "get") else ""
    if not src:
        return state
    import jax
    import numpy as np
    from uvjax.stages import VQCodec
    book = VQCodec(src).codebook().astype(np.float32)
    for part in ("trainable", "frozen"):
        tree = getattr(state, part)
        if "params" in tree and "image_codebook" in tree["params"]:
            old = tree["params"]["image_codebook"]
            if old.shape != book.shape:
                raise ValueError(f"model.image codebook {old.shape} != VQ codebook {book.shape} in {src}")
            new = jax.device_put(book.astype(old.dtype), old.sharding)
            tree = {**tree, "params": {**tree["params"], "image_codebook": new}}
            state = state.replace(**{part: tree})
    return state


def _quick_eval(cfg, model, state, workdir: str, step: int, writer) -> None:
    """The quick evaluation (a few test images) on the in-memory parameters, logged at ``step``: eval/...
    scalars, the table as text and the generation / VQ reconstruction grids as images (nothing written to
    eval/); needs the stages' VQ tokenizer (and a cached judge for generation scores)."""
    import jax
    from uvjax.evaluate import evaluate_run, log_evaluation
    from uvjax.inference.loading import LoadedRun
    from uvjax.training.optimizer import merge_variables
    variables = jax.device_get(merge_variables(state.trainable, state.frozen))
    run = LoadedRun(cfg=cfg, model=model, variables=variables, tokenizer=load_text_tokenizer(cfg, workdir),
                    step=step, workdir=workdir)
    try:
        report = evaluate_run(workdir, quick=True, loaded=run, write=False)
    except FileNotFoundError as e:  # no VQ/judge yet: training goes on, the reason is logged once
        logging.warning("quick evaluation skipped at step %d: %s", step, e)
        return
    log_evaluation(writer, report, step)


def run(cfg, workdir: str, *, data_iterator=None, progress: bool | None = None) -> dict:
    """Trains to ``cfg.train.steps`` (resuming if possible). Returns a summary dict. Holds the work
    directory's lock (``training/lock.py``): a second run on the same directory is refused."""
    import jax
    from uvjax.storage_paths import lock_for_workdir
    with lock_for_workdir(workdir, enabled=jax.process_index() == 0) as lease:
        stop = _StopFlag()
        stop.install()
        try:
            return _run(cfg, workdir, data_iterator=data_iterator, progress=progress, lease=lease, stop=stop)
        finally:
            stop.restore()


def _run(cfg, workdir: str, *, data_iterator=None, progress: bool | None = None, lease=None, stop=None) -> dict:
    import jax
    import numpy as np

    from uvjax.config import model_config, validate
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.checkpoint import Checkpointer, abstract_like
    from uvjax.training.guard import StepGuard, data_position, nonfinite_leaves
    from uvjax.training.metrics import MetricWriter
    from uvjax.training.optimizer import learning_rates
    from uvjax.training.sharding import check_batch_divisibility, global_batch_from_local, make_mesh
    from uvjax.training.step import create_trainer, make_train_step
    from uvjax import storage_paths as sp

    validate(cfg)
    sp.makedirs(workdir)
    primary = jax.process_index() == 0
    if stop is None:
        stop = _StopFlag()

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
    probe = _Probe(trainer, mesh, float(cfg.train.get("probe_tolerance", 1e-3)))
    pushback: list = []  # (position, local batch) peeked while validating the restored step
    from uvjax.integrity_files import changed_inputs, input_digests
    inputs = input_digests(run_inputs(cfg, workdir)) if data_iterator is None else {}

    def check_restored(restored, step):
        """A restored step must hold finite parameters and give the loss recorded for the batch after it."""
        bad = nonfinite_leaves(restored["state"].trainable)
        if bad:
            raise ValueError(f"non-finite parameters in {bad}")
        pushback.clear()
        changed = changed_inputs((restored.get("meta") or {}).get("inputs"), inputs)
        if changed:
            from uvjax.training.checkpoint import RestoreRefused
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
        from uvjax.weights.pretrained import load_base_into_state
        state = load_base_into_state(state, trainer, cfg)
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
        from tqdm import tqdm
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
            "wall_s": time.time() - t0, "workdir": workdir, "checkpoint_step": step if step else None,
            "unreadable_checkpoints": unreadable, "skipped_updates": dict(guard.counts),
            "unverified_checkpoints": ckpt.failed_verification}


class _Probe:
    """The loss a checkpointed state gives on the batch that follows it, recorded with the checkpoint and
    recomputed after a restore (no update): a state that does not reproduce it is refused.

    During training the probe of checkpoint t is computed on step t+1's batch from the state before that
    step (one forward pass per checkpoint, read when the next checkpoint is written); the last checkpoint
    of a run peeks the next batch instead. The batch's digest is recorded too: a resumed run whose data
    pipeline produces another batch there stops (``RestoreRefused``: the data changed, no older checkpoint
    would fix it)."""

    def __init__(self, trainer, mesh, tolerance: float):
        self.trainer, self.mesh, self.tolerance = trainer, mesh, float(tolerance)
        self.fn = None
        self.armed: int | None = None  # step of the checkpoint whose probe the next batch computes
        self.pending: tuple | None = None  # (step, position, batch digest, loss on device)

    @property
    def ready(self) -> bool:
        return self.fn is not None

    def _loss(self, state, batch):
        if self.fn is None:
            from uvjax.training.step import make_probe_loss
            self.fn = make_probe_loss(self.trainer, batch)
        return self.fn(state, batch)

    def arm(self, step: int) -> None:
        self.armed = int(step)

    def observe(self, state, batch, position) -> None:
        if self.armed is None:
            return
        from uvjax.training.integrity import tree_digests
        self.pending = (self.armed, position, tree_digests(batch), self._loss(state, batch))
        self.armed = None

    def record(self, ckpt) -> None:
        if self.pending is None:
            return
        import jax
        step, position, digests, loss = self.pending
        self.pending = None
        pos = position or {}
        ckpt.set_probe(step, {"loss": float(jax.device_get(loss)), "batch_index": pos.get("batch_index"),
                              "batch_digests": digests})

    def peek_final(self, ckpt, step: int, state, it) -> None:
        from uvjax.training.guard import data_position
        from uvjax.training.sharding import global_batch_from_local
        try:
            position = data_position(it)
            local = next(it)
        except StopIteration:
            return
        self.armed = int(step)
        self.observe(state, global_batch_from_local(local, self.mesh), position)
        self.record(ckpt)

    def check(self, step: int, state, batch, recorded: dict) -> None:
        from uvjax.training.checkpoint import RestoreRefused
        from uvjax.training.integrity import compare, tree_digests
        import jax
        diff = compare(recorded.get("batch_digests") or {}, tree_digests(batch))
        if recorded.get("batch_digests") and diff:
            raise RestoreRefused(
                f"the batch after checkpoint step {step} (batch index {recorded.get('batch_index')}) differs from "
                f"the one this run saw when it saved that step: {'; '.join(diff[:3])}. The training data or its "
                f"order changed under the run (a rebuilt or edited dataset, other data paths or data settings); "
                f"restore the original data, or train in a new work directory")
        got = float(jax.device_get(self._loss(state, batch)))
        want = float(recorded["loss"])
        if not abs(got - want) <= self.tolerance * max(1.0, abs(want)):
            raise ValueError(f"the restored state gives loss {got:.6g} on the batch after step {step}, but "
                             f"{want:.6g} was recorded when it was saved (train.probe_tolerance="
                             f"{self.tolerance:g}, relative)")
        logging.info("checkpoint step %d proved itself: loss %.6g on the next batch (recorded %.6g)", step, got,
                     want)


def _save(ckpt, step, state, it, meta, writer, lease=None) -> None:
    """A failed save (disk full ...) stops the run with CheckpointError naming the last good step. The
    metrics logged so far are flushed first (on gs:// they are appended in batches). On a ``gs://`` work
    dir the lease is verified first (one request): a run that lost its lock to another must not write a
    checkpoint over the other's (``WorkdirLockedError``)."""
    from uvjax.training.checkpoint import CheckpointError
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


LM_FINGERPRINT_EXCLUDE = {"train": ("steps", "stop_at", "log_every", "checkpoint_every", "keep_checkpoints",
                                    "async_checkpoint", "progress", "spike_factor", "spike_window", "halt_after_skips",
                                    "checkpoint_readback", "probe_tolerance", "wandb"),
                          "model": ("attention", "scan_unroll"),  # how the same function is computed
                          "loss": ("fused_head_chunk",)}


def lm_identity(cfg_dict: dict) -> dict:
    """The part of a config (as a dict) that the trained LM depends on."""
    d = json.loads(json.dumps(cfg_dict, sort_keys=True))
    for section, keys in LM_FINGERPRINT_EXCLUDE.items():
        for k in keys:
            d.get(section, {}).pop(k, None)
    d.pop("stages", None)
    d.pop("workdir", None)
    for k in ("workers", "read_threads"):  # how batches are made, not which: the LM does not depend on them
        d.get("data", {}).pop(k, None)
    pre = d.get("model", {}).get("pretrained")
    if isinstance(pre, dict) and not pre.get("peft_adapter"):  # unset: runs from before the key keep their LM
        pre.pop("peft_adapter", None)
    return d


def lm_fingerprint(cfg) -> str:
    """What the trained LM depends on; extending ``train.steps`` or logging knobs keeps the run."""
    from uvjax.stages import fingerprint
    return fingerprint("lm", lm_identity(json.loads(cfg.to_json_best_effort(sort_keys=True))))


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(keys only the new config has, keys whose value differs or that the new config lacks), between
    the LM identities of two configs."""
    from flax.traverse_util import flatten_dict
    a, b = (flatten_dict(lm_identity(c), keep_empty_nodes=True, sep=".") for c in (old, new))
    added = sorted(k for k in b if k not in a)
    changed = sorted(k for k in a if k not in b or a[k] != b[k])
    return added, changed


def check_workdir_matches(cfg, workdir: str) -> str:
    """Refuses to resume a work dir that holds a run of a different model/data config.

    The run's own ``config.json`` (written at every start) is compared key by key with the current config:
    a key that only the current one has — a setting added to uvjax since the run started, whose default
    keeps what older code computed — does not block the resume (it is logged); a changed or removed key
    does, and the error names it."""
    from uvjax import storage_paths as sp
    fp = lm_fingerprint(cfg)
    path = sp.join(workdir, "lm_fingerprint.json")
    ckpts = sp.join(workdir, "checkpoints")
    has_ckpt = sp.isdir(ckpts) and any(d.isdigit() for d in sp.listdir(ckpts))
    if has_ckpt and sp.exists(path):
        try:
            old = str(json.loads(sp.read_text(path))["fingerprint"])
        except (ValueError, KeyError, TypeError) as e:  # damaged: the run's config.json decides instead
            logging.warning("%s is damaged (%s: %s); comparing the config key by key with config.json instead",
                            path, type(e).__name__, e)
            old = "<damaged>"
        if old != fp:
            run_cfg = sp.join(workdir, "config.json")
            if not sp.exists(run_cfg):
                raise ValueError(f"{workdir} holds a run of a different config (fingerprint {old}, now {fp}; "
                                 f"no config.json to compare keys); use another --workdir, or delete it to retrain")
            try:
                saved = json.loads(sp.read_text(run_cfg))
            except ValueError as e:
                raise ValueError(f"{run_cfg} is damaged ({e}) and {path} does not match this config, so this run "
                                 f"cannot tell whether {workdir} holds the same model; restore config.json, or use "
                                 f"another --workdir") from None
            added, changed = config_changes(saved, json.loads(cfg.to_json_best_effort()))
            if changed:
                raise ValueError(f"{workdir} holds a run of a different config: {', '.join(changed[:12])}"
                                 f"{' …' if len(changed) > 12 else ''} differ from {run_cfg}; use another "
                                 f"--workdir, or delete it to retrain")
            if added:
                logging.warning("resuming %s: config keys added since the run started (taken at their "
                                "current values): %s", workdir, ", ".join(added))
    sp.makedirs(workdir)
    sp.atomic_write_text(path, json.dumps({"fingerprint": fp}))
    return fp


def run_all(cfg, workdir: str) -> dict:
    """The whole first run: cached stages (if ``stages.build``), the LM, then evaluation."""
    from uvjax.stages import StageLog
    times, paths = {}, {}
    t = time.time()
    if cfg.stages.build:
        from uvjax.stages import prepare
        from uvjax import interrupt
        try:
            with interrupt.stop_on_signals():
                cfg, paths = prepare(cfg, workdir)
        except interrupt.StopRequested as e:
            print(f"[stage] stopped by signal {e.args[0]} during the stages: finished stages (and finished chunks "
                  "of the pre-tokenisation) are kept; run the same command again to resume", flush=True)
            return {"stopped_by_signal": True, "stopped_in": "stages", "workdir": workdir}
        times["stages"] = time.time() - t
    fp = check_workdir_matches(cfg, workdir)
    t = time.time()
    summary = run(cfg, workdir)
    times["train"] = time.time() - t
    StageLog(workdir).write(stage="lm", fingerprint=fp, reused=summary.get("steps_run", 1) == 0,
                            seconds=times["train"], path=workdir)
    summary.update(stage_seconds=times, stage_paths=paths)
    evaluate = cfg.stages.build and cfg.stages.evaluate.enabled and not summary["stopped_by_signal"]
    if evaluate:
        t = time.time()
        try:
            from uvjax.evaluate import evaluate_run
        except ImportError:
            evaluate_run = None
        from uvjax.evaluation.heldout import evaluate_imported_run, is_imported_run
        if is_imported_run(cfg):  # other people's data: the run's own held-out split
            evaluate_run = None
            if paths.get("test_split"):
                n = int(cfg.stages.evaluate.get("num_images", 0) or 0)
                summary["evaluation"] = evaluate_imported_run(workdir, num_records=n or None,
                                                              progress=bool(cfg.train.progress))
                times["evaluate"] = time.time() - t
                StageLog(workdir).write(stage="evaluate", fingerprint=fp, reused=False, seconds=times["evaluate"],
                                        path=workdir)
            else:
                print("[stage] evaluate: no held-out split (stages.source.test is empty); skipped", flush=True)
        if evaluate_run is not None:
            from uvjax.stages_features import evaluation_kwargs
            tasks = tuple(cfg.stages.evaluate.get("tasks", ("vqa", "caption", "generation")))
            n = int(cfg.stages.evaluate.get("num_images", 0) or 0)
            import jax
            from uvjax.training.metrics import MetricWriter
            # the final evaluation's grids, reconstructions and table go to TensorBoard (and W&B) at the last step
            writer = MetricWriter(workdir, enabled=jax.process_index() == 0, config=cfg)
            try:
                summary["evaluation"] = evaluate_run(workdir, quick=bool(cfg.stages.evaluate.quick), tasks=tasks,
                                                     num_images=n or None, progress=bool(cfg.train.progress),
                                                     writer=writer, **evaluation_kwargs(workdir, cfg))
            finally:
                writer.close()
            times["evaluate"] = time.time() - t
            StageLog(workdir).write(stage="evaluate", fingerprint=fp, reused=False, seconds=times["evaluate"],
                                    path=workdir)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.verbosity <= 0:  # orbax logs every save at INFO; keep the console for the progress bar
        logging.set_verbosity(logging.WARNING)
    from uvjax.training.distributed import initialize
    initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, cpu_devices=FLAGS.cpu_devices,
               timeout_s=FLAGS.distributed_timeout)
    cfg = FLAGS.config
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/vqvq.py")
    workdir = resolve_workdir(cfg, FLAGS.workdir)
    import jax
    from uvjax.storage_paths import lock_for_workdir
    from uvjax.training.lock import WorkdirLockedError
    try:  # the lock covers the stages too; run() takes it again (re-entrant); gs://: a lease object
        with lock_for_workdir(workdir, enabled=jax.process_index() == 0):
            summary = run_all(cfg, workdir)
    except WorkdirLockedError as e:
        raise SystemExit(f"uvjax.train: {e}") from None
    if jax.process_index() == 0:
        print(run_summary_table(summary, workdir))
    print(json.dumps({k: v for k, v in summary.items() if k != "evaluation"}, default=str))


def run_summary_table(summary: dict, workdir: str) -> str:
    """What the first run prints at the end: the evaluation table (VQA and generation accuracy per
    attribute, Fréchet distance), wall time per stage of this invocation, and where to look."""
    from uvjax import storage_paths as sp
    from uvjax.stages import read_stage_log
    lines = []
    ev = summary.get("evaluation")
    if ev:
        if ev.get("split") == "heldout":
            from uvjax.evaluation.heldout import format_table
        else:
            from uvjax.evaluate import format_table
        lines += [format_table(ev), ""]
    log = read_stage_log(workdir)
    last = {}  # this invocation's entries: the stage log is appended to, one line per stage and run
    for rec in log:
        last[rec["stage"]] = rec
    if last:
        lines.append("stage        wall s  cached  path")
        for name, rec in last.items():
            lines.append(f"{name:<12} {float(rec['seconds']):7.1f}  {'yes' if rec['reused'] else 'no':>6}  {rec['path']}")
        lines.append(f"{'total':<12} {sum(float(r['seconds']) for r in last.values()):7.1f}")
    files = (ev or {}).get("files", {})
    lines += ["", f"generations (real | generated | prompt): {files.get('grid', '-')}",
              f"report: {files.get('report', '-')}",
              f"TensorBoard: tensorboard --logdir {sp.join(workdir, 'tensorboard')}",
              f"metrics: {sp.join(workdir, 'metrics.jsonl')}"]
    return "\n".join(lines)


def console_main():
    """``uvjax-train`` (the console script) and ``python -m uvjax.train``."""
    from uvjax.config import resolve_config_argv
    sys.argv = resolve_config_argv(sys.argv)
    app.run(main)


if __name__ == "__main__":
    # Library code imports uvjax.train (e.g. loading a run for evaluation); make that the running
    # module instead of a second copy that would define the absl flags again.
    sys.modules.setdefault("uvjax.train", sys.modules["__main__"])
    console_main()
