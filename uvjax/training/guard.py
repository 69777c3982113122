"""Numerical guards of the train loop: non-finite updates and loss spikes, with the batch named.

The train step (``training/step.py``) never applies an update whose loss or gradient norm is not
finite, nor one whose loss exceeds the ``max_loss`` it is given; it reports ``skipped_nonfinite`` /
``skipped_spike``. :class:`StepGuard` is the host side:

- it computes ``max_loss`` for each step: ``train.spike_factor`` × the median of the last
  ``train.spike_window`` finite losses (0 = off; no limit until the window is full);
- it reads every step's loss one step behind the device (so the host never stalls the step
  pipeline) and, for a skipped update, logs the step, the loss, the gradient norm and the data
  iterator position *before* that batch (``batch_index`` and the iterator state, which
  ``it.set_state`` turns back into that exact batch), appends the same to
  ``<workdir>/skipped_updates.jsonl`` and counts it;
- with ``train.nonfinite='halt'`` a non-finite step stops the run (the loop raises with the message);
- ``train.halt_after_skips`` skipped updates in a row (non-finite or spikes: the run is diverging or
  its data is broken) stop the run too, and :attr:`StepGuard.consecutive` tells the loop not to write a
  checkpoint while the last update was skipped.

Determinism: the limit for step ``t`` uses only losses of steps ``<= t - 2`` (the ones surely read by
then), whatever the logging and checkpoint cadence, and the window is saved in the checkpoint's
metadata, so a resumed run makes the same decisions as an uninterrupted one.
"""
from __future__ import annotations

import collections
import json
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uvjax.storage_paths import append_text, join

log = logging.getLogger(__name__)
_MAX_LOG_LINES = 50  # warnings per run; the jsonl file keeps every event


def _join(workdir: str, name: str) -> str:
    return join(workdir, name)


def data_position(it) -> dict | None:
    """Where the iterator is before its next batch: ``batch_index`` (batches drawn so far) and its
    state (``set_state`` of it reproduces the batch). None when the iterator cannot tell."""
    get = getattr(it, "get_state", None)
    pos: dict[str, Any] = {}
    counts = getattr(it, "counts", None)
    if isinstance(counts, dict) and "batches" in counts:
        pos["batch_index"] = int(counts["batches"])
    if get is not None:
        try:
            pos["iterator_state"] = get()
        except Exception as e:  # noqa: BLE001 - a position is diagnostic only
            pos["iterator_state"] = f"<unavailable: {type(e).__name__}: {e}>"
    return pos or None


class StepGuard:
    def __init__(self, nonfinite: str = "skip", spike_factor: float = 0.0, spike_window: int = 100,
                 log_path: str | None = None, halt_after_skips: int = 0):
        if nonfinite not in ("skip", "halt"):
            raise ValueError(f"train.nonfinite={nonfinite!r}; expected 'skip' or 'halt'")
        if spike_factor and spike_factor <= 1:
            raise ValueError(f"train.spike_factor={spike_factor} must be 0 (off) or > 1")
        if spike_window < 1:
            raise ValueError(f"train.spike_window={spike_window} must be >= 1")
        self.nonfinite, self.factor, self.window = nonfinite, float(spike_factor), int(spike_window)
        self.log_path = log_path
        self.pending: collections.deque = collections.deque()
        self.history: collections.deque = collections.deque(maxlen=self.window + 2)  # (step, loss)
        self.counts = {"nonfinite": 0, "spike": 0}
        self.halt_after = int(halt_after_skips or 0)  # 0 = never
        self.consecutive = 0  # skipped updates in a row, up to the last step read
        self._logged = 0

    @classmethod
    def from_config(cls, cfg, workdir: str | None, primary: bool = True) -> "StepGuard":
        t = cfg.train
        return cls(t.nonfinite, float(t.get("spike_factor", 0.0) or 0.0), int(t.get("spike_window", 100) or 100),
                   _join(workdir, "skipped_updates.jsonl") if (workdir and primary) else None,
                   halt_after_skips=int(t.get("halt_after_skips", 0) or 0))

    # ------------------------------------------------------------------ the limit
    def max_loss(self, step: int) -> float:
        """The loss above which the update of step ``step`` (1-based, the step being run) is skipped."""
        if self.factor <= 0:
            return math.inf
        losses = [loss for s, loss in self.history if s <= step - 2][-self.window:]
        if len(losses) < self.window:
            return math.inf
        return self.factor * float(np.median(losses))

    # ------------------------------------------------------------------ per-step results
    def push(self, step: int, position: dict | None, metrics: dict) -> str | None:
        """Records step ``step``'s (device) metrics; reads those of earlier steps. Returns a halt
        message when a checked step must stop the run."""
        self.pending.append((step, position, metrics))
        msg = None
        while len(self.pending) > 1:
            msg = self._check(*self.pending.popleft()) or msg
        return msg

    def flush(self) -> str | None:
        msg = None
        while self.pending:
            msg = self._check(*self.pending.popleft()) or msg
        return msg

    def _check(self, step: int, position: dict | None, metrics: dict) -> str | None:
        keys = [k for k in ("loss", "grad_norm", "skipped_nonfinite", "skipped_spike") if k in metrics]
        m = {k: float(v) for k, v in jax.device_get({k: metrics[k] for k in keys}).items()}
        loss = m["loss"]
        nonfinite = m.get("skipped_nonfinite", 0.0) > 0 or not math.isfinite(loss)
        spike = not nonfinite and m.get("skipped_spike", 0.0) > 0
        if math.isfinite(loss):
            self.history.append((step, loss))
        if not (nonfinite or spike):
            self.consecutive = 0
            return None
        reason = "nonfinite" if nonfinite else "spike"
        self.counts[reason] += 1
        self.consecutive += 1
        event = {"step": step, "reason": reason, "loss": loss, "grad_norm": m.get("grad_norm"),
                 "max_loss": self.max_loss(step) if spike else None, "data_position": position,
                 "action": "halt" if nonfinite and self.nonfinite == "halt" else "update skipped"}
        line = json.dumps(event, default=str, allow_nan=True)
        if self.log_path:  # rare events: one append each (a rewrite of the object on gs://)
            append_text(self.log_path, line + "\n")
        what = (f"non-finite loss {loss} / grad norm {m.get('grad_norm')}" if nonfinite else
                f"loss spike {loss:.4g} > {event['max_loss']:.4g} (train.spike_factor={self.factor:g} x median "
                f"of the last {self.window} losses)")
        where = json.dumps(position, default=str)
        if len(where) > 1000:
            where = where[:1000] + "...(full position in skipped_updates.jsonl)"
        if event["action"] == "halt":
            return (f"step {step}: {what} (train.nonfinite='halt'); the update was not applied; "
                    f"batch position {where}")
        if self.halt_after and self.consecutive >= self.halt_after:
            return (f"step {step}: {self.consecutive} updates in a row were skipped (last: {what}; "
                    f"train.halt_after_skips={self.halt_after}): the run is diverging or its data is broken, "
                    f"so it stops without saving them; batch position {where}; details in "
                    f"{self.log_path or 'skipped_updates.jsonl'}")
        self._logged += 1
        if self._logged <= _MAX_LOG_LINES:
            log.warning("step %d: %s: update skipped; batch position %s", step, what, where)
        return None

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict:
        return {"history": [[int(s), float(v)] for s, v in self.history], "counts": dict(self.counts),
                "consecutive": int(self.consecutive)}

    def load_state_dict(self, d: dict | None) -> None:
        if not d:
            return
        self.history.clear()
        for s, v in d.get("history", []):
            self.history.append((int(s), float(v)))
        self.counts.update({k: int(v) for k, v in d.get("counts", {}).items()})
        self.consecutive = int(d.get("consecutive", 0))


_FINITE = None


def _finite_fn():
    """One jitted reduction reused across calls (a new lambda per call would recompile every time)."""
    global _FINITE
    if _FINITE is None:
        _FINITE = jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]))
    return _FINITE


def nonfinite_leaves(tree, limit: int = 10) -> list[str]:
    """Paths of floating-point leaves of ``tree`` holding NaN/Inf (one jitted reduction)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat = [(p, x) for p, x in flat if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not flat:
        return []
    ok = jax.device_get(_finite_fn()([x for _, x in flat]))
    bad = [jax.tree_util.keystr(p) for (p, _), good in zip(flat, np.asarray(ok)) if not good]
    return bad[:limit]
