"""Cooperative stop for long offline stages (import, VQ / SigLIP training, pre-tokenisation).

A signal handler must not raise into arbitrary code: unwinding through a JAX/XLA call in flight crashed
the interpreter at exit. So SIGTERM/SIGINT only *request* a stop; stages call :func:`check` at safe points
(between chunks, between training steps), which raises :class:`StopRequested` there. Everything a stage
finished is kept (chunk markers, finished stage directories), so the same command resumes. A second signal
while the first is pending exits at once (status 128 + signal), as the default handler would.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys

from absl import logging

_requested: list[int] = []


class StopRequested(Exception):
    """Raised at a safe point after SIGTERM/SIGINT; ``args[0]`` is the signal number."""


def requested() -> int | None:
    return _requested[0] if _requested else None


def check() -> None:
    if _requested:
        raise StopRequested(_requested[0])


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
    """Within the block, the signals request a cooperative stop (see the module docstring)."""
    def handler(signum, frame):
        if _requested:
            os._exit(128 + signum)
        _requested.append(signum)
        print(f"\nreceived signal {signum}: stopping at the next safe point (again to exit at once)",
              file=sys.stderr, flush=True)
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _requested.clear()


class StopFlag:
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
