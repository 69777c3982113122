"""Metric sinks: TensorBoard event files and ``metrics.jsonl`` (one JSON object per logged step).

On a ``gs://`` work dir (``uvjax/storage_paths.py``) ``metrics.jsonl`` cannot be appended to in place: each
append rewrites the object, so lines are buffered and appended in one batch every ``flush_secs`` seconds, at
``flush()`` (the trainer calls it before every checkpoint, so the metrics of checkpointed steps are in the
bucket) and at ``close()``. Each line ends in a CRC-32 of the rest (``"crc32": "..."``, see
:func:`read_metrics`). TensorBoard is given the URL as it is (tensorboardX writes ``gs://`` itself).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

from uvjax import storage_paths as sp
from uvjax.integrity_files import seal_line

log = logging.getLogger(__name__)


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
        line = seal_line({"step": int(step), **{k: (v if not (isinstance(v, float) and not math.isfinite(v))
                                                    else str(v)) for k, v in clean.items()}})
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


class Metrics(dict):
    """``read_metrics``' result: step → metrics, plus ``damaged``: the lines left out (file:line: why)."""

    damaged: list[str]


def read_metrics(workdir: str) -> Metrics:
    """Step → metrics; a step logged twice (re-run after a crash) keeps its last record.

    Every line carries a CRC-32 (``integrity_files.seal_line``; files written before have none and are read as
    they are). A damaged line (does not parse, CRC mismatch: a run killed mid-append, a flipped bit) is left out,
    counted in ``.damaged`` and reported in a warning naming the file and line: metrics are a log that plots and
    experiment tables read, and training never reads them back, so one bad line costs that line, not the file."""
    from uvjax import integrity_files as itg
    out = Metrics()
    out.damaged = []
    path = sp.join(workdir, "metrics.jsonl")
    if not sp.exists(path):
        return out
    recs, problems = itg.parse_lines(sp.read_text(path), path, "metrics line")
    for rec in recs:
        rec.pop("crc32", None)
        try:
            step = int(rec["step"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: damaged metrics line (no integer step): {json.dumps(rec)[:120]}")
            continue
        out[step] = rec
    out.damaged = problems
    if problems:
        log.warning("%d damaged line(s) of %s left out:\n  %s", len(problems), path, "\n  ".join(problems[:20]))
    return out
