"""Export a trained unified model as one self-contained directory: the LLM as an HF Llama directory, the
image side (VQ tokenizer, code vectors, adapters, generation head) beside it, and a config with no path of
the training machine. ``uvjax.inference.loading.load_trained(DIR)`` and ``python -m uvjax.generate
--workdir=DIR`` run from it alone.

Why two parts: the decoder (LoRA merged) is a plain ``LlamaForCausalLM`` that ``transformers``,
vLLM, llama.cpp converters... load as is; the image modules have no HF class, so they go into extra
safetensors files that uvjax reads back (:func:`load_exported`, ``load_trained``).

Output directory (layout version 2):
  config.json, generation_config.json      LlamaConfig (tie_word_embeddings as trained)
  model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
  tokenizer.json, tokenizer_config.json, special_tokens_map.json, uvjax_tokenizer.json
  uvjax_image_modules.safetensors          image side of the LM (layout below)
  vq/vq.safetensors, vq/vq_config.json     the run's VQ tokenizer (code runs; vq_config.json when the run had one)
  tower/                                   feature runs: the SigLIP/CLIP tower (siglip.safetensors, or the
                                           HF directory's config.json + *.safetensors)
  uvjax_config.json                        the run's config made portable (below), when exported from a run

``uvjax_image_modules.safetensors`` keys are the uvjax param paths joined by ``/``, arrays in uvjax
layout (kernels [in, out], no transpose): ``image_codebook`` [K, code_dim] (when the model has VQ
codes), ``understanding_adapter/fc1/kernel|bias`` (+ ``fc2/...`` for mlp2x_gelu),
``generation_adapter/...`` (absent with share_adapters), ``generation_head/kernel|bias``,
``image_position_embed`` (with ``model.image.image_positions``).
Header metadata: ``format=uvjax-image-modules``, ``version=1``, ``image_config`` (JSON of
``ImageConfig``), ``hidden`` (decoder width).

``uvjax_config.json`` = the run's config with three changes. Paths into the export are relative to the export
directory: ``data.tokenizer`` = ``"."``, ``model.image.codebook_from`` = ``"vq"``, a VQ path the run's config set
(``data.vq``, ``vq.path``...) = ``"vq/vq.safetensors"``, ``towers.<kind>.path`` = ``"tower"``. Every other path of
the training machine (absolute, ``~``, ``gs://``, the training shards ``data.streams.*.paths``,
``model.pretrained.path``) is blanked, its value kept under ``exported_from.config`` at the same key path
(``exported_from.workdir``: the run directory). And an ``export`` section: ``format`` ("uvjax-export"),
``version``, ``step``, ``dtype`` (of the stored weights), ``vq`` / ``vq_config`` / ``tower`` (relative paths or
null), ``image_size`` (the size the VQ was trained at: input images are resized to it), ``image_tokens``
(codes per image), ``special_tokens`` ({name: {id, token}}: bos, eos, pad, boi, eoi, im_start, im_end),
``lora_merged`` (the run's LoRA, folded into the kernels; null without) and ``relative_paths`` (the
config keys above that point into the export).

CLI: ``python -m uvjax.export --workdir=RUN --out=DIR [--step=N] [--dtype=bfloat16]
[--max_shard_size=5GB] [--vq=FILE]``. ``--max_shard_size`` reads units as Hugging Face does: ``5GB`` =
5·10⁹ bytes, ``5GiB`` = 5·2³⁰, plain integers are bytes.

``--format=chameleon`` (shared-vocab runs: codes are vocabulary rows) writes an HF
``ChameleonForConditionalGeneration`` directory instead, the run's VQ encoder included when the VQ is
found (``--vq=FILE`` or the run's own, ``inference.decode.find_vq``): see ``weights/hf_chameleon.py``.

Over ~400 lines on purpose: one file format (the self-contained HF directory), its writer and its reader
side by side so they cannot drift.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from fractions import Fraction

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from uvjax.models.lora import merge_lora
from uvjax.weights.hf_llama import hf_config_from_model, iter_hf_export, load_hf_llama, np_dtype
from uvjax.weights.hf_siglip import SIGLIP_CONFIG_FILE, SIGLIP_FILE
from uvjax.weights.llamagen_vq import VQ_CONFIG_FILE, VQ_FILE, load_vq, read_vq_config

IMAGE_MODULES = ("image_codebook", "image_position_embed", "understanding_adapter", "generation_adapter", "generation_head")
IMAGE_FILE = "uvjax_image_modules.safetensors"
IMAGE_FORMAT = "uvjax-image-modules"
_SAFETENSORS_META = {"format": "pt"}  # transformers refuses safetensors files without it

CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}")
VICUNA_JINJA = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'] + ' ' }}{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] "
    "+ ' ' }}{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
TEMPLATE_JINJA = {"chatml": CHATML_JINJA, "vicuna_v1": VICUNA_JINJA}


def model_dict_from_decoder(dec) -> dict:
    """The hf_llama model dict for a ``DecoderConfig``."""
    return dict(vocab_size=dec.vocab_size, hidden=dec.hidden, layers=dec.layers, heads=dec.heads,
                kv_heads=dec.kv_heads, head_dim=dec.dim_head, intermediate=dec.intermediate,
                rope_base=dec.rope_base, rope_scaling=tuple(dec.rope_scaling), norm_eps=dec.norm_eps,
                tie_embeddings=dec.tie_embeddings)


def merged_params(variables: dict, lora_cfg) -> dict:
    """``variables["params"]`` with the LoRA deltas folded in (unchanged when there is no LoRA)."""
    lora = variables.get("lora") or {}
    if not lora or not lora_cfg.rank:
        return variables["params"]
    return merge_lora(variables["params"], lora, lora_cfg)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(s, what: str = "max_shard_size") -> int:
    """Bytes in ``s``, read as Hugging Face reads ``max_shard_size``: ``KB/MB/GB/TB`` are powers of 10
    (``"5GB"`` = 5·10⁹), ``KiB/MiB/GiB/TiB`` powers of 2 (``"5GiB"`` = 5·2³⁰), a plain int is bytes. Units are
    case-insensitive, except that a lowercase final ``b`` ("5Gb") is refused: transformers reads it as bits,
    huggingface_hub as bytes. ``what`` names the setting in the error."""
    if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
        n = int(s)
    else:
        m = _SIZE_RE.fullmatch(str(s)) if isinstance(s, str) else None
        unit = m.group(2) if m else ""
        if m is None or unit.upper() not in _SIZE_UNITS:
            raise ValueError(f"{what}={s!r}: expected a number of bytes or a number with a unit "
                             f"(KB, MB, GB, TB = 10^3.., KiB, MiB, GiB, TiB = 2^10..), e.g. 5GB or 200MiB")
        if unit.endswith("b") and not unit.upper().endswith("IB"):
            raise ValueError(f"{what}={s!r}: a lowercase 'b' is ambiguous (transformers reads bits, "
                             f"huggingface_hub bytes); write {m.group(1)}{unit[:-1].upper()}B for bytes")
        n = int(Fraction(m.group(1)) * _SIZE_UNITS[unit.upper()])
    if n <= 0:
        raise ValueError(f"{what}={s!r}: must be more than 0 bytes")
    return n


def write_safetensors_sharded(tensors, out: str, *, dtype: str, max_shard_bytes: int) -> list[str]:
    """Writes (name, array) pairs as HF shards; holds at most one shard in memory."""
    dt = np_dtype(dtype)
    shards: list[dict] = []
    cur, cur_bytes = {}, 0

    def flush():
        nonlocal cur, cur_bytes
        if cur:
            tmp = os.path.join(out, f".shard{len(shards)}.tmp")
            save_file(cur, tmp, metadata=_SAFETENSORS_META)
            shards.append({"tmp": tmp, "names": list(cur), "bytes": cur_bytes})
        cur, cur_bytes = {}, 0

    for name, a in tensors:
        a = np.ascontiguousarray(np.asarray(a).astype(dt, copy=False))
        if cur and cur_bytes + a.nbytes > max_shard_bytes:
            flush()
        cur[name] = a
        cur_bytes += a.nbytes
    flush()
    n = len(shards)
    if n == 1:
        os.replace(shards[0]["tmp"], os.path.join(out, "model.safetensors"))
        return ["model.safetensors"]
    weight_map, files = {}, []
    for i, s in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(s["tmp"], os.path.join(out, fn))
        files.append(fn)
        weight_map.update({k: fn for k in s["names"]})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": int(sum(s["bytes"] for s in shards))},
                   "weight_map": weight_map}, f, indent=1)
    return files


def save_hf_tokenizer(tokenizer, out: str, *, template: str | None = None, max_length: int = 4096) -> None:
    """tokenizer.json + the config files ``AutoTokenizer`` reads, plus uvjax's own meta file so
    ``TextTokenizer.load(out)`` returns the same special-token names."""
    tokenizer.save(out)  # tokenizer.json + uvjax_tokenizer.json
    inv = {i: s for s, i in tokenizer.tok.get_vocab(with_added_tokens=True).items()}
    sp = {n: inv[i] for n, i in tokenizer.ids.items()}
    extra = [sp[n] for n in ("boi", "eoi", "im_start", "im_end") if sp[n] not in (sp["bos"], sp["eos"], sp["pad"])]
    special_map = {"bos_token": sp["bos"], "eos_token": sp["eos"], "pad_token": sp["pad"],
                   "additional_special_tokens": list(dict.fromkeys(extra))}
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(max_length),
            "clean_up_tokenization_spaces": False, **special_map}
    if template in TEMPLATE_JINJA:
        tcfg["chat_template"] = TEMPLATE_JINJA[template]
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=1)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=1)


def save_image_modules(params: dict, path: str, image_cfg, hidden: int) -> list[str]:
    """Writes the image-side params (layout in the module docstring); returns the keys written."""
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (k,))
        else:
            flat["/".join(prefix)] = np.ascontiguousarray(np.asarray(node))

    for top in IMAGE_MODULES:
        if top in params:
            walk(params[top], (top,))
    ic = dataclasses.asdict(image_cfg) if dataclasses.is_dataclass(image_cfg) else dict(image_cfg)
    save_file(flat, path, metadata={"format": IMAGE_FORMAT, "version": "1", "image_config": json.dumps(ic),
                                    "hidden": str(int(hidden))})
    return sorted(flat)


def load_image_modules(path: str) -> tuple[dict, dict]:
    """(nested params of the image modules, image_config dict) from :func:`save_image_modules`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (written by uvjax.weights.export)")
    params: dict = {}
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != IMAGE_FORMAT:
            raise ValueError(f"{path} is not a uvjax image-modules file (format={meta.get('format')!r})")
        for key in f.keys():
            parts = key.split("/")
            if parts[0] not in IMAGE_MODULES:
                raise ValueError(f"{path}: unexpected key {key!r}")
            node = params
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = f.get_tensor(key)
    return params, json.loads(meta.get("image_config", "{}"))


EXPORT_FORMAT, EXPORT_VERSION = "uvjax-export", 2
VQ_DIR, TOWER_DIR = "vq", "tower"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# config keys that always name training inputs (relative paths included): blanked in the export
_TRAINING_PATH_KEYS = ("model.pretrained.path", "stages.cache_dir")
_VQ_KEYS = ("data.vq", "vq.path", "vq.params", "vq.workdir")  # what find_vq reads


def _machine_path(v) -> bool:
    """An absolute, home-relative or URL path: a place on the training machine (or its bucket)."""
    return isinstance(v, str) and bool(v) and (os.path.isabs(v) or v.startswith("~") or bool(_URL.match(v)))


def _get(d: dict, dotted: str):
    node = d
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = d
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def portable_config(cfg, *, vq: str | None = None, tower: dict | None = None,
                    tokenizer: bool = True) -> tuple[dict, dict, list]:
    """(config dict, original values, relative keys): ``cfg`` (a ConfigDict or dict) with its paths pointed into
    the export (``vq``/``tower``: their paths relative to it) or blanked (module docstring). The originals are
    nested at their own key paths so that ``exported_from.config.<key>`` reads like ``<key>``."""
    d = json.loads(cfg.to_json_best_effort()) if hasattr(cfg, "to_json_best_effort") else json.loads(json.dumps(cfg))
    originals: dict = {}
    relative: list[str] = []

    def replace(key: str, value, into_export: bool) -> None:
        old = _get(d, key)
        if old == value:
            return
        _set(originals, key, old)
        _set(d, key, value)
        if into_export:
            relative.append(key)

    if tokenizer and "data" in d:
        replace("data.tokenizer", ".", True)
    if isinstance(_get(d, "model.image"), dict) and "codebook_from" in d["model"]["image"]:
        replace("model.image.codebook_from", VQ_DIR if vq else "", bool(vq))
    for key in _VQ_KEYS:
        if _get(d, key):
            replace(key, vq or "", bool(vq))
    for name, t in (d.get("towers") or {}).items():
        if isinstance(t, dict) and t.get("path"):
            into = bool(tower) and tower.get("kind") == name
            replace(f"towers.{name}.path", tower["path"] if into else "", into)
    for name, st in ((d.get("data") or {}).get("streams") or {}).items():
        if isinstance(st, dict) and st.get("paths"):
            replace(f"data.streams.{name}.paths", [], False)
    for key in _TRAINING_PATH_KEYS:
        if _get(d, key):
            replace(key, "", False)

    def walk(node, prefix):  # anything else that names a place on the training machine
        for k, v in list(node.items()):
            key = f"{prefix}{k}"
            if key in relative:
                continue
            if isinstance(v, dict):
                walk(v, key + ".")
            elif _machine_path(v):
                replace(key, "", False)
            elif isinstance(v, list) and any(_machine_path(x) for x in v):
                replace(key, [x for x in v if not _machine_path(x)], False)

    walk(d, "")
    return d, originals, relative


def vq_image_size(vq_path: str | None, cfg) -> int | None:
    """The image size the VQ tokenizer was trained at: its ``vq_config.json`` (``data.image_size``), else the
    run's ``stages.data.image_size`` / ``data.image_size`` (the sizes the stages encoded images at)."""
    if vq_path:
        p = os.path.join(os.path.dirname(vq_path), "vq_config.json")
        if os.path.exists(p):
            size = (read_vq_config(p).get("data") or {}).get("image_size")
            if size:
                return int(size)
    get = (lambda c, k: c.get(k) if hasattr(c, "get") else None)
    stage = get(get(get(cfg, "stages") or {}, "data") or {}, "image_size")
    size = stage or get(get(cfg, "data") or {}, "image_size")
    return int(size) if size else None


def copy_vq(vq_path: str, out: str) -> tuple[str, str | None]:
    """Copies a uvjax VQ file (and the ``vq_config.json`` beside it) to ``out/vq/``; returns their paths
    relative to ``out``. The file is opened first, so a non-VQ file is refused here, not at generation."""
    if os.path.isdir(vq_path):
        vq_path = os.path.join(vq_path, VQ_FILE)
    load_vq(vq_path)  # raises naming the file when it is not a uvjax VQ file
    os.makedirs(os.path.join(out, VQ_DIR), exist_ok=True)
    shutil.copyfile(vq_path, os.path.join(out, VQ_DIR, VQ_FILE))
    src_cfg = os.path.join(os.path.dirname(vq_path), VQ_CONFIG_FILE)
    rel_cfg = None
    if os.path.exists(src_cfg):
        shutil.copyfile(src_cfg, os.path.join(out, VQ_DIR, VQ_CONFIG_FILE))
        rel_cfg = f"{VQ_DIR}/{VQ_CONFIG_FILE}"
    return f"{VQ_DIR}/{VQ_FILE}", rel_cfg


def copy_tower(path: str, out: str) -> str:
    """Copies a tower to ``out/tower/``: a uvjax tower file (``siglip.safetensors``, with its
    ``siglip_config.json``) or an HF vision directory (config.json, preprocessor config, safetensors and
    their index). Returns the path to give ``towers.encoders.tower_encoder``, relative to ``out``."""
    dst = os.path.join(out, TOWER_DIR)
    os.makedirs(dst, exist_ok=True)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        names = [f for f in sorted(os.listdir(path)) if f.endswith((".safetensors", ".safetensors.index.json"))
                 or f in ("config.json", "preprocessor_config.json")]
        if not any(f.endswith(".safetensors") for f in names):
            raise FileNotFoundError(f"tower directory {path}: no *.safetensors to export")
        for f in names:
            shutil.copyfile(os.path.join(path, f), os.path.join(dst, f))
        return TOWER_DIR
    f = os.path.join(path, SIGLIP_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise FileNotFoundError(f"tower {path}: neither an HF vision directory (config.json) nor a uvjax "
                                f"tower file ({SIGLIP_FILE})")
    shutil.copyfile(f, os.path.join(dst, SIGLIP_FILE))
    side = os.path.join(os.path.dirname(f), SIGLIP_CONFIG_FILE)
    if os.path.exists(side):
        shutil.copyfile(side, os.path.join(dst, SIGLIP_CONFIG_FILE))
    return f"{TOWER_DIR}/{SIGLIP_FILE}"


def special_tokens(tokenizer) -> dict:
    """{name: {"id", "token"}} of the tokenizer's special tokens (bos, eos, pad, boi, eoi, im_start, im_end)."""
    if tokenizer is None:
        return {}
    inv = {i: t for t, i in tokenizer.tok.get_vocab(with_added_tokens=True).items()}
    return {n: {"id": int(i), "token": inv.get(i)} for n, i in tokenizer.ids.items()}


def export_hf(variables: dict, model_cfg, tokenizer, out: str, *, dtype: str = "float32",
              template: str | None = None, max_shard_size="5GB", run_config=None,
              overwrite: bool = False, vq: str | None = None, tower: tuple[str, dict] | None = None,
              step: int | None = None, source_workdir: str | None = None) -> dict:
    """Writes ``out`` (see module docstring). ``model_cfg``: the ``UnifiedConfig``; ``variables``:
    ``{"params", "lora"}`` (LoRA merged here); ``vq``: the run's VQ file, copied into ``out/vq/``;
    ``tower``: (path, info) of a feature run's SigLIP/CLIP tower, copied into ``out/tower/``; ``run_config``:
    the run's config, written portable (with ``step``, ``source_workdir`` for provenance). Returns a summary."""
    max_shard_bytes = parse_size(max_shard_size)  # a bad size fails before anything is written
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    dec = model_cfg.decoder
    if dec.qk_norm or dec.norm_placement != "pre":  # LlamaForCausalLM has no place for them: never drop them
        raise ValueError("this model has Chameleon's q/k norms or swin norm placement, which an HF Llama "
                         "directory cannot hold: export it with --format=chameleon (export_chameleon)")
    m = model_dict_from_decoder(dec)
    params = merged_params(variables, dec.lora)
    if tokenizer is not None and tokenizer.vocab_size > dec.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {dec.vocab_size}")
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    files = write_safetensors_sharded(iter_hf_export(host, m), out, dtype=dtype, max_shard_bytes=max_shard_bytes)
    ids = tokenizer.ids if tokenizer is not None else {}
    hf_cfg = hf_config_from_model(m, dtype=dtype, bos_id=ids.get("bos"), eos_id=ids.get("eos"),
                                  pad_id=ids.get("pad"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=1)
    if ids:  # (no tokenizer: no generation_config.json)
        eos = [ids["eos"]] + ([ids["im_end"]] if template == "chatml" and ids.get("im_end") != ids.get("eos") else [])
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": ids["bos"], "eos_token_id": eos if len(eos) > 1 else eos[0],
                       "pad_token_id": ids["pad"]}, f, indent=1)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out, template=template)
    image_keys = save_image_modules(host, os.path.join(out, IMAGE_FILE), model_cfg.image, dec.hidden)
    vq_rel = vq_cfg_rel = tower_rel = None
    if vq:
        vq_rel, vq_cfg_rel = copy_vq(vq, out)
    tower_info = None
    if tower and tower[0]:
        tower_rel = copy_tower(tower[0], out)
        tower_info = {**tower[1], "path": tower_rel}
    summary = {"out": out, "weights": files, "image_keys": image_keys, "dtype": dtype, "vq": vq_rel,
               "tower": tower_rel}
    if run_config is not None:
        cfg, originals, relative = portable_config(run_config, vq=vq_rel, tower=tower_info,
                                                   tokenizer=tokenizer is not None)
        size = vq_image_size(vq, run_config)
        grid = None
        if vq:
            vcfg, _ = load_vq(os.path.join(out, vq_rel))
            grid = int(np.prod(vcfg.grid(size))) if size else None
        lora = dec.lora
        cfg["export"] = {
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "step": step, "dtype": dtype, "weights": "hf_llama",
            "vq": vq_rel, "vq_config": vq_cfg_rel, "tower": tower_info, "image_size": size, "image_tokens": grid,
            "special_tokens": special_tokens(tokenizer),
            "lora_merged": ({"rank": int(lora.rank), "alpha": float(lora.alpha), "targets": list(lora.targets)}
                            if lora.rank and variables.get("lora") else None),
            "relative_paths": relative}
        cfg["exported_from"] = {"workdir": source_workdir, "step": step, "config": originals}
        with open(os.path.join(out, "uvjax_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        summary["image_size"] = size
    return summary


def load_exported(path: str, dtype: str = "float32") -> tuple[dict, dict, dict]:
    """(variables ``{"params": ...}``, decoder model dict, image_config dict) of an exported dir:
    the HF decoder through the normal importer plus the image modules."""
    params, m = load_hf_llama(path, dtype)
    image, image_cfg = load_image_modules(os.path.join(path, IMAGE_FILE))
    params.update(image)
    return {"params": params}, m, image_cfg


if __name__ == "__main__":  # the command's first name; it lives in uvjax/export.py (the entry-point layer)
    import runpy
    runpy.run_module("uvjax.export", run_name="__main__", alter_sys=True)
