"""The trainer's data: the grain pipeline over the stages' ArrayRecord shards, this host's share of each
global batch (``data.host_sharding``: 'records' or 'rows')."""
from __future__ import annotations

import jax

from uvjax.data import pipeline
from uvjax.models.unified import sequence_image_facts
from uvjax.training.workdir import load_text_tokenizer


class RowShardIterator:
    """``data.host_sharding='rows'``: every host runs the whole pipeline and keeps its rows of each
    global batch. Batches (and so losses) are then identical for any number of hosts, and the
    iterator state is the same on every host (saved once as JSON), so a checkpoint resumes on a
    different host count. Costs every host the full tokenisation; 'records' (default) scales instead."""

    state_is_global = True

    def __init__(self, it, process_index: int, process_count: int, local_batch: int):
        self.it, self.lo, self.hi = it, process_index * local_batch, (process_index + 1) * local_batch

    def __next__(self):
        return {k: v[self.lo:self.hi] for k, v in next(self.it).items()}

    def __iter__(self):
        return self

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    @property
    def counts(self):
        return getattr(self.it, "counts", {})

    def close(self):
        if hasattr(self.it, "close"):
            self.it.close()


def build_data_iterator(cfg, workdir: str, local_batch: int):
    """The real pipeline: grain over ArrayRecord shards of pre-tokenised records, this host's share."""
    tok = load_text_tokenizer(cfg, workdir)
    images = sequence_image_facts(cfg.model.image)  # model facts, passed (the data config is not edited)
    mode = cfg.data.get("host_sharding", "records")
    if mode == "rows":
        full = pipeline.make_train_iterator(cfg.data, tok, seq_len=int(cfg.train.seq_len), model_images=images,
                                            local_batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed))
        return RowShardIterator(full, jax.process_index(), jax.process_count(), local_batch)
    if mode != "records":
        raise ValueError(f"data.host_sharding={mode!r}; expected 'records' or 'rows'")
    return pipeline.make_train_iterator(
        cfg.data, tok, seq_len=int(cfg.train.seq_len), local_batch_size=local_batch, model_images=images,
        process_index=jax.process_index(), process_count=jax.process_count(), seed=int(cfg.train.seed))
