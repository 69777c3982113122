"""One run per work directory: an advisory ``fcntl`` lock on ``<workdir>/train.lock``.

Two runs writing the same checkpoints and metrics corrupt each other silently (interleaved saves,
a resumed run overwriting a live one). The first run takes an exclusive POSIX record lock
(``fcntl.lockf``) on ``train.lock`` and writes who it is (pid, hostname, start time, command) into
it; a second run finds the lock taken and refuses with that information.

A run killed with SIGKILL (or a machine that died) cannot clean up, but the kernel drops POSIX locks
when their process exits, so the next start simply takes the lock over; it logs the dead holder it
replaced ("stale lock"). POSIX locks are per process: data-loader processes forked by the run do not
inherit them, so a leftover worker cannot keep a dead run's lock alive. The lock file itself is never
deleted (deleting it would let two runs lock two different files).

Where the filesystem has no POSIX locks (some FUSE mounts), the file's content is used instead: a
holder on this host whose pid is alive keeps the lock; a dead pid is taken over; a holder on another
host is trusted (refused) until someone deletes the file. Multi-host runs lock on process 0 only.

The lock is re-entrant within a process (``run_all`` and ``run`` both take it).

A ``gs://`` work directory has no ``fcntl``: ``remote_lock.lock_for_workdir`` hands it to ``uvjax.remote_lock.ObjectStoreLock``
(a lease object with generation preconditions and a heartbeat), and ``WorkdirLock`` refuses URLs rather than
lock a local ``./gs:/...`` directory.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
import threading
import time

LOCK_NAME = "train.lock"
log = logging.getLogger(__name__)


class WorkdirLockedError(RuntimeError):
    """Another live run holds the work directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process (empty lock file)"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {holder.get('pid')} on host {holder.get('hostname')!r}, started {when}"
            + (f" ({holder.get('argv')})" if holder.get("argv") else ""))


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        return json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


_HELD: dict[str, "WorkdirLock"] = {}
_HELD_GUARD = threading.Lock()


class WorkdirLock:
    """``with WorkdirLock(workdir): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, workdir: str):
        if _is_url(workdir):
            raise ValueError(f"WorkdirLock locks local directories; {workdir!r} is a URL "
                             "(use uvjax.remote_lock.lock_for_workdir)")
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.fd: int | None = None
        self.depth = 0
        self._owner: "WorkdirLock | None" = None
        self._n = 0  # acquisitions through this object
        self.replaced: dict | None = None  # the stale holder taken over, if any

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> "WorkdirLock":
        os.makedirs(self.workdir, exist_ok=True)
        key = os.path.realpath(self.path)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is None:  # first holder in this process
                self._lock()
                held = _HELD[key] = self
            held.depth += 1  # re-entrant: run_all and run both take it
            self._owner = held
            self._n += 1
            return self

    def _lock(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                posix = True
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    holder = _read(fd)
                    raise WorkdirLockedError(
                        f"work directory {self.workdir} is in use by another run: {_describe(holder)} "
                        f"holds {self.path}. Wait for it to finish or stop it (SIGTERM saves a checkpoint), "
                        f"or use another --workdir") from None
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                posix = False  # no POSIX locks here: fall back to the pid recorded in the file
            previous = _read(fd)
            if previous and not posix:
                same_host = previous.get("hostname") == socket.gethostname()
                pid = int(previous.get("pid") or 0)
                if pid and (not same_host or (_pid_alive(pid) and pid != os.getpid())):
                    raise WorkdirLockedError(
                        f"work directory {self.workdir} is in use by another run: {_describe(previous)} "
                        f"({self.path}; this filesystem has no POSIX locks, so the holder's pid is trusted). "
                        f"If that run is gone, delete {self.path}")
            if previous and "released" not in previous:
                # the previous holder never released it: killed (SIGKILL, OOM, machine loss)
                self.replaced = previous
                log.warning("work directory %s: took over the stale lock of %s, which ended without "
                            "releasing it (killed?)", self.workdir, _describe(previous))
            me = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": time.time(),
                  "argv": " ".join(sys.argv)[:500], "posix_lock": posix}
            data = json.dumps(me).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # also drops the POSIX lock
            raise
        self.fd = fd

    def release(self) -> None:
        with _HELD_GUARD:
            owner = self._owner
            if owner is None or owner.fd is None or self._n == 0:
                return
            self._n -= 1
            if self._n == 0:
                self._owner = None
            owner.depth -= 1
            if owner.depth > 0:
                return
            _HELD.pop(os.path.realpath(owner.path), None)
            fd, owner.fd = owner.fd, None
            try:  # leave the file in place, marked released, then unlock
                rec = _read(fd)
                rec["released"] = time.time()
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(rec).encode(), 0)
            except OSError:
                pass
            try:
                fcntl.lockf(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._owner is not None and self._owner.fd is not None

    def holder(self) -> dict:
        """The record of the current (or last) holder. Never opens a second descriptor while this
        process holds the lock: closing any descriptor of the file would drop a POSIX lock."""
        with _HELD_GUARD:
            held = _HELD.get(os.path.realpath(self.path))
            if held is not None and held.fd is not None:
                return _read(held.fd)
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _is_url(path) -> bool:
    s = str(path)
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", s)) and not s.startswith("file://")
