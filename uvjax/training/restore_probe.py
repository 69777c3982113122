"""Exact resume, checked: the loss a checkpointed state gives on the batch after it, recorded with the
checkpoint and recomputed after a restore (the trainer's ``train.probe_tolerance``)."""
from __future__ import annotations

import jax
from absl import logging

from uvjax.training.checkpoint import RestoreRefused
from uvjax.training.guard import data_position
from uvjax.training.integrity import compare, tree_digests
from uvjax.training.sharding import global_batch_from_local
from uvjax.training.step import make_probe_loss


class RestoreProbe:
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
            self.fn = make_probe_loss(self.trainer, batch)
        return self.fn(state, batch)

    def arm(self, step: int) -> None:
        self.armed = int(step)

    def observe(self, state, batch, position) -> None:
        if self.armed is None:
            return
        self.pending = (self.armed, position, tree_digests(batch), self._loss(state, batch))
        self.armed = None

    def record(self, ckpt) -> None:
        if self.pending is None:
            return
        step, position, digests, loss = self.pending
        self.pending = None
        pos = position or {}
        ckpt.set_probe(step, {"loss": float(jax.device_get(loss)), "batch_index": pos.get("batch_index"),
                              "batch_digests": digests})

    def peek_final(self, ckpt, step: int, state, it) -> None:
        try:
            position = data_position(it)
            local = next(it)
        except StopIteration:
            return
        self.armed = int(step)
        self.observe(state, global_batch_from_local(local, self.mesh), position)
        self.record(ckpt)

    def check(self, step: int, state, batch, recorded: dict) -> None:
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
