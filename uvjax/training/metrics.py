"""Metric sinks: TensorBoard event files and ``metrics.jsonl`` (one JSON object per logged step).

On a ``gs://`` work dir (``uvjax/storage_paths.py``) ``metrics.jsonl`` cannot be appended to in place: each
append rewrites the object, so lines are buffered and appended in one batch every ``flush_secs`` seconds, at
``flush()`` (the trainer calls it before every checkpoint, so the metrics of checkpointed steps are in the
bucket) and at ``close()``. TensorBoard is given the URL as it is (tensorboardX writes ``gs://`` itself).
"""
from __future__ import annotations

import json
import math
import os
import time

from uvjax import storage_paths as sp


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True, flush_secs: float = 10.0):
        self.enabled = enabled
        self.path = sp.join(workdir, "metrics.jsonl")
        self.remote = sp.is_remote(workdir)
        self.flush_secs = float(flush_secs)
        self._pending: list[str] = []
        self._last_push = time.monotonic()
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=sp.join(workdir, "tensorboard"), flush_secs=10)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()}
        line = json.dumps({"step": int(step), **{k: (v if not (isinstance(v, float) and not math.isfinite(v))
                                                     else str(v)) for k, v in clean.items()}}) + "\n"
        if self.remote:
            self._pending.append(line)
            if time.monotonic() - self._last_push >= self.flush_secs:
                self._push()
        else:
            with open(self.path, "a") as f:
                f.write(line)
        for k, v in clean.items():
            if isinstance(v, float):
                self._tb.add_scalar(k, v, int(step))

    def _push(self) -> None:
        if self._pending:
            sp.append_text(self.path, "".join(self._pending))
            self._pending = []
        self._last_push = time.monotonic()

    def flush(self):
        if self.enabled:
            self._push()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        try:
            if self.enabled:
                self._push()
        finally:
            if self._tb is not None:
                self._tb.close()


def read_metrics(workdir: str) -> dict[int, dict]:
    """Step → metrics; a step logged twice (re-run after a crash) keeps its last record."""
    out: dict[int, dict] = {}
    path = sp.join(workdir, "metrics.jsonl")
    if not sp.exists(path):
        return out
    for line in sp.read_text(path).splitlines():
        line = line.strip()
        if line:
            rec = json.loads(line)
            out[int(rec["step"])] = rec
    return out
