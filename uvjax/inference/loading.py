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
    """The run's ``config.json``; a damaged one raises ``DamagedFile`` naming it and saying what to do."""
    from uvjax import storage_paths as sp
    from uvjax.integrity_files import DamagedFile, parse_json
    path = sp.join(workdir, "config.json")
    if not sp.exists(path):
        raise FileNotFoundError(f"{workdir} has no config.json: is it a uvjax run directory?")
    todo = ("The training command writes it at every start: rerun the run's training command on this work "
            "directory (it resumes from the last checkpoint and rewrites config.json), or restore the file from a copy")
    try:
        text = sp.read_text(path)
    except UnicodeDecodeError as e:
        raise DamagedFile(f"{path}: damaged run config: not UTF-8 text ({e}). {todo}") from e
    cfg = parse_json(text, path, "run config", todo)
    if not isinstance(cfg, dict):
        raise DamagedFile(f"{path}: damaged run config: a JSON object expected. {todo}")
    return mlc.ConfigDict(cfg)


def _check_against_checkpoint(cfg, workdir: str, step: int, meta: dict) -> None:
    """The checkpoint's metadata (covered by its digests) holds the config and the input files' digests of the
    run that saved it: a ``config.json`` that now describes another model, or a tokenizer / VQ file that
    changed, is refused here instead of decoding with the wrong vocabulary or image size."""
    from uvjax import storage_paths as sp
    from uvjax.integrity_files import DamagedFile, changed_inputs, input_digests
    from uvjax.train import config_changes, run_inputs
    saved = meta.get("config")
    if saved:
        import json
        _, changed = config_changes(saved, json.loads(cfg.to_json_best_effort()))
        changed = [k for k in changed if k != "mesh.shape"]  # set to one device for loading
        if changed:
            raise DamagedFile(f"{sp.join(workdir, 'config.json')} differs from the config saved with checkpoint step "
                              f"{step} in {', '.join(changed[:8])}: the file was damaged or edited. Rerun the run's "
                              f"training command on this work directory (it rewrites config.json), or restore it")
    changed = changed_inputs(meta.get("inputs"), input_digests(run_inputs(cfg, workdir)))
    if changed:
        raise DamagedFile(f"checkpoint step {step} of {workdir} was trained with other files than it would be "
                          f"loaded with: {'; '.join(changed)}. Restore the original files")


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
    if ckpt.has_item(step, "meta"):
        _check_against_checkpoint(cfg, workdir, int(step), ckpt.read_meta(step) or {})
    model = UnifiedModel(model_config(cfg).validate())
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    trainer, state = create_trainer(model, cfg, mesh, cfg.sharding.rules)
    restored = ckpt.restore(step, abstract_like(state, trainer.state_shardings))["state"]
    ckpt.close()
    variables = merge_variables(restored.trainable, restored.frozen)
    return LoadedRun(cfg=cfg, model=model, variables=variables, tokenizer=load_text_tokenizer(cfg, workdir),
                     step=int(step), workdir=workdir)
