"""Load a trained model for inference: config, model, variables and tokenizer from a run's work dir (a local
path or a ``gs://`` URL: ``uvjax/storage_paths.py``; orbax restores from the bucket directly) or from the
self-contained directory ``python -m uvjax.export`` writes (told apart by its files)."""
from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import traverse_util

from uvjax import storage_paths as sp
from uvjax.config import model_config
from uvjax.integrity_files import DamagedFile, changed_inputs, input_digests, parse_json
from uvjax.models.unified import UnifiedConfig, UnifiedModel
from uvjax.training.checkpoint import Checkpointer, abstract_like
from uvjax.training.optimizer import merge_variables
from uvjax.training.sharding import make_mesh
from uvjax.training.step import _init_variables, create_trainer
from uvjax.training.workdir import config_changes, load_text_tokenizer, run_inputs
from uvjax.weights.export import EXPORT_FORMAT, IMAGE_FILE, load_exported, model_dict_from_decoder


@dataclasses.dataclass
class LoadedRun:
    cfg: mlc.ConfigDict
    model: UnifiedModel
    variables: dict  # {"params": ..., "lora": ...} (a run: LoRA not merged; an export: merged, lora {})
    tokenizer: object
    step: int
    workdir: str

    def decoding_model(self, max_len: int) -> UnifiedModel:
        """The same model with a KV cache of ``max_len`` slots (``decode=True`` calls)."""
        mc: UnifiedConfig = self.model.cfg
        return UnifiedModel(dataclasses.replace(mc, decoder=dataclasses.replace(mc.decoder, max_cache_len=max_len)))


def load_config(workdir: str) -> mlc.ConfigDict:
    """The run's ``config.json``; a damaged one raises ``DamagedFile`` naming it and saying what to do."""
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
    saved = meta.get("config")
    if saved:
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


EXPORT_CONFIG = "uvjax_config.json"


def is_export_dir(path: str) -> bool:
    """Whether ``path`` is an export directory (``uvjax.weights.export``): its image-modules file and
    ``uvjax_config.json`` (a run has ``config.json`` + ``checkpoints/`` instead)."""
    return sp.exists(sp.join(path, IMAGE_FILE)) and sp.exists(sp.join(path, EXPORT_CONFIG))


def export_config(path: str) -> mlc.ConfigDict:
    """An export's ``uvjax_config.json`` with the paths that point into the export made absolute
    (``export.relative_paths``); a damaged file raises ``DamagedFile`` naming it."""

    f = os.path.join(path, EXPORT_CONFIG)
    todo = "It is written by `python -m uvjax.export`: export the run again, or restore the file from a copy"
    with open(f, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFile(f"{f}: damaged export config: not UTF-8 text ({e}). {todo}") from e
    d = parse_json(text, f, "export config", todo)
    exp = d.get("export") if isinstance(d, dict) else None
    if not isinstance(exp, dict) or exp.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{f} has no 'export' section of format {EXPORT_FORMAT!r}: written by an older uvjax "
                         f"(export layout 1: no VQ, machine paths). Export the run again with "
                         f"`python -m uvjax.export --workdir=RUN --out={path}`, or load the weights alone "
                         f"with uvjax.weights.export.load_exported")
    for key in exp.get("relative_paths") or ():
        node = d
        *parents, last = key.split(".")
        for k in parents:
            node = node[k]
        node[last] = os.path.normpath(os.path.join(path, node[last]))
    return mlc.ConfigDict(d)


def load_export(path: str, step: int | None = None) -> LoadedRun:
    """An export directory as a :class:`LoadedRun`: the HF decoder + image modules (LoRA already merged,
    so the model has no LoRA and ``variables["lora"]`` is empty), in the stored dtype (``model.param_dtype``
    is set to it), the exported tokenizer, ``step`` = the step exported. Param names and shapes are checked
    against the model the config describes; a mismatch names the tensors."""


    if sp.is_remote(path):  # read from a local mirror (safetensors and the tokenizer are local readers)
        path = sp.local_tree(path, sp.remote_cache_dir("trees"))
    path = os.path.abspath(path)
    cfg = export_config(path)
    exp = cfg.export
    if step is not None and exp.step is not None and int(step) != int(exp.step):
        raise ValueError(f"{path} is an export of step {exp.step}; step={step} was asked for (an export holds "
                         f"one step: export that step from the run with --step={step})")
    with cfg.unlocked():
        cfg.mesh.shape = (1, 1, 1)
        cfg.model.lora.rank = 0  # folded into the kernels by the export (export.lora_merged)
        cfg.model.param_dtype = str(exp.dtype)
        cfg.data.tokenizer = path
    mc = model_config(cfg).validate()
    model = UnifiedModel(mc)
    variables, m, _ = load_exported(path, str(exp.dtype))
    want_m = model_dict_from_decoder(mc.decoder)
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    diff = [f"{k}: uvjax_config.json {want_m[k]!r} vs config.json {m.get(k)!r}" for k in want_m
            if norm(want_m[k]) != norm(m.get(k))]
    if diff:
        raise ValueError(f"{path}: the HF config.json and uvjax_config.json describe different decoders: "
                         + "; ".join(diff))
    abstract = nn.unbox(jax.eval_shape(lambda: _init_variables(model, jax.random.key(0))))["params"]
    want = traverse_util.flatten_dict(abstract, sep="/")
    got = traverse_util.flatten_dict(variables["params"], sep="/")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = [f"{k} {tuple(np.shape(got[k]))} (expected {tuple(want[k].shape)})" for k in sorted(set(want) & set(got))
           if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if missing or extra or bad:
        raise ValueError(f"{path}: the exported weights do not fit the model uvjax_config.json describes: "
                         f"missing {missing[:12]}, unexpected {extra[:12]}, mis-shaped {bad[:12]}")
    params = traverse_util.unflatten_dict({k: jnp.asarray(got[k], want[k].dtype) for k in want}, sep="/")
    return LoadedRun(cfg=cfg, model=model, variables={"params": params, "lora": {}},
                     tokenizer=load_text_tokenizer(cfg, path), step=int(exp.step) if exp.step is not None else 0,
                     workdir=path)


def load_trained(workdir: str, step: int | None = None) -> LoadedRun:
    """Restores the train state of ``step`` (default: latest) on one device and returns the run; an export
    directory (:func:`is_export_dir`) is loaded by :func:`load_export` instead."""

    workdir = sp.resolve(workdir)
    if sp.exists(sp.join(workdir, "adapter_config.json")):  # uvjax.weights.peft_adapter's output
        raise ValueError(f"{workdir} is a PEFT adapter directory (adapter_config.json), not a run or an export: load "
                         f"it with peft (PeftModel.from_pretrained(base, dir)), or export the run it came from with "
                         f"`python -m uvjax.export` to use it with uvjax.load / uvjax.generate")
    if is_export_dir(workdir):
        return load_export(workdir, step)
    if sp.exists(sp.join(workdir, IMAGE_FILE)):
        raise FileNotFoundError(f"{workdir} is an export without {EXPORT_CONFIG} (export_hf(run_config=None)): "
                                f"export the run with `python -m uvjax.export`, or read the weights alone "
                                f"with uvjax.weights.export.load_exported")
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
