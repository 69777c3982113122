"""The single-writer lock of a work directory, local or in a bucket: ``lock_for_workdir`` picks
``locks.WorkdirLock`` (fcntl) for a local path and :class:`ObjectStoreLock` (a lease object with generation
preconditions and a heartbeat) for a ``gs://`` one."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from uvjax.locks import LOCK_NAME, WorkdirLock, WorkdirLockedError, _pid_alive  # the local lock; one liveness check
from uvjax.storage_paths import _split_gs, is_remote, resolve

log = logging.getLogger(__name__)


class ObjectStoreLockedError(WorkdirLockedError):
    """Another live run holds the lock object (a ``WorkdirLockedError``)."""


def _describe(rec: dict) -> str:
    if not rec:
        return "an unknown holder (empty lock object)"
    started = rec.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    beat = rec.get("heartbeat")
    ago = f", last heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
    return (f"pid {rec.get('pid')} on host {rec.get('hostname')!r}, started {when}{ago}"
            + (f" ({rec.get('argv')})" if rec.get("argv") else ""))


_HELD: dict[str, "ObjectStoreLock"] = {}
_HELD_GUARD = threading.Lock()


class ObjectStoreLock:
    """An exclusive lease on ``gs://bucket/.../train.lock``, safe against concurrent writers.

    * acquire: create the object with ``if_generation_match=0``. If it exists, read it (with its
      generation ``g``); a record marked ``released``, a heartbeat older than ``ttl_s``, or a dead pid on
      this host is taken over with ``if_generation_match=g``; anything else refuses with
      ``ObjectStoreLockedError`` naming the holder. Losing either race also refuses: only one writer wins.
    * heartbeat: a daemon thread rewrites the record every ``heartbeat_s`` with
      ``if_generation_match=<our generation>``. A failed precondition means someone took the lock over
      (we were paused longer than ``ttl_s``): ``lost`` is set, ``on_lost(record)`` is called, and
      ``check()`` raises from then on. Transient errors are retried at the next beat.
    * release: the record is rewritten marked ``released`` (kept, like the local lock file).
    * ``verify()``: one metadata request; raises unless the object is still at our generation (call it
      before committing a checkpoint: a lease without fencing tokens is only as good as that check).

    Clocks: staleness compares this host's clock with the holder's last heartbeat (its clock, and the
    server's ``updated`` time; the later one counts), so ``ttl_s`` must exceed any clock skew by far.
    Re-entrant within a process, like ``WorkdirLock``.
    """

    def __init__(self, url: str, *, ttl_s: float = 300.0, heartbeat_s: float | None = None,
                 client: Any = None, on_lost: Callable[[dict], None] | None = None):
        self.url = resolve(url)
        self.bucket_name, self.name = _split_gs(self.url)
        self.ttl_s = float(ttl_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else max(self.ttl_s / 4.0, 0.05)
        if self.heartbeat_s >= self.ttl_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be shorter than ttl_s ({self.ttl_s})")
        self._client = client
        self.on_lost = on_lost
        self.generation: int | None = None
        self.record: dict = {}
        self.replaced: dict | None = None
        self.lost: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.RLock()  # heartbeat vs release
        self.depth = 0
        self._owner: ObjectStoreLock | None = None
        self._n = 0

    # ------------------------------------------------------------------ storage client
    @property
    def client(self):
        if self._client is None:
            from google.cloud import storage  # noqa: PLC0415
            self._client = storage.Client()  # anonymous + project "<none>" under STORAGE_EMULATOR_HOST
        return self._client

    def _blob(self):
        return self.client.bucket(self.bucket_name).blob(self.name)

    def _put(self, rec: dict, if_generation_match: int) -> int:
        blob = self._blob()
        blob.upload_from_string(json.dumps(rec), content_type="application/json",
                                if_generation_match=if_generation_match)
        return int(blob.generation)

    def _read(self) -> tuple[dict, int | None, float | None]:
        """(record, generation, server ``updated`` time) of the lock object; ({}, None, None) if absent."""
        from google.api_core import exceptions as gexc  # noqa: PLC0415
        bucket = self.client.bucket(self.bucket_name)
        for _ in range(5):
            blob = bucket.get_blob(self.name)
            if blob is None:
                return {}, None, None
            try:
                raw = blob.download_as_bytes(if_generation_match=blob.generation)
                break
            except (gexc.NotFound, gexc.PreconditionFailed):
                continue  # replaced between the two requests: read the new one
        else:
            raise ObjectStoreLockedError(f"{self.url}: the lock object keeps changing; is another run starting?")
        try:
            rec = json.loads(raw.decode()) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            rec = {}
        updated = blob.updated.timestamp() if getattr(blob, "updated", None) else None
        return (rec if isinstance(rec, dict) else {}), int(blob.generation), updated

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> "ObjectStoreLock":
        with _HELD_GUARD:
            held = _HELD.get(self.url)
            if held is None:
                self._lock()
                held = _HELD[self.url] = self
            held.depth += 1
            self._owner = held
            self._n += 1
            return self

    def _me(self) -> dict:
        now = time.time()
        return {"pid": os.getpid(), "hostname": socket.gethostname(), "started": now, "heartbeat": now,
                "ttl_s": self.ttl_s, "argv": " ".join(sys.argv)[:500], "kind": "object-store lease"}

    def _lock(self) -> None:
        from google.api_core import exceptions as gexc  # noqa: PLC0415
        me = self._me()
        try:
            self.generation = self._put(me, if_generation_match=0)
        except gexc.PreconditionFailed:
            prev, gen, updated = self._read()
            if gen is None:  # deleted in between: one more create race
                try:
                    self.generation = self._put(me, if_generation_match=0)
                except gexc.PreconditionFailed:
                    raise self._refuse(self._read()[0], "lost the race to create it") from None
            else:
                why = self._free_reason(prev, updated)
                if why is None:
                    raise self._refuse(prev, None)
                try:
                    self.generation = self._put(me, if_generation_match=gen)
                except gexc.PreconditionFailed:  # someone else took it over first
                    raise self._refuse(self._read()[0], "lost the race to take it over") from None
                if why != "released":
                    self.replaced = prev
                    log.warning("lock %s: took over from %s (%s)", self.url, _describe(prev), why)
        self.record = me
        self.lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease:{self.url}", daemon=True)
        self._thread.start()

    def _free_reason(self, rec: dict, updated: float | None) -> str | None:
        if "released" in rec:
            return "released"
        beats = [t for t in (rec.get("heartbeat"), updated) if isinstance(t, (int, float))]
        ttl = float(rec.get("ttl_s") or self.ttl_s)
        if not beats or time.time() - max(beats) > ttl:
            return f"no heartbeat for more than {ttl:.0f} s: killed or machine lost?"
        pid = int(rec.get("pid") or 0)
        if rec.get("hostname") == socket.gethostname() and pid and pid != os.getpid() and not _pid_alive(pid):
            return f"pid {pid} on this host is gone"
        return None

    def _refuse(self, rec: dict, detail: str | None) -> ObjectStoreLockedError:
        return ObjectStoreLockedError(
            f"{self.url} is held by another run: {_describe(rec)}"
            + (f" ({detail})" if detail else "")
            + f". Wait for it to finish or stop it; a holder that stops heartbeating is taken over "
              f"after {float(rec.get('ttl_s') or self.ttl_s):.0f} s. Or use another work directory")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._renew():
                return

    def _renew(self) -> bool:
        """One heartbeat; False once the lease is gone (released or taken over)."""
        from google.api_core import exceptions as gexc  # noqa: PLC0415
        with self._io:
            if self.generation is None:
                return False
            rec = dict(self.record, heartbeat=time.time())
            try:
                self.generation = self._put(rec, if_generation_match=self.generation)
                self.record = rec
                return True
            except gexc.PreconditionFailed:
                self._lose()
            except Exception as e:  # noqa: BLE001  (network blip: retry at the next beat)
                log.warning("lock %s: heartbeat failed (%s); last one %.0f s ago",
                            self.url, e, time.time() - float(self.record.get("heartbeat", 0)))
                return True
        if self.on_lost is not None:  # outside self._io: the callback may call release()
            self.on_lost(self.lost)
        return False

    def _lose(self) -> None:
        try:
            holder = self._read()[0]
        except Exception:  # noqa: BLE001
            holder = {}
        self.lost = holder or {"unknown": True}
        self.generation = None
        log.error("lock %s was taken over by %s: this run no longer owns the work directory",
                  self.url, _describe(holder))

    def release(self) -> None:
        from google.api_core import exceptions as gexc  # noqa: PLC0415
        with _HELD_GUARD:
            owner = self._owner
            if owner is None or self._n == 0:
                return
            self._n -= 1
            if self._n == 0:
                self._owner = None
            owner.depth -= 1
            if owner.depth > 0:
                return
            _HELD.pop(owner.url, None)
        owner._stop.set()
        with owner._io:
            gen, owner.generation = owner.generation, None
            if gen is not None:
                try:
                    owner._put(dict(owner.record, released=time.time()), if_generation_match=gen)
                except gexc.PreconditionFailed:
                    log.error("lock %s: not released, someone else holds it now", owner.url)
                except Exception as e:  # noqa: BLE001  (it expires after ttl_s anyway)
                    log.warning("lock %s: release failed (%s); it expires after %.0f s", owner.url, e, owner.ttl_s)
        if owner._thread is not None and owner._thread is not threading.current_thread():
            owner._thread.join(timeout=max(owner.heartbeat_s, 1.0) + 30.0)
        owner._thread = None

    # ------------------------------------------------------------------ state
    @property
    def held(self) -> bool:
        o = self._owner
        return o is not None and o.generation is not None and o.lost is None

    def check(self) -> None:
        """Raise if the lease was lost (no request made)."""
        o = self._owner or self
        if o.lost is not None:
            raise ObjectStoreLockedError(f"{self.url}: this run lost the lock to {_describe(o.lost)}")

    def verify(self) -> None:
        """One metadata request: raise unless the lock object is still at this run's generation."""
        o = self._owner or self
        self.check()
        blob = self.client.bucket(self.bucket_name).get_blob(self.name)
        if o.generation is None or blob is None or int(blob.generation) != o.generation:
            raise ObjectStoreLockedError(f"{self.url}: this run no longer holds the lock "
                                         f"({_describe(self._read()[0])} does)")

    def holder(self) -> dict:
        return self._read()[0]

    def __enter__(self) -> "ObjectStoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_for_workdir(workdir: str, enabled: bool = True, **lease_kwargs):
    """The single-writer lock of ``workdir`` as a context manager: ``ObjectStoreLock`` on
    ``<workdir>/train.lock`` for a ``gs://`` work dir, ``WorkdirLock`` (fcntl) for a local one,
    a no-op when ``enabled`` is False (non-primary hosts)."""
    if not enabled:
        return contextlib.nullcontext()
    if not is_remote(workdir):
        return WorkdirLock(workdir)
    if not str(workdir).startswith("gs://"):
        raise NotImplementedError(f"no single-writer lock for {workdir!r}: only gs:// and local work dirs")
    return ObjectStoreLock(f"{resolve(workdir)}/{LOCK_NAME}", **lease_kwargs)
