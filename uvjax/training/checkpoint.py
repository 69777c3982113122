"""orbax checkpoints of {train state, data-iterator state, config}, atomic and resumable.

orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never leaves a directory that ``latest_step`` would pick (leftover temporary directories are removed
when the next run opens the directory; ``training/lock.py`` makes that run the only writer).
Restoring uses an abstract state carrying the *current* shardings, so a checkpoint saved on one mesh
restores onto another.

Faults (docs/RELIABILITY.md): a save that fails (disk full, I/O error; reported by orbax's background
thread at the next save or at close) raises :class:`CheckpointError` naming the step, the cause and
the last complete checkpoint, which stays intact. :meth:`Checkpointer.restore_latest` restores the
newest step that reads back (and passes ``validate``); an unreadable newer step is moved aside to
``unreadable-<step>-<time>`` and reported, never deleted.

The directory may be a ``gs://`` URL: orbax writes there itself (on an object store a step is complete when
its ``commit_success.txt`` exists, not by a rename), and uvjax's own file operations (moving a step aside) go
through ``uvjax/storage_paths.py`` / ``etils.epath``.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from uvjax import storage_paths as sp


def _grain_args():
    import grain
    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class _StateSnapshot:
    """A data iterator's state taken when ``save`` is called. orbax runs grain's checkpoint handler
    on a worker thread; today (orbax 0.12) ``save`` waits for it, but handed the live iterator, any
    orbax that defers it would record a later position and a resume would skip batches. Written as
    the same JSON file, so ``CheckpointRestore(it)`` reads it unchanged."""

    def __init__(self, it):
        st = it.get_state()
        self._state = st if isinstance(st, bytes) else json.dumps(st, indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def _json_state(it) -> bool:
    """Iterators whose state is identical on every host (row-sharded) are saved once, as JSON, so the
    checkpoint restores on any host count; grain's own handler writes one file per process."""
    return getattr(it, "state_is_global", False)


log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (or no checkpoint could be read back)."""


def _disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(e) or "RESOURCE_EXHAUSTED" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = sp.resolve(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            save_interval_steps=1, cleanup_tmp_directories=True)
        self.mgr = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # step of a save that may still be writing
        self._failed: CheckpointError | None = None

    def _save_failed(self, step: int, e: BaseException) -> CheckpointError:
        try:
            self.mgr.reload()
            done = [s for s in self.mgr.all_steps() if s != step]
        except Exception:  # noqa: BLE001 - the message must not fail
            done = []
        cause = "the disk is full" if _disk_full(e) else f"{type(e).__name__}: {e}"
        last = f"step {max(done)}" if done else "none"
        self._failed = CheckpointError(
            f"checkpoint of step {step} could not be written to {self.directory} ({cause}); "
            f"the last complete checkpoint is {last}, intact. Free space (or fix the storage) and rerun "
            f"the same command to resume from it")
        return self._failed

    def _wait_pending(self) -> None:
        """Waits for the previous asynchronous save; its failure is raised as a CheckpointError."""
        if self._failed is not None:
            raise self._failed
        try:
            self.mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises the writer thread's error
            raise self._save_failed(self._pending if self._pending is not None else -1, e) from e
        self._pending = None

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.mgr.all_steps())

    def save(self, step: int, state, data_iterator=None, meta: dict | None = None, *, force: bool = True) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None and _json_state(data_iterator):
            items["data_json"] = ocp.args.JsonSave(data_iterator.get_state())
        elif data_iterator is not None:
            save_cls, _ = _grain_args()
            items["data"] = save_cls(_StateSnapshot(data_iterator))
        if meta is not None:  # a copy: the caller may change its dict while the save is in flight
            items["meta"] = ocp.args.JsonSave(json.loads(json.dumps(meta)))
        self._wait_pending()
        try:
            self._pending = int(step)
            return self.mgr.save(int(step), args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(int(step), e) from e

    def restore(self, step: int, abstract_state, data_iterator=None, *, with_meta: bool = False):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and _json_state(data_iterator):
            items["data_json"] = ocp.args.JsonRestore()
        elif data_iterator is not None:
            _, restore_cls = _grain_args()
            items["data"] = restore_cls(data_iterator)
        if with_meta:
            items["meta"] = ocp.args.JsonRestore()
        out = self.mgr.restore(int(step), args=ocp.args.Composite(**items))
        return out

    def restore_latest(self, abstract_state, data_iterator=None, *, with_meta: bool = False, validate=None):
        """Restores the newest readable step: ``(step, restored, skipped)``, ``(0, None, [])`` when
        there is no checkpoint. ``validate(restored)`` may raise to reject a step (e.g. non-finite
        parameters). Unreadable newer steps are moved aside and listed in ``skipped`` as
        ``{"step", "error", "moved_to"}``; when no step reads back, raises CheckpointError."""
        import jax
        skipped: list[dict] = []
        for step in sorted(self.all_steps(), reverse=True):
            err = None
            try:
                out = self.restore(step, abstract_state, data_iterator, with_meta=with_meta)
                if validate is not None:
                    validate(out)
            except Exception as e:  # noqa: BLE001 - any failure to read back means: not this step
                err = f"{type(e).__name__}: {str(e)[:500]}"
            if jax.process_count() > 1:  # every host must pick the same step
                from jax.experimental import multihost_utils
                oks = multihost_utils.process_allgather(np.asarray(err is None))
                if err is None and not np.all(oks):
                    err = "unreadable on another host"
            if err is None:
                for s in skipped:
                    s["moved_to"] = self._move_aside(s["step"])
                if skipped:
                    self.mgr.reload()
                    log.warning("checkpoint(s) %s in %s could not be restored and were moved aside; "
                                "resumed from step %d instead: %s", [s["step"] for s in skipped],
                                self.directory, step, skipped)
                return step, out, skipped
            log.warning("checkpoint step %d in %s could not be restored (%s); trying an older one",
                        step, self.directory, err)
            skipped.append({"step": step, "error": err})
        if skipped:
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored: {skipped}. "
                                  f"Move them away to start from scratch (nothing was deleted)")
        return 0, None, []

    def _move_aside(self, step: int) -> str | None:
        import jax
        src = sp.join(self.directory, str(step))
        dst = sp.join(self.directory, f"unreadable-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0 and sp.isdir(src):
            if sp.is_remote(src):  # objects are copied, then deleted: not atomic, but nothing is lost
                sp.as_path(src).rename(sp.as_path(dst))
            else:
                os.rename(src, dst)
        if jax.process_count() > 1:  # orbax's barrier: the coordinator's on CPU (training/distributed.py)
            ocp.multihost.sync_global_processes(f"uvjax_ckpt_move_aside_{step}")
        return dst

    def wait(self):
        self._wait_pending()

    def close(self):
        try:
            self._wait_pending()
        finally:
            try:
                self.mgr.close()
            except Exception:  # noqa: BLE001 - the failure was already raised above
                if self._failed is None:
                    raise


def abstract_like(state, shardings):
    """ShapeDtypeStructs of ``state`` placed with ``shardings`` (a restore template)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state, shardings)
