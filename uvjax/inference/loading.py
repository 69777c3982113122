"""Load a trained run for inference: config, model, merged variables and tokenizer from a work dir
(a local path or a ``gs://`` URL: ``uvjax/storage_paths.py``; orbax restores from the bucket directly)."""
from __future__ import annotations

import dataclasses

import jax
import ml_collections as mlc

from uvjax.config import model_config
from uvjax.models.unified import UnifiedConfig, UnifiedModel


@dataclasses.dataclass
class LoadedRun:
    cfg: mlc.ConfigDict
    model: UnifiedModel
    variables: dict  # {"params": ..., "lora": ...} (LoRA not merged)
    tokenizer: object
    step: int
    workdir: str

    def decoding_model(self, max_len: int) -> UnifiedModel:
        """The same model with a KV cache of ``max_len`` slots (``decode=True`` calls)."""
        mc: UnifiedConfig = self.model.cfg
        return UnifiedModel(dataclasses.replace(mc, decoder=dataclasses.replace(mc.decoder, max_cache_len=max_len)))


def load_config(workdir: str) -> mlc.ConfigDict:
    import json
    from uvjax import storage_paths as sp
    path = sp.join(workdir, "config.json")
    if not sp.exists(path):
        raise FileNotFoundError(f"{workdir} has no config.json: is it a uvjax run directory?")
    return mlc.ConfigDict(json.loads(sp.read_text(path)))


def load_trained(workdir: str, step: int | None = None) -> LoadedRun:
    """Restores the train state of ``step`` (default: latest) on one device and returns the run."""
    from uvjax.train import load_text_tokenizer
    from uvjax.training.checkpoint import Checkpointer, abstract_like
    from uvjax.training.optimizer import merge_variables
    from uvjax.training.sharding import make_mesh
    from uvjax.training.step import create_trainer

    from uvjax import storage_paths as sp
    workdir = sp.resolve(workdir)
    cfg = load_config(workdir)
    with cfg.unlocked():
        cfg.mesh.shape = (1, 1, 1)
    ckpt = Checkpointer(sp.join(workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    model = UnifiedModel(model_config(cfg).validate())
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    trainer, state = create_trainer(model, cfg, mesh, cfg.sharding.rules)
    restored = ckpt.restore(step, abstract_like(state, trainer.state_shardings))["state"]
    ckpt.close()
    variables = merge_variables(restored.trainable, restored.frozen)
    return LoadedRun(cfg=cfg, model=model, variables=variables, tokenizer=load_text_tokenizer(cfg, workdir),
                     step=int(step), workdir=workdir)
