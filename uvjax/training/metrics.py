"""Metric sinks: TensorBoard event files and ``metrics.jsonl`` (one JSON object per logged step)."""
from __future__ import annotations

import json
import math
import os


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"), flush_secs=10)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: (v if not (isinstance(v, float) and not math.isfinite(v))
                                                          else str(v)) for k, v in clean.items()}}) + "\n")
        for k, v in clean.items():
            if isinstance(v, float):
                self._tb.add_scalar(k, v, int(step))

    def flush(self):
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> dict[int, dict]:
    """Step → metrics; a step logged twice (re-run after a crash) keeps its last record."""
    out: dict[int, dict] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                out[int(rec["step"])] = rec
    return out
