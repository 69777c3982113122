"""What binds a trained LM to its work directory: where the directory is, the text tokenizer it was trained
with (and the image-token map of a shared vocabulary), the input files whose digests go into every
checkpoint, and the LM fingerprint that refuses to resume a directory with another model's config."""
from __future__ import annotations

import json
import os
import tempfile

from absl import logging
from flax.traverse_util import flatten_dict

from uvjax import storage_paths as sp
from uvjax.data.tokenizer import TextTokenizer, image_code_ids, with_image_tokens
from uvjax.stage_log import fingerprint
from uvjax.training.vq_train import PARAMS_FILE
from uvjax.weights.pretrained import pretrained_spec, save_base_tokenizer


def resolve_workdir(cfg, workdir: str | None) -> str:
    """An absolute local path, or a URL (``gs://bucket/run``) kept as it is."""
    return sp.resolve(workdir or cfg.workdir or os.path.join("runs", cfg.name))


def load_text_tokenizer(cfg, workdir: str):
    """The run's text tokenizer; a ``gs://`` directory is mirrored into the local cache first
    (``storage_paths.local_tree``, once per version of its files)."""
    path = cfg.data.tokenizer or sp.join(workdir, "tokenizer")
    if not sp.exists(sp.join(path, "tokenizer.json")):
        if pretrained_spec(cfg):  # a GGUF base carries its tokenizer inside: write it out once
            if sp.is_remote(path):  # written locally, then uploaded
                with tempfile.TemporaryDirectory() as tmp:
                    save_base_tokenizer(cfg, tmp)
                    sp.upload(tmp, path)
            else:
                save_base_tokenizer(cfg, path)
    if not sp.exists(sp.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path} (config.data.tokenizer); the first-run stages "
                                f"train one, or point config.data.tokenizer at a directory that has it")
    path = sp.local_tree(path, sp.remote_cache_dir("trees"))  # a local path: itself, made absolute
    tok = TextTokenizer.load(path)
    if (cfg.model.get("image") or {}).get("layout", "two_heads") == "shared_vocab":  # codes are vocabulary rows
        tok = with_image_tokens(tok, int(cfg.model.image.num_codes))
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size} tokens ({path})")
    return tok


def bind_image_vocabulary(cfg, workdir: str, tok=None) -> None:
    """shared_vocab: ``model.image.code_token_ids`` (code -> vocabulary id) read from the tokenizer's
    image-token names, once, into the config the run saves (so a loaded run needs no tokenizer to build
    its model); a map already in the config must equal the tokenizer's."""
    if cfg.model.image.get("layout", "two_heads") != "shared_vocab":
        return
    tok = tok or load_text_tokenizer(cfg, workdir)
    ids = image_code_ids(tok, int(cfg.model.image.num_codes))
    given = tuple(int(i) for i in cfg.model.image.code_token_ids)
    if given and given != ids:
        raise ValueError(f"model.image.code_token_ids differs from the tokenizer's image tokens (first code "
                         f"-> {given[0]} in the config, {ids[0]} in the tokenizer): the run was trained with "
                         f"another tokenizer")
    with cfg.unlocked():
        cfg.model.image.code_token_ids = ids


def run_inputs(cfg, workdir: str) -> dict[str, str]:
    """The files a trained LM is bound to beyond its config: the text tokenizer and, when the stages set
    ``model.image.codebook_from``, the VQ tokenizer (its weights and config). Their digests go into every
    checkpoint's metadata (``integrity_files.input_digests``)."""
    paths = {"tokenizer": sp.join(cfg.data.tokenizer or sp.join(workdir, "tokenizer"), "tokenizer.json")}
    vq = cfg.model.image.get("codebook_from", "") if hasattr(cfg.model.image, "get") else ""
    if vq:
        d = vq if sp.isdir(vq) else os.path.dirname(vq)
        paths["vq"] = sp.join(d, PARAMS_FILE)
        paths["vq_config"] = sp.join(d, "vq_config.json")
    return paths


LM_FINGERPRINT_EXCLUDE = {"train": ("steps", "stop_at", "log_every", "checkpoint_every", "keep_checkpoints",
                                    "async_checkpoint", "progress", "spike_factor", "spike_window", "halt_after_skips",
                                    "checkpoint_readback", "probe_tolerance", "wandb", "eval_every", "eval_images"),
                          "model": ("attention", "scan_unroll"),  # how the same function is computed
                          "loss": ("fused_head_chunk",)}


def lm_identity(cfg_dict: dict) -> dict:
    """The part of a config (as a dict) that the trained LM depends on."""
    d = json.loads(json.dumps(cfg_dict, sort_keys=True))
    for section, keys in LM_FINGERPRINT_EXCLUDE.items():
        for k in keys:
            d.get(section, {}).pop(k, None)
    d.pop("stages", None)
    d.pop("workdir", None)
    for k in ("workers", "read_threads"):  # how batches are made, not which: the LM does not depend on them
        d.get("data", {}).pop(k, None)
    pre = d.get("model", {}).get("pretrained")
    if isinstance(pre, dict) and not pre.get("peft_adapter"):  # unset: runs from before the key keep their LM
        pre.pop("peft_adapter", None)
    return d


def lm_fingerprint(cfg) -> str:
    """What the trained LM depends on; extending ``train.steps`` or logging knobs keeps the run."""
    return fingerprint("lm", lm_identity(json.loads(cfg.to_json_best_effort(sort_keys=True))))


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(keys only the new config has, keys whose value differs or that the new config lacks), between
    the LM identities of two configs."""
    a, b = (flatten_dict(lm_identity(c), keep_empty_nodes=True, sep=".") for c in (old, new))
    added = sorted(k for k in b if k not in a)
    changed = sorted(k for k in a if k not in b or a[k] != b[k])
    return added, changed


def check_workdir_matches(cfg, workdir: str) -> str:
    """Refuses to resume a work dir that holds a run of a different model/data config.

    The run's own ``config.json`` (written at every start) is compared key by key with the current config:
    a key that only the current one has — a setting added to uvjax since the run started, whose default
    keeps what older code computed — does not block the resume (it is logged); a changed or removed key
    does, and the error names it."""
    fp = lm_fingerprint(cfg)
    path = sp.join(workdir, "lm_fingerprint.json")
    ckpts = sp.join(workdir, "checkpoints")
    has_ckpt = sp.isdir(ckpts) and any(d.isdigit() for d in sp.listdir(ckpts))
    if has_ckpt and sp.exists(path):
        try:
            old = str(json.loads(sp.read_text(path))["fingerprint"])
        except (ValueError, KeyError, TypeError) as e:  # damaged: the run's config.json decides instead
            logging.warning("%s is damaged (%s: %s); comparing the config key by key with config.json instead",
                            path, type(e).__name__, e)
            old = "<damaged>"
        if old != fp:
            run_cfg = sp.join(workdir, "config.json")
            if not sp.exists(run_cfg):
                raise ValueError(f"{workdir} holds a run of a different config (fingerprint {old}, now {fp}; "
                                 f"no config.json to compare keys); use another --workdir, or delete it to retrain")
            try:
                saved = json.loads(sp.read_text(run_cfg))
            except ValueError as e:
                raise ValueError(f"{run_cfg} is damaged ({e}) and {path} does not match this config, so this run "
                                 f"cannot tell whether {workdir} holds the same model; restore config.json, or use "
                                 f"another --workdir") from None
            added, changed = config_changes(saved, json.loads(cfg.to_json_best_effort()))
            if changed:
                raise ValueError(f"{workdir} holds a run of a different config: {', '.join(changed[:12])}"
                                 f"{' …' if len(changed) > 12 else ''} differ from {run_cfg}; use another "
                                 f"--workdir, or delete it to retrain")
            if added:
                logging.warning("resuming %s: config keys added since the run started (taken at their "
                                "current values): %s", workdir, ", ".join(added))
    sp.makedirs(workdir)
    sp.atomic_write_text(path, json.dumps({"fingerprint": fp}))
    return fp
