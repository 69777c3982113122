"""The grain training pipeline: ArrayRecord records -> packed batches of sequence arrays.

Per stream (understanding / generation / interleaved): global record indices -> this host's
contiguous share -> seeded shuffle (reshuffled every epoch) -> repeat -> read + tokenise
(``data/sequence.py``) -> skip/count bad records. The streams meet in one weighted ``IterDataset.mix``
(exact proportions; a stream with weight 0 or no files is left out), then first-fit packing (or one
example per row), batching to the per-host batch, optional ``mp_prefetch`` workers, and a last stage
in the main process that collects the skip/truncation counters.

Everything that changes the batches lives in iterator state, so ``grain.checkpoint.CheckpointSave``
of the returned iterator, saved beside the model, resumes to exactly the batches an uninterrupted run
would have produced.

How counters survive worker processes: each kept example carries a small ``stats`` array whose row 0
holds (records consumed, records skipped as bad, records dropped as over-long, truncated?) since the
previous kept example of its stream; packing and batching carry it like any other array, and the
final stage sums and removes it. So the counts are exact (up to examples still buffered in the
packer) and are part of the checkpointed state.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_dict

from uvjax.data.arrays import FEATURE_KEY, INT_KEYS
from uvjax.data.records import null_prompt_record, record_from_bytes
from uvjax.data.sequence import DROPPED, TRUNCATED, SequenceConfig, encode_record, pad_example, validate_record
from uvjax.data.storage import RecordReader, expand_paths, host_range
from uvjax.data.tasks import STREAMS
from uvjax.data.tokenizer import ChatTemplate, TextTokenizer, get_template

STATS_KEY = "stats"
_STAT_FIELDS = ("records", "skipped", "dropped", "truncated")
# What the packer concatenates: every array of an example except ``segment_ids`` (which segment of
# the row an example is: only the packer knows, ``_FinishPacked``). ``positions`` restart at 0 in every
# example, so concatenated they are already the row's positions. (The packer reads only these keys.)
_PACKED_KEYS = tuple(k for k in INT_KEYS if k != "segment_ids")
log = logging.getLogger(__name__)


def default_data_config() -> ml_collections.ConfigDict:
    """Every data knob. ``seq_len`` and the batch size are passed by the trainer (model-owned)."""
    c = ml_collections.ConfigDict()
    c.streams = ml_collections.ConfigDict()
    for name, w in zip(STREAMS, (1.0, 1.0, 0.0)):
        # paths: directories, globs or files of ArrayRecord shards of (pre-tokenised) records.
        c.streams[name] = ml_collections.ConfigDict({"paths": (), "weight": w})
    c.template = "vicuna_v1"                               # vicuna_v1 | chatml
    c.system_prompt = config_dict.placeholder(str)         # None: template default; "": no system
    c.overflow = "truncate"                                # truncate (never inside an image) | drop
    c.image_tokens = 0                                     # codes per image, checked when > 0
    c.feature_dim = 0                                      # F of continuous (SigLIP) images; 0 = VQ
    c.codebook_size = 0                                    # codes must be < this when > 0
    c.check_tasks = True                                   # vqa/caption need a user image, etc.
    c.packing = True                                       # first-fit packing; False: 1 example/row
    c.pack_bins = 0                                        # packing bins; 0 = local batch size
    c.max_segments_per_row = 0                             # 0 = unlimited
    c.shuffle = True
    c.num_epochs = config_dict.placeholder(int)            # None = repeat forever
    c.on_error = "raise"                                   # raise | skip (count + warn)
    c.cfg_dropout = 0.0                                    # P(generation prompt -> null prompt), for CFG
    c.skip_warn_fraction = 0.01                            # warn once above this skipped fraction
    c.workers = 0                                          # mp_prefetch worker processes (0 = off)
    c.read_threads = 0                                     # grain read threads per stream (0 = main thread)
    c.worker_buffer_size = 2
    return c


def sequence_config(data_cfg: Any, seq_len: int, model_images: dict | None = None) -> SequenceConfig:
    """``model_images``: what the model reads (``codebook_size``, ``feature_dim``), given by the trainer from
    the model config (``models.unified.sequence_image_facts``) so the data config is not edited at run time;
    without it (the pipeline on its own) ``data.codebook_size`` / ``data.feature_dim`` are used."""
    m = model_images or {}
    return SequenceConfig(seq_len=seq_len, overflow=data_cfg.overflow,
                          image_tokens=int(data_cfg.image_tokens),
                          feature_dim=int(m.get("feature_dim", data_cfg.feature_dim)),
                          codebook_size=int(m.get("codebook_size", data_cfg.codebook_size)),
                          check_tasks=bool(data_cfg.check_tasks))


def _validate(data_cfg: Any, seq_len: int, local_batch_size: int) -> None:
    if data_cfg.on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {data_cfg.on_error!r}")
    if seq_len < 2 or local_batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and local_batch_size >= 1, got {seq_len}, {local_batch_size}")
    unknown = set(data_cfg.streams.keys()) - set(STREAMS)
    if unknown:
        raise ValueError(f"unknown data streams {sorted(unknown)}; expected {STREAMS}")
    for name in data_cfg.streams.keys():
        if float(data_cfg.streams[name].weight) < 0:
            raise ValueError(f"data.streams.{name}.weight must be >= 0")


# ------------------------------------------------------------------------------ per-record transform
class ReadEncode:
    """Global record index -> unpadded sequence arrays (+ ``stats``), or a skip marker.

    Module-level and picklable so ``mp_prefetch`` workers can run it."""

    def __init__(self, reader: RecordReader, tokenizer: TextTokenizer, template: ChatTemplate,
                 cfg: SequenceConfig, on_error: str, cfg_dropout: float = 0.0, seed: int = 0):
        self.reader, self.tokenizer, self.template = reader, tokenizer, template
        self.cfg, self.on_error = cfg, on_error
        self.cfg_dropout, self.seed = float(cfg_dropout), int(seed)

    def encode(self, index: int):
        where = self.reader.where(index)
        try:
            data = self.reader.read_bytes(index)
        except ValueError:
            raise  # already names the shard and the record (RecordReader.read_bytes)
        except Exception as e:  # a damaged shard chunk: report it as data, like a bad record
            raise ValueError(f"{where}: unreadable record ({type(e).__name__}: {e})") from e
        rec = record_from_bytes(data, where)
        cfg, where = self.cfg, f"{where} (id {rec.id!r})"
        if self.cfg_dropout > 0 and np.random.default_rng([self.seed, 4099, index]).random() < self.cfg_dropout:
            validate_record(rec, self.tokenizer, cfg, where)  # the record as stored must be valid
            rec = null_prompt_record(rec)  # classifier-free guidance: learn the unconditional image too
            # its user images are gone by design (an edit's or correction's input image too): the task's
            # image counts no longer apply to it
            cfg = dataclasses.replace(cfg, check_tasks=False)
        return encode_record(rec, self.tokenizer, self.template, cfg, pad=False, where=where)

    def __call__(self, index: int) -> dict[str, Any]:
        try:
            enc = self.encode(int(index))
        except ValueError as e:
            if self.on_error == "raise":
                raise
            self._logged = getattr(self, "_logged", 0) + 1
            if self._logged <= 20 or self._logged % 1000 == 0:  # bounded log volume per process
                log.warning("skipping bad record (#%d in this process): %s", self._logged, e)
            return {"_skip": 1}
        if enc.status == DROPPED:
            return {"_skip": 0}
        ex = dict(enc.arrays)  # one segment: segment_ids 1, positions 0..n-1 (encode_record)
        ex["_truncated"] = int(enc.status == TRUNCATED)
        return ex


class _AttachStats(grain.IterDataset):
    """Drops skip markers and attaches the per-example ``stats`` counters (see module doc)."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self):
        return _AttachStatsIterator(self._parent.__iter__())


# A stream whose last this-many records were all skipped or dropped cannot produce data (e.g. a
# sequence length shorter than every record): fail with a message instead of spinning forever.
MAX_CONSECUTIVE_REJECTED = 2000


class _AttachStatsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._skipped = 0
        self._dropped = 0

    def __next__(self):
        while True:
            ex = next(self._parent)
            if "_skip" in ex:
                self._skipped += ex["_skip"]
                self._dropped += 1 - ex["_skip"]
                if self._skipped + self._dropped >= MAX_CONSECUTIVE_REJECTED:
                    raise ValueError(
                        f"{self._skipped + self._dropped} consecutive records were rejected "
                        f"({self._dropped} too long for seq_len with data.overflow, {self._skipped} bad): "
                        f"raise train.seq_len, shorten data.system_prompt, or fix the data")
                continue
            truncated = ex.pop("_truncated")
            st = np.zeros((len(ex["tokens"]), len(_STAT_FIELDS)), np.int32)
            st[0] = (1 + self._skipped + self._dropped, self._skipped, self._dropped, truncated)
            self._skipped = self._dropped = 0
            ex[STATS_KEY] = st
            return ex

    def get_state(self):
        return {"parent": self._parent.get_state(), "skipped": self._skipped, "dropped": self._dropped}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._skipped, self._dropped = int(state["skipped"]), int(state["dropped"])


class _FinishPacked:
    """Packer output -> the arrays.py contract: the examples' own arrays concatenated (``positions``
    included: each restarts at 0), and the packer's per-row segment numbering (1..n, 0 = pad) of
    ``tokens`` as ``segment_ids``."""

    def __call__(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: ex[k] for k in ex if not k.endswith(("_segment_ids", "_positions"))}
        out["segment_ids"] = ex["tokens_segment_ids"].astype(np.int32)
        return out


class _PadOne:
    """One example per row: the example (segment 1, positions 0..n-1) padded to the row length."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return pad_example(ex, self.seq_len)


# ------------------------------------------------------------------------------ counters (main process)
class _CollectStats(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, warn_fraction: float):
        super().__init__(parent)
        self.warn_fraction = warn_fraction

    def __iter__(self):
        return DataIterator(self._parent.__iter__(), self.warn_fraction)


class DataIterator(grain.DatasetIterator):
    """The training iterator: batches of the arrays.py contract, plus ``counts`` (records read,
    skipped as bad, dropped as over-long, truncated, batches) for the trainer to log."""

    def __init__(self, parent: grain.DatasetIterator, warn_fraction: float):
        super().__init__(parent)
        self.warn_fraction = warn_fraction
        self.counts = {k: 0 for k in _STAT_FIELDS + ("batches",)}
        self._warned = False

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        st = batch.pop(STATS_KEY)
        sums = st.reshape(-1, st.shape[-1]).sum(0)
        for k, v in zip(_STAT_FIELDS, sums):
            self.counts[k] += int(v)
        self.counts["batches"] += 1
        c = self.counts
        if (not self._warned and c["records"] >= 100
                and c["skipped"] > self.warn_fraction * c["records"]):
            self._warned = True
            msg = (f"data: {c['skipped']} of {c['records']} records skipped as bad "
                   f"(> {self.warn_fraction:.0%}); see the 'skipping bad record' log lines")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "counts": dict(self.counts)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.counts = {k: int(v) for k, v in state["counts"].items()}

    def close(self) -> None:
        p = self._parent
        if hasattr(p, "close"):
            p.close()


# ------------------------------------------------------------------------------ assembly
def _stream_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), 7919, stream]).generate_state(1)[0])


def stream_dataset(paths: list[str], tokenizer: TextTokenizer, template: ChatTemplate,
                   seq_cfg: SequenceConfig, data_cfg: Any, *, process_index: int, process_count: int,
                   seed: int, stream: int, fraction: float = 1.0) -> grain.IterDataset:
    """``fraction`` < 1 keeps the first ``round(fraction * n)`` records of the stream (records are stored
    in image-index order and images are drawn independently, so this is a random subset, and a smaller
    fraction is always contained in a larger one: data-scaling curves without re-tokenising)."""
    reader = RecordReader(paths)
    n = len(reader) if fraction >= 1.0 else int(round(len(reader) * float(fraction)))
    lo, hi = host_range(n, process_index, process_count)
    if hi <= lo:
        raise ValueError(f"stream with {len(reader)} records in {paths[:3]}... leaves host "
                         f"{process_index} of {process_count} nothing to read")
    ds = grain.MapDataset.range(lo, hi)
    if data_cfg.shuffle:
        ds = ds.shuffle(seed=_stream_seed(seed, stream))
    ds = ds.repeat(data_cfg.num_epochs)
    ds = ds.map(ReadEncode(reader, tokenizer, template, seq_cfg, data_cfg.on_error,
                           float(data_cfg.get("cfg_dropout", 0.0) or 0.0), seed))
    # grain's default (16 read threads, 500 records ahead) costs 2.5x the CPU per batch of reading in the
    # main thread on a 2-core machine (GIL hand-offs and a 500-future poll per record) and takes it from
    # the XLA step running beside it; the data (and its order) are the same either way
    threads = int(data_cfg.get("read_threads", 0) or 0)
    return _AttachStats(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=32 * threads)))


def make_train_dataset(data_cfg: Any, tokenizer: TextTokenizer, *, seq_len: int,
                       local_batch_size: int, process_index: int = 0, process_count: int = 1,
                       seed: int = 0, model_images: dict | None = None) -> grain.IterDataset:
    """The pipeline as a grain ``IterDataset`` (iterate it for a :class:`DataIterator`)."""
    _validate(data_cfg, seq_len, local_batch_size)
    template = get_template(data_cfg.template, data_cfg.system_prompt)
    seq_cfg = sequence_config(data_cfg, seq_len, model_images)
    parts, weights = [], []
    for i, name in enumerate(STREAMS):
        if name not in data_cfg.streams:
            continue
        s = data_cfg.streams[name]
        paths = expand_paths(list(s.paths)) if s.paths else []
        # optional ``fraction`` (not in the defaults, so existing runs keep their fingerprints)
        fraction = float(s.get("fraction", 1.0))
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"data.streams.{name}.fraction={fraction} must be in [0, 1]")
        if float(s.weight) <= 0 or not paths or fraction == 0.0:
            continue
        parts.append(stream_dataset(paths, tokenizer, template, seq_cfg, data_cfg,
                                    process_index=process_index, process_count=process_count,
                                    seed=seed, stream=i, fraction=fraction))
        weights.append(float(s.weight))
    if not parts:
        raise ValueError("no data: every stream in data.streams has weight 0 or no shard files")
    ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, weights)
    if data_cfg.packing:
        keys = _PACKED_KEYS + (STATS_KEY,) + ((FEATURE_KEY,) if seq_cfg.feature_dim else ())
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={k: seq_len for k in keys},
            num_packing_bins=int(data_cfg.pack_bins) or local_batch_size,
            seed=_stream_seed(seed, 99), shuffle_bins=True,
            meta_features=tuple(k for k in keys if k != "tokens"),
            max_sequences_per_bin=int(data_cfg.max_segments_per_row) or None)
        ds = ds.map(_FinishPacked())
    else:
        ds = ds.map(_PadOne(seq_len))
    ds = ds.batch(local_batch_size, drop_remainder=True)
    if data_cfg.workers:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data_cfg.workers), per_worker_buffer_size=int(data_cfg.worker_buffer_size)))
    return _CollectStats(ds, float(data_cfg.skip_warn_fraction))


def make_train_iterator(data_cfg: Any, tokenizer: TextTokenizer, *, seq_len: int,
                        local_batch_size: int, process_index: int = 0, process_count: int = 1,
                        seed: int = 0, model_images: dict | None = None) -> DataIterator:
    """Batches ``{tokens, modality, text_target, image_target, segment_ids, positions[, features]}``
    of shape [local_batch_size, seq_len] for this host (pass ``jax.process_index()`` /
    ``jax.process_count()``). Checkpoint with ``grain.checkpoint.CheckpointSave(it)``; read the
    counters from ``it.counts``; call ``it.close()`` when done (worker processes)."""
    return iter(make_train_dataset(data_cfg, tokenizer, seq_len=seq_len,
                                   local_batch_size=local_batch_size, process_index=process_index,
                                   process_count=process_count, seed=seed, model_images=model_images))
