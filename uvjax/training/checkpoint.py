"""orbax checkpoints of {train state, data-iterator state, config}, atomic and resumable.

orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never leaves a directory that ``latest_step`` would pick (leftover temporary directories are removed
when the next run opens the directory; ``uvjax/locks.py`` makes that run the only writer).
Restoring uses an abstract state carrying the *current* shardings, so a checkpoint saved on one mesh
restores onto another.

Faults (docs/RELIABILITY.md): a save that fails (disk full, I/O error; reported by orbax's background
thread at the next save or at close) raises :class:`CheckpointError` naming the step, the cause and
the last complete checkpoint, which stays intact. :meth:`Checkpointer.restore_latest` restores the
newest step that reads back, matches its digests (and passes ``validate``); an unreadable newer step is moved aside to
``unreadable-<step>-<time>`` and reported, never deleted.

Integrity (issue #33): every saved array, the data-iterator state and the metadata carry digests
(``training/integrity.py``) checked when the step is read back after its save and at every restore; a
mismatch is handled like an unreadable step. Rotation deletes a step only when ``keep`` newer steps have
been read back and verified.

The directory may be a ``gs://`` URL: orbax writes there itself (on an object store a step is complete when
its ``commit_success.txt`` exists, not by a rename), and uvjax's own file operations (moving a step aside) go
through ``uvjax/storage_paths.py`` / ``etils.epath``.

Over ~400 lines on purpose: one checkpointer (atomic save, digests, read-back, fall back to the last good
step), whose invariants hold across all of it.
"""
from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from uvjax import storage_paths as sp
from uvjax.training.integrity import compare, json_digest, tree_digests


def _grain_args():
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


def _short(e: BaseException, limit: int = 600) -> str:
    """An exception as one short line (tensorstore appends its whole spec after "See full TensorStore")."""
    text = str(e).split(" See full TensorStore details", 1)[0].strip()
    return f"{type(e).__name__}: {text[:limit]}"


def _disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(e) or "RESOURCE_EXHAUSTED" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


SIDECAR = "uvjax_verified.json"  # written into a step's directory once it has read back and verified


class CheckpointIntegrityError(ValueError):
    """A checkpoint read back with different contents than were saved (a flipped bit, a bad copy)."""


class Checkpointer:
    """orbax's CheckpointManager plus integrity (``training/integrity.py``) and a rotation that only ever
    deletes a checkpoint once ``keep`` newer ones are known good.

    - ``save`` computes a digest of every array of the state on the device, of the data iterator's state
      and of the metadata, and saves them with the step (item ``integrity``).
    - When that save has finished (at the next ``save`` or at ``close``) the step is read back onto the
      same shardings and its digests recomputed (``readback=False``: the digests are only checked at
      restore). A step that verifies gets ``uvjax_verified.json`` (with the loss probe, below); one that
      does not is moved aside and reported, and the previous ones stay.
    - Rotation counts verified steps only: the newest ``keep`` verified steps stay, with everything newer;
      older steps are deleted. orbax's own ``max_to_keep`` is off.
    - ``restore`` checks every digest; a mismatch is a :class:`CheckpointIntegrityError`, and
      ``restore_latest`` then moves the step aside and falls back to the previous one.
    - ``set_probe(step, probe)``: the loss the saved state gives on the batch that follows it (recorded by
      the loop, ``train.py``), stored in the sidecar so a restored state can prove itself.
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True, readback: bool = True):
        self.directory = sp.resolve(directory)
        self.keep = max(1, int(keep))
        self.readback = bool(readback)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=async_save,
            save_interval_steps=1, cleanup_tmp_directories=True)
        self.mgr = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # step of a save that may still be writing / is not verified yet
        self._failed: CheckpointError | None = None
        self._template = None  # abstract state of the last save (the read-back target)
        self._expected: dict[int, dict] = {}  # step -> the integrity record saved with it
        self._probes: dict[int, dict] = {}
        self.failed_verification: list[dict] = []

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
        """Waits for the previous asynchronous save (its failure is raised as a CheckpointError), then
        reads it back, verifies it and rotates."""
        if self._failed is not None:
            raise self._failed
        try:
            self.mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises the writer thread's error
            raise self._save_failed(self._pending if self._pending is not None else -1, e) from e
        step, self._pending = self._pending, None
        if step is not None:
            self._verify_saved(step)

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.mgr.all_steps())

    # ------------------------------------------------------------------ save
    def _data_digests(self, data_iterator) -> list[str] | str | None:
        if data_iterator is None:
            return None
        if _json_state(data_iterator):
            return json_digest(data_iterator.get_state())
        mine = json_digest(_StateSnapshot(data_iterator).get_state())
        if jax.process_count() == 1:
            return [mine]
        raw = np.frombuffer(bytes.fromhex(mine), np.uint8)
        allp = np.asarray(multihost_utils.process_allgather(raw)).reshape(jax.process_count(), -1)
        return [bytes(r.astype(np.uint8)).hex() for r in allp]

    def save(self, step: int, state, data_iterator=None, meta: dict | None = None, *, force: bool = True) -> bool:
        step = int(step)
        items = {"state": ocp.args.StandardSave(state)}
        integrity = {"version": 1, "step": step, "arrays": tree_digests(state)}
        if data_iterator is not None and _json_state(data_iterator):
            items["data_json"] = ocp.args.JsonSave(data_iterator.get_state())
        elif data_iterator is not None:
            save_cls, _ = _grain_args()
            items["data"] = save_cls(_StateSnapshot(data_iterator))
        integrity["data"] = self._data_digests(data_iterator)
        if meta is not None:  # a copy: the caller may change its dict while the save is in flight
            meta = json.loads(json.dumps(meta))
            items["meta"] = ocp.args.JsonSave(meta)
            integrity["meta"] = json_digest(meta)
        items["integrity"] = ocp.args.JsonSave(integrity)
        self._wait_pending()
        self._template = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        self._expected[step] = integrity
        try:
            self._pending = step
            return self.mgr.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001
            self._pending = None
            raise self._save_failed(step, e) from e

    # ------------------------------------------------------------------ verification and rotation
    def _step_dir(self, step: int) -> str:
        return sp.join(self.directory, str(step))

    def _verify_saved(self, step: int) -> None:
        """Reads ``step`` back and compares its digests with those computed at save; marks it verified and
        rotates, or moves it aside. All processes take part (the arrays are read collectively)."""
        expected = self._expected.pop(step, None)
        err = None
        try:
            if self.readback and self._template is not None:
                out = self._restore_items(step, self._template, data_iterator=None, with_meta=True,
                                          verify=True, read_data_files=True)
                if expected is not None and out.get("integrity") != expected:
                    err = "the integrity record read back differs from the one saved"
        except Exception as e:  # noqa: BLE001 - any failure to read back means: not a good step
            err = _short(e)
        if jax.process_count() > 1:
            oks = multihost_utils.process_allgather(np.asarray(err is None))
            if err is None and not np.all(oks):
                err = "did not verify on another host"
        if err is not None:
            moved = self._move_aside(step, "unverified")
            self.mgr.reload()
            self.failed_verification.append({"step": step, "error": err, "moved_to": moved})
            log.error("checkpoint of step %d did not read back as written (%s); moved to %s. The previous "
                      "checkpoints are kept; training goes on and the next checkpoint tries again", step, err,
                      moved)
            return
        self._mark_verified(step)
        self._rotate()

    def _mark_verified(self, step: int) -> None:
        if jax.process_index() == 0:
            body = {"step": int(step), "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "readback": self.readback, "probe": self._probes.get(int(step))}
            rec = {**body, "sha256": json_digest(body)}
            try:
                sp.atomic_write_text(sp.join(self._step_dir(step), SIDECAR), json.dumps(rec, indent=1))
            except OSError as e:  # e.g. the disk filled up: the step stays, counted as unverified
                log.warning("step %d read back correctly, but its verified mark could not be written (%s); it "
                            "counts as unverified, so no older checkpoint is deleted for it", step, e)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"uvjax_ckpt_verified_{step}")

    def sidecar(self, step: int) -> dict | None:
        """The verification record of ``step`` (None: not verified, or the record is damaged — logged)."""
        path = sp.join(self._step_dir(step), SIDECAR)
        if not sp.exists(path):
            return None
        try:
            rec = json.loads(sp.read_text(path))
            body = {k: v for k, v in rec.items() if k != "sha256"}
            if rec.get("sha256") != json_digest(body) or int(rec.get("step", -1)) != int(step):
                raise ValueError("its sha256 does not match its contents")
            return body
        except Exception as e:  # noqa: BLE001 - a damaged record only costs the step its verified mark
            log.warning("ignoring %s (%s): step %d counts as unverified and has no loss probe", path, e, step)
            return None

    def verified_steps(self) -> list[int]:
        return [s for s in self.all_steps() if self.sidecar(s) is not None]

    def _rotate(self) -> None:
        """Keeps the newest ``keep`` verified steps and every newer step; deletes the older ones."""
        verified = sorted(self.verified_steps())
        if len(verified) < self.keep:
            return
        oldest_kept = verified[-self.keep]
        for s in self.all_steps():
            if s < oldest_kept:
                self.mgr.delete(s)
        self.mgr.reload()

    def set_probe(self, step: int, probe: dict) -> None:
        """Records the probe of ``step`` (written with its verified mark; at once if already verified)."""
        self._probes[int(step)] = probe
        if self._pending != int(step) and self.sidecar(step) is not None:
            self._mark_verified(step)

    def probe(self, step: int) -> dict | None:
        rec = self.sidecar(step)
        return (rec or {}).get("probe")

    # ------------------------------------------------------------------ restore
    def has_item(self, step: int, name: str) -> bool:
        return sp.isdir(sp.join(self._step_dir(step), name))

    def _restore_items(self, step: int, abstract_state, data_iterator=None, *, with_meta: bool = False,
                       verify: bool = True, read_data_files: bool = False) -> dict:
        checked = verify and self.has_item(step, "integrity")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and _json_state(data_iterator):
            items["data_json"] = ocp.args.JsonRestore()
        elif data_iterator is not None:
            _, restore_cls = _grain_args()
            items["data"] = restore_cls(data_iterator)
        elif read_data_files and self.has_item(step, "data_json"):
            items["data_json"] = ocp.args.JsonRestore()
        if (with_meta or checked) and self.has_item(step, "meta"):
            items["meta"] = ocp.args.JsonRestore()
        if checked:
            items["integrity"] = ocp.args.JsonRestore()
        failure = None
        try:
            out = dict(self.mgr.restore(int(step), args=ocp.args.Composite(**items)))
        except Exception as e:  # noqa: BLE001 - re-raised below, after every host has said how it went
            failure = e
        if _agree(None if failure is None else "failed", "failed") is not None:
            # the digests are collectives: a host whose read failed must not leave the others waiting in one
            if failure is not None:
                raise failure
            raise CheckpointError(f"checkpoint step {step} in {self.directory} could not be read on another host")
        if checked:
            self._check(step, out, data_iterator, read_data_files)
        elif verify:
            log.warning("checkpoint step %d in %s has no integrity record (written before uvjax checked "
                        "checkpoints): restored unverified", step, self.directory)
        if not with_meta:
            out.pop("meta", None)
        return out

    def _check(self, step: int, out: dict, data_iterator, read_data_files: bool) -> None:
        rec = out["integrity"]
        if not isinstance(rec, dict) or int(rec.get("step", -1)) != int(step) or "arrays" not in rec:
            raise CheckpointIntegrityError(f"step {step}: the integrity record is damaged ({str(rec)[:200]})")
        problems = compare(rec["arrays"], tree_digests(out["state"]))
        saved_data = rec.get("data")
        if "data_json" in out and saved_data is not None:
            if json_digest(out["data_json"]) != saved_data:
                problems.append("data iterator state (data_json): digest differs")
        elif saved_data is not None and (data_iterator is not None or read_data_files):
            pi, pc = jax.process_index(), jax.process_count()
            path = sp.join(self._step_dir(step), "data", f"process_{pi}-of-{pc}.json")
            want = saved_data[pi] if isinstance(saved_data, list) and pi < len(saved_data) else None
            try:
                got = json_digest(sp.read_text(path).encode())
            except Exception as e:  # noqa: BLE001
                got = f"<unreadable: {type(e).__name__}: {e}>"
            if got != want:
                problems.append(f"data iterator state ({path}): digest differs")
        if "meta" in out and rec.get("meta") is not None and json_digest(out["meta"]) != rec["meta"]:
            problems.append("metadata (meta): digest differs")
        if problems:
            raise CheckpointIntegrityError(
                f"checkpoint step {step} in {self.directory} does not match the digests saved with it: "
                + "; ".join(problems))

    def read_meta(self, step: int) -> dict:
        """The metadata of ``step`` alone (no arrays), checked against its integrity record when it has one."""
        items = {"meta": ocp.args.JsonRestore()}
        checked = self.has_item(step, "integrity")
        if checked:
            items["integrity"] = ocp.args.JsonRestore()
        out = self.mgr.restore(int(step), args=ocp.args.Composite(**items))
        if checked and json_digest(out["meta"]) != (out["integrity"] or {}).get("meta"):
            raise CheckpointIntegrityError(f"checkpoint step {step} in {self.directory}: its metadata does not match "
                                           f"the digest saved with it")
        return out["meta"]

    def restore(self, step: int, abstract_state, data_iterator=None, *, with_meta: bool = False):
        """Restores ``step`` and checks it against its integrity record (CheckpointIntegrityError)."""
        return self._restore_items(step, abstract_state, data_iterator, with_meta=with_meta)

    def restore_latest(self, abstract_state, data_iterator=None, *, with_meta: bool = False, validate=None):
        """Restores the newest readable step: ``(step, restored, skipped)``, ``(0, None, [])`` when
        there is no checkpoint. A step that does not read back, does not match its digests, or that
        ``validate(restored, step)`` rejects (by raising) is skipped; ``validate`` raising
        :class:`RestoreRefused` stops the search instead (a problem no older step fixes). Skipped newer
        steps are moved aside and listed in ``skipped`` as ``{"step", "error", "moved_to"}``; when no
        step reads back, raises CheckpointError and nothing is moved. A step that restores is marked
        verified."""
        skipped: list[dict] = []
        for step in sorted(self.all_steps(), reverse=True):
            err = None
            try:
                out = self.restore(step, abstract_state, data_iterator, with_meta=with_meta)
            except Exception as e:  # noqa: BLE001 - any failure to read back means: not this step
                err = _short(e)
            err = _agree(err, "unreadable on another host")  # validate runs collectives: all hosts or none
            if err is None and validate is not None:
                try:
                    _call_validate(validate, out, step)
                except RestoreRefused:
                    raise
                except Exception as e:  # noqa: BLE001
                    err = _short(e)
                err = _agree(err, "rejected on another host")
            if err is None:
                for s in skipped:
                    s["moved_to"] = self._move_aside(s["step"])
                if skipped:
                    self.mgr.reload()
                    log.warning("checkpoint(s) %s in %s could not be restored and were moved aside; "
                                "resumed from step %d instead: %s", [s["step"] for s in skipped],
                                self.directory, step, skipped)
                if self.has_item(step, "integrity") and self.sidecar(step) is None:
                    self._mark_verified(step)  # it read back and matched its digests
                return step, out, skipped
            log.warning("checkpoint step %d in %s could not be restored (%s); trying an older one",
                        step, self.directory, err)
            skipped.append({"step": step, "error": err})
        if skipped:
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored: {skipped}. "
                                  f"Move them away to start from scratch (nothing was deleted)")
        return 0, None, []

    def _move_aside(self, step: int, why: str = "unreadable") -> str | None:
        src = sp.join(self.directory, str(step))
        dst = sp.join(self.directory, f"{why}-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0 and sp.isdir(src):
            if sp.is_remote(src):  # objects are copied, then deleted: not atomic, but nothing is lost
                sp.as_path(src).rename(sp.as_path(dst))
            else:
                os.rename(src, dst)
        if jax.process_count() > 1:  # orbax's barrier: the coordinator's on CPU (training/distributed.py)
            ocp.multihost.sync_global_processes(f"uvjax_ckpt_move_aside_{step}_{why}")
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


def _agree(err: str | None, other: str) -> str | None:
    """Every host must pick the same step: a step bad on one host is bad on all."""
    if jax.process_count() > 1:
        oks = multihost_utils.process_allgather(np.asarray(err is None))
        if err is None and not np.all(oks):
            return other
    return err


def _call_validate(validate, out, step):
    try:
        n = len(inspect.signature(validate).parameters)
    except (TypeError, ValueError):
        n = 1
    return validate(out, step) if n >= 2 else validate(out)


class RestoreRefused(RuntimeError):
    """Raised by a ``validate`` hook for a problem that no older checkpoint fixes (e.g. the data changed)."""


def abstract_like(state, shardings):
    """ShapeDtypeStructs of ``state`` placed with ``shardings`` (a restore template)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state, shardings)
