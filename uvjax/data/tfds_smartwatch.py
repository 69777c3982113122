"""TFDS builder ``smartwatch``: the synthetic dataset as a TFDS dataset in ArrayRecord format.

Works without TensorFlow: build with ``download_and_prepare`` and read with ``as_data_source`` /
``tfds.data_source`` / ``tfds.builder_from_directory(...).as_data_source`` (random access, fed to
grain). ``tfds.load`` / ``as_dataset`` need TensorFlow and are not supported. TFDS's ``Image`` feature
also needs TensorFlow to encode, so the example stores the whole record as msgpack bytes (the same
bytes as our own shards, so :func:`record_from_example` is the only conversion) next to ``id``,
``task`` and ``stream`` as text for filtering.

Configs: ``default`` (4,000 train / 500 test images at 128 px) and ``tiny`` (for tests); a custom
:class:`SmartWatchConfig` can be passed as ``SmartWatch(config=..., data_dir=...)``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from uvjax.data import smartwatch as sw
from uvjax.data.records import Record, record_from_bytes, record_to_bytes
from uvjax.data.tasks import stream_of


@dataclasses.dataclass
class SmartWatchConfig(tfds.core.BuilderConfig):
    seed: int = 0
    num_train: int = 4000
    num_test: int = 500
    image_size: int = 128
    time_seconds: bool = False


class SmartWatch(tfds.core.GeneratorBasedBuilder):
    """Smart Watch UI records (vqa, caption, generation) rendered by uvjax."""

    name = "smartwatch"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: hours 1..12, seeded per image, pinned font."}
    BUILDER_CONFIGS = [
        SmartWatchConfig(name="default", description="4000 train / 500 test images, 128 px"),
        SmartWatchConfig(name="tiny", description="test-sized", num_train=6, num_test=3, image_size=32),
    ]

    # Nothing is downloaded. TFDS would look for a checksums file next to the code, through a module
    # (``importlib_resources``) that tensorflow-datasets 4.9.10 uses but does not install.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Synthetic smart-watch faces with VQA, caption and text-to-image records.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "task": tfds.features.Text(),
                "stream": tfds.features.Text(),
                "record": tfds.features.Tensor(shape=(), dtype=np.object_),
            }),
            homepage="https://arxiv.org/abs/2505.23043",
        )

    def _spec(self, split: str) -> sw.SmartWatchSpec:
        c = self.builder_config
        n, start = (c.num_train, 0) if split == "train" else (c.num_test, 10**9)
        return sw.SmartWatchSpec(split, c.seed, n, start, c.image_size, c.time_seconds)

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is rendered locally
        return {s: self._generate_examples(self._spec(s)) for s in ("train", "test")}

    def _generate_examples(self, spec: sw.SmartWatchSpec):
        for rec in sw.generate(spec):
            yield rec.id, {"id": rec.id, "task": rec.task, "stream": stream_of(rec),
                           "record": record_to_bytes(rec)}


def record_from_example(ex: dict, where: str = "tfds example") -> Record:
    """A data-source example (dict with ``record`` bytes) -> Record."""
    rid = ex.get("id", b"")
    rid = rid.decode() if isinstance(rid, bytes) else str(rid)  # TFDS Text comes back as bytes
    return record_from_bytes(bytes(ex["record"]), f"{where} {rid}")


def build(data_dir: str, config: str | SmartWatchConfig = "default") -> SmartWatch:
    """Builds (once; TFDS skips a prepared version) and returns the builder."""
    b = SmartWatch(config=config, data_dir=data_dir, file_format="array_record")
    b.download_and_prepare()
    return b
