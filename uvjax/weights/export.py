"""Export a trained unified model: the LLM as an HF Llama directory, the image side beside it.

Why two parts: the decoder (LoRA merged) is a plain ``LlamaForCausalLM`` that ``transformers``,
vLLM, llama.cpp converters... load as is; the image modules have no HF class, so they go into one
extra file that uvjax reads back (:func:`load_exported`).

Output directory:
  config.json, generation_config.json      LlamaConfig (tie_word_embeddings as trained)
  model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
  tokenizer.json, tokenizer_config.json, special_tokens_map.json, uvjax_tokenizer.json
  uvjax_image_modules.safetensors          image side (layout below)
  uvjax_config.json                        the run's full config (when exported from a run)

``uvjax_image_modules.safetensors`` keys are the uvjax param paths joined by ``/``, arrays in uvjax
layout (kernels [in, out], no transpose): ``image_codebook`` [K, code_dim] (when the model has VQ
codes), ``understanding_adapter/fc1/kernel|bias`` (+ ``fc2/...`` for mlp2x_gelu),
``generation_adapter/...`` (absent with share_adapters), ``generation_head/kernel|bias``.
Header metadata: ``format=uvjax-image-modules``, ``version=1``, ``image_config`` (JSON of
``ImageConfig``), ``hidden`` (decoder width).

CLI: ``python -m uvjax.weights.export --workdir=RUN --out=DIR [--step=N] [--dtype=bfloat16]``.

``--format=chameleon`` (shared-vocab runs: codes are vocabulary rows) writes an HF
``ChameleonForConditionalGeneration`` directory instead, the run's VQ encoder included when the VQ is
found (``--vq=FILE`` or the run's own, ``inference.decode.find_vq``): see ``weights/hf_chameleon.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil

import numpy as np

from uvjax.weights.hf_llama import hf_config_from_model, iter_hf_export, load_hf_llama, np_dtype

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
    from uvjax.models.lora import merge_lora
    lora = variables.get("lora") or {}
    if not lora or not lora_cfg.rank:
        return variables["params"]
    return merge_lora(variables["params"], lora, lora_cfg)


def parse_size(s) -> int:
    """'5GB', '200MB', '64KB' or an int number of bytes."""
    if isinstance(s, (int, float)):
        return int(s)
    s = s.strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_safetensors_sharded(tensors, out: str, *, dtype: str, max_shard_bytes: int) -> list[str]:
    """Writes (name, array) pairs as HF shards; holds at most one shard in memory."""
    from safetensors.numpy import save_file
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
    from safetensors.numpy import save_file
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
    from safetensors import safe_open
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


def export_hf(variables: dict, model_cfg, tokenizer, out: str, *, dtype: str = "float32",
              template: str | None = None, max_shard_size="5GB", run_config=None,
              overwrite: bool = False) -> dict:
    """Writes ``out`` (see module docstring). ``model_cfg``: the ``UnifiedConfig``; ``variables``:
    ``{"params", "lora"}`` (LoRA merged here). Returns a summary dict."""
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
    import jax
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    files = write_safetensors_sharded(iter_hf_export(host, m), out, dtype=dtype,
                                      max_shard_bytes=parse_size(max_shard_size))
    ids = tokenizer.ids if tokenizer is not None else {}
    hf_cfg = hf_config_from_model(m, dtype=dtype, bos_id=ids.get("bos"), eos_id=ids.get("eos"),
                                  pad_id=ids.get("pad"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=1)
    eos = [ids["eos"]] + ([ids["im_end"]] if template == "chatml" and ids.get("im_end") != ids.get("eos") else [])
    if ids:
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": ids["bos"], "eos_token_id": eos if len(eos) > 1 else eos[0],
                       "pad_token_id": ids["pad"]}, f, indent=1)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out, template=template)
    image_keys = save_image_modules(host, os.path.join(out, IMAGE_FILE), model_cfg.image, dec.hidden)
    if run_config is not None:
        with open(os.path.join(out, "uvjax_config.json"), "w") as f:
            f.write(run_config.to_json_best_effort(indent=2))
    return {"out": out, "weights": files, "image_keys": image_keys, "dtype": dtype}


def load_exported(path: str, dtype: str = "float32") -> tuple[dict, dict, dict]:
    """(variables ``{"params": ...}``, decoder model dict, image_config dict) of an exported dir:
    the HF decoder through the normal importer plus the image modules."""
    params, m = load_hf_llama(path, dtype)
    image, image_cfg = load_image_modules(os.path.join(path, IMAGE_FILE))
    params.update(image)
    return {"params": params}, m, image_cfg


FORMATS = ("llama", "chameleon")


def export_run(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
               max_shard_size="5GB", overwrite: bool = False, fmt: str = "llama", vq: str | None = None) -> dict:
    """Loads a run's checkpoint (``uvjax.inference.loading.load_trained``) and exports it: ``fmt`` "llama"
    (HF Llama + image modules) or "chameleon" (``hf_chameleon.export_chameleon``; ``vq`` a uvjax VQ file,
    default the run's own when found)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}; expected one of {FORMATS}")
    from uvjax import storage_paths as sp
    from uvjax.inference.loading import load_trained
    run = load_trained(workdir, step)
    dtype = dtype or str(run.cfg.model.param_dtype)
    local = out
    if sp.is_remote(out):  # written locally, then uploaded (safetensors and HF files are local writers)
        if sp.exists(out) and sp.listdir(out) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite")
        import tempfile
        os.makedirs(sp.remote_cache_dir("export"), exist_ok=True)
        local = tempfile.mkdtemp(prefix="export-", dir=sp.remote_cache_dir("export"))
    kw = dict(dtype=dtype, template=str(run.cfg.data.get("template", "")) or None,
              max_shard_size=max_shard_size, run_config=run.cfg, overwrite=overwrite or local != out)
    if fmt == "chameleon":
        from uvjax.inference.decode import find_vq
        from uvjax.weights.hf_chameleon import export_chameleon
        vq = vq or find_vq(workdir, run.cfg)[0]
        size = ((run.cfg.get("stages") or {}).get("data") or {}).get("image_size")
        summary = export_chameleon(run.variables, run.model.cfg, run.tokenizer, local, vq=vq,
                                   image_size=int(size) if size else None, **kw)
    else:
        summary = export_hf(run.variables, run.model.cfg, run.tokenizer, local, **kw)
    if local != out:
        import shutil
        sp.upload(local, out)
        shutil.rmtree(local, ignore_errors=True)
        summary = json.loads(json.dumps(summary, default=str).replace(local, sp.resolve(out)))
    summary["step"] = run.step
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m uvjax.weights.export",
                                 description="Export a uvjax run (LoRA merged) as an HF Llama (or Chameleon) "
                                             "directory.")
    ap.add_argument("--workdir", required=True, help="run directory (holds config.json + checkpoints/)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="stored dtype (default: the run's model.param_dtype)")
    ap.add_argument("--max_shard_size", default="5GB")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--format", default="llama", choices=FORMATS,
                    help="llama: LlamaForCausalLM + uvjax image modules; chameleon: ChameleonForConditionalGeneration "
                         "(shared-vocab runs)")
    ap.add_argument("--vq", default=None, help="chameleon: uvjax VQ file to export as model.vqmodel "
                                               "(default: the run's own, when found)")
    a = ap.parse_args(argv)
    s = export_run(a.workdir, a.out, step=a.step, dtype=a.dtype, max_shard_size=a.max_shard_size,
                   overwrite=a.overwrite, fmt=a.format, vq=a.vq)
    print(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
