"""orbax checkpoints of {train state, data-iterator state, config}, atomic and resumable.

orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never leaves a directory that ``latest_step`` would pick. Restoring uses an abstract state carrying
the *current* shardings, so a checkpoint saved on one mesh restores onto another.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def _grain_args():
    import grain
    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


def _json_state(it) -> bool:
    """Iterators whose state is identical on every host (row-sharded) are saved once, as JSON, so the
    checkpoint restores on any host count; grain's own handler writes one file per process."""
    return getattr(it, "state_is_global", False)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            save_interval_steps=1)
        self.mgr = ocp.CheckpointManager(self.directory, options=options)

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
            items["data"] = save_cls(data_iterator)
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        return self.mgr.save(int(step), args=ocp.args.Composite(**items), force=force)

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

    def wait(self):
        self.mgr.wait_until_finished()

    def close(self):
        self.mgr.wait_until_finished()
        self.mgr.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs of ``state`` placed with ``shardings`` (a restore template)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state, shardings)
