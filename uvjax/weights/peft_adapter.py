"""PEFT LoRA adapters out of uvjax and back in, so a LoRA run can be shared the way researchers share them.

Why: ``uvjax.weights.export`` merges the LoRA deltas into the kernels, which is what inference engines
want, but a LoRA run is usually shared as a small PEFT adapter on top of a known base, and a PEFT adapter
trained elsewhere is a natural starting point for a uvjax run.

Export (``export_peft`` / ``export_peft_run``; CLI
``python -m uvjax.export --format=peft --workdir=RUN --out=DIR [--base=HF_DIR] [--step=N] [--dtype=bfloat16]``)
writes PEFT's own files (``peft`` itself is not needed to write them)::

  DIR/adapter_config.json          peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
                                   target_modules (q_proj ... down_proj), base_model_name_or_path
  DIR/adapter_model.safetensors    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight [r, in],
                                   ...lora_B.weight [out, r]  (uvjax's A [in, r], B [r, out] transposed)
  DIR/tokenizer.json, tokenizer_config.json, ...   the run's tokenizer (``AutoTokenizer.from_pretrained(DIR)``)
  DIR/uvjax_config.json            the run's config (when exported from a run)
  DIR/base/                        default: the run's *un-merged* base as an HF ``LlamaForCausalLM`` directory
                                   (``uvjax.weights.export.export_hf`` without the LoRA factors), with the
                                   image modules (``uvjax_image_modules.safetensors``) beside it; then
                                   ``base_model_name_or_path`` is the relative path ``"base"``
  DIR/uvjax_image_modules.safetensors   with ``--base``: the image side (there is no base/ to hold it)

The scale is the same on both sides: uvjax's ``alpha / rank`` is PEFT's ``lora_alpha / r`` (no rsLoRA).

Loading the export (transformers + peft)::

  base = LlamaForCausalLM.from_pretrained("DIR/base")          # or your HF base with --base
  model = PeftModel.from_pretrained(base, "DIR")

PEFT passes ``base_model_name_or_path`` to ``from_pretrained`` unchanged (peft/auto.py), so the relative
``"base"`` is resolved against the *current directory*: ``AutoPeftModelForCausalLM.from_pretrained("DIR")``
works when run from inside DIR; from elsewhere load the base explicitly as above. Relative keeps DIR
movable (a copy, an upload); with ``--base`` the absolute path of that directory is written instead.

``--base=HF_DIR``: the run started from an HF Llama checkpoint (``config.model.pretrained``) and its base was
frozen. The export then checks, tensor by tensor, that the run's base still equals HF_DIR (a run that trained
the embeddings or grew the vocabulary with ``<boi>``/``<eoi>`` rows cannot be expressed as LoRA on HF_DIR
and is refused with the reason; export without ``--base`` then).

Import (continue training from a PEFT adapter): ``config.model.pretrained.peft_adapter=/path/to/adapter``
(next to ``kind``/``path`` of the base it was trained on) makes a fresh run load the adapter's factors into
the ``lora`` collection (``uvjax.weights.pretrained.load_base_into_state``); ``model.lora.rank``, ``alpha`` and
``targets`` must equal the adapter's ``r``, ``lora_alpha`` and ``target_modules`` (the error names which does
not). :func:`load_peft_adapter` is the function behind it.

What PEFT cannot hold, refused with a clear error rather than dropped: LoRA on a Chameleon decoder (q/k norms
or swin norms: not a ``LlamaForCausalLM``), LoRA factors anywhere but the seven Llama projections. What uvjax
cannot hold, refused on import: DoRA, rsLoRA, per-module ranks/alphas (``rank_pattern``/``alpha_pattern``),
LoRA biases, ``modules_to_save`` tensors, adapters on only some layers.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from types import SimpleNamespace

import jax
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype, which safetensors asks for)
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from uvjax.config import model_config
from uvjax.models.llama import DecoderConfig
from uvjax.weights.export import IMAGE_FILE, export_hf, model_dict_from_decoder, save_hf_tokenizer, save_image_modules
from uvjax.weights.hf_llama import (
    LAYER_ROLES,
    checkpoint_files,
    iter_hf_export,
    iter_hf_tensors,
    model_dict_from_hf,
    np_dtype,
    read_hf_config,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_SUBDIR = "base"
PREFIX = "base_model.model.model.layers"  # PeftModel -> LlamaForCausalLM -> LlamaModel -> layers
# uvjax projection -> HF module name under model.layers.N (q -> self_attn.q_proj, ...)
HF_MODULE = {p: LAYER_ROLES[p][1].removesuffix(".weight") for p in ("q", "k", "v", "o", "gate", "up", "down")}
# uvjax projection -> its path in the "lora" collection (factors stacked over layers on axis 0)
LORA_PATH = {p: ("decoder", "layers") + LAYER_ROLES[p][0][:-1] for p in HF_MODULE}
_BY_TARGET_NAME = {m.rsplit(".", 1)[1]: p for p, m in HF_MODULE.items()}  # "q_proj" -> "q"
# what PEFT saves (the adapter name "default" is removed on save; accept it when present)
_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])"
                  r"(?:\.default)?\.weight")


# ============================================================================================ shapes
def _decoder(model_cfg):
    """The ``DecoderConfig`` of a ``UnifiedConfig``, a ``DecoderConfig``, a run config or its ``cfg.model``."""
    if isinstance(model_cfg, DecoderConfig):
        return model_cfg
    if hasattr(model_cfg, "decoder"):
        return model_cfg.decoder

    cfg = model_cfg if "model" in model_cfg else SimpleNamespace(model=model_cfg)
    return model_config(cfg).decoder


def _io(dec, proj: str) -> tuple[int, int]:
    """(in, out) features of a projection (uvjax kernel layout)."""
    E, D, F = dec.hidden, dec.dim_head, dec.intermediate
    return {"q": (E, dec.heads * D), "k": (E, dec.kv_heads * D), "v": (E, dec.kv_heads * D),
            "o": (dec.heads * D, E), "gate": (E, F), "up": (E, F), "down": (F, E)}[proj]


def peft_key(layer: int, proj: str, factor: str) -> str:
    """PEFT's saved name of a factor: ``factor`` "A" or "B"."""
    return f"{PREFIX}.{layer}.{HF_MODULE[proj]}.lora_{factor}.weight"


def _alpha_json(alpha: float):
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def adapter_config(lora_cfg, base_model_name_or_path: str | None) -> dict:
    """``adapter_config.json`` for a uvjax ``LoRAConfig`` (the fields PEFT's ``LoraConfig`` reads; PEFT
    fills every other field with its default)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": int(lora_cfg.rank), "lora_alpha": _alpha_json(lora_cfg.alpha), "lora_dropout": float(lora_cfg.dropout),
        "target_modules": [HF_MODULE[p].rsplit(".", 1)[1] for p in lora_cfg.targets],
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }


# ============================================================================================ export
def check_expressible(variables: dict, dec) -> dict:
    """The host (numpy) ``lora`` tree, after checking that PEFT can express it as LoRA on a
    ``LlamaForCausalLM``; raises saying what it cannot."""
    if dec.qk_norm or dec.norm_placement != "pre":
        raise ValueError("this model is a Chameleon decoder (q/k norms or swin norm placement): PEFT's LoRA "
                         "format here targets LlamaForCausalLM, which cannot hold it; export the merged model "
                         "with `python -m uvjax.export --format=chameleon`")
    lora = variables.get("lora") or {}
    if not dec.lora.rank or not lora:
        raise ValueError("the model has no LoRA factors (model.lora.rank=0): there is no adapter to export; "
                         "use `python -m uvjax.export` for the full weights")
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(lora))
    known = {LORA_PATH[p] + (f,) for p in dec.lora.targets for f in ("a", "b")}
    flat = traverse_util.flatten_dict(host)
    extra = sorted("/".join(p) for p in flat if p not in known)
    if extra:
        raise ValueError(f"LoRA factors PEFT cannot express (only the Llama projections {list(HF_MODULE)} "
                         f"listed in model.lora.targets): {extra}")
    missing = sorted("/".join(p) for p in known if p not in flat)
    if missing:
        raise ValueError(f"model.lora.targets={list(dec.lora.targets)} but the lora collection lacks {missing}")
    return host


def peft_tensors(lora: dict, dec, dtype: str = "float32"):
    """(PEFT key, array) for every factor: A [r, in] = a[layer]ᵀ, B [out, r] = b[layer]ᵀ, so that PEFT's
    ``(lora_alpha/r)·B@A`` [out, in] is uvjax's ``scale·(a@b)ᵀ``."""
    dt = np_dtype(dtype)
    r = int(dec.lora.rank)
    for p in dec.lora.targets:
        node = lora
        for k in LORA_PATH[p]:
            node = node[k]
        a, b = np.asarray(node["a"]), np.asarray(node["b"])
        i, o = _io(dec, p)
        if a.shape != (dec.layers, i, r) or b.shape != (dec.layers, r, o):
            raise ValueError(f"lora/{'/'.join(LORA_PATH[p])}: a {a.shape}, b {b.shape}; expected "
                             f"{(dec.layers, i, r)} and {(dec.layers, r, o)} from the model config")
        for layer in range(dec.layers):
            yield peft_key(layer, p, "A"), np.ascontiguousarray(a[layer].T.astype(dt))
            yield peft_key(layer, p, "B"), np.ascontiguousarray(b[layer].T.astype(dt))


def _check_user_base(params: dict, dec, base_dir: str) -> None:
    """Raises unless every decoder tensor of the run equals ``base_dir``'s (compared one tensor at a time
    in the run's dtype, as the importer cast them), so the adapter on ``base_dir`` is the run."""
    theirs = model_dict_from_hf(read_hf_config(base_dir))
    ours = model_dict_from_decoder(dec)
    bad = [f"{k}: run {ours[k]!r} vs base {theirs[k]!r}" for k in ours
           if (tuple(ours[k]) != tuple(theirs[k]) if k == "rope_scaling" else
               not math.isclose(float(ours[k]), float(theirs[k]), rel_tol=1e-4) if isinstance(theirs[k], float)
               else ours[k] != theirs[k])]
    if bad:
        hint = (" (the run added vocabulary rows, e.g. <boi>/<eoi>, that the base lacks: export without "
                "--base to write the run's own base into DIR/base)" if ours["vocab_size"] != theirs["vocab_size"]
                else "")
        raise ValueError(f"--base {base_dir} is not this run's base: " + "; ".join(bad) + hint)
    want = dict(iter_hf_export(params, ours))  # views into params, no copy
    for name, t in iter_hf_tensors(checkpoint_files(base_dir)):
        if name not in want:
            continue  # e.g. a tied head stored anyway, rotary buffers
        ref = np.asarray(want.pop(name))
        got = np.asarray(t).astype(ref.dtype).astype(np.float32)
        diff = float(np.max(np.abs(got - ref.astype(np.float32)))) if got.size else 0.0
        if diff > 1e-6 * (1.0 + float(np.max(np.abs(got)))):
            raise ValueError(f"--base {base_dir}: tensor {name} differs from the run's (max |diff| {diff:.3g}): the "
                             f"run changed its base (full fine-tuning of that tensor) or started from another "
                             f"checkpoint, which a LoRA adapter cannot express; export without --base")
    if want:
        raise ValueError(f"--base {base_dir} lacks tensors {sorted(want)[:8]}")


def export_peft(variables: dict, model_cfg, tokenizer, out: str, *, base_dir: str | None = None,
                dtype: str = "float32", overwrite: bool = False, run_config=None) -> dict:
    """Writes the PEFT adapter directory ``out`` (layout in the module docstring). ``variables``:
    ``{"params", "lora"}`` unmerged; ``model_cfg``: the ``UnifiedConfig``; ``base_dir``: an HF base the run
    started from (checked against the run), else the un-merged base is written to ``out/base``."""

    dec = model_cfg.decoder
    lora = check_expressible(variables, dec)
    if tokenizer is not None and tokenizer.vocab_size > dec.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {dec.vocab_size}")
    if base_dir is not None:
        if not os.path.isdir(base_dir):
            raise FileNotFoundError(f"--base {base_dir!r} is not a directory (an HF LlamaForCausalLM checkpoint)")
        _check_user_base(jax.tree_util.tree_map(np.asarray, jax.device_get(variables["params"])), dec, base_dir)
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    template = (str(run_config.data.get("template", "")) or None) if run_config is not None else None
    summary: dict = {"out": out, "dtype": dtype}
    if base_dir is None:
        base_out = os.path.join(out, BASE_SUBDIR)
        summary["base"] = export_hf({"params": variables["params"]}, model_cfg, tokenizer, base_out, dtype=dtype,
                                    template=template, run_config=run_config)
        base_name = BASE_SUBDIR
    else:
        host = jax.tree_util.tree_map(np.asarray, jax.device_get(variables["params"]))
        summary["image_keys"] = save_image_modules(host, os.path.join(out, IMAGE_FILE), model_cfg.image, dec.hidden)
        base_name = os.path.abspath(base_dir)
    tensors = dict(peft_tensors(lora, dec, dtype))
    save_file(tensors, os.path.join(out, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config(dec.lora, base_name), f, indent=2)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out, template=template)
    if run_config is not None:
        with open(os.path.join(out, "uvjax_config.json"), "w") as f:
            f.write(run_config.to_json_best_effort(indent=2))
    summary.update(adapter=os.path.join(out, ADAPTER_WEIGHTS), tensors=len(tensors),
                   base_model_name_or_path=base_name)
    return summary


# ============================================================================================ import
def read_adapter_config(path: str) -> dict:
    """``adapter_config.json`` of a PEFT LoRA directory, refusing the variants uvjax's LoRA cannot hold."""
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"PEFT adapter directory {path!r} does not exist")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path!r} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    with open(cfg_path) as f:
        c = json.load(f)
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type={c.get('peft_type')!r}; uvjax imports LORA adapters only")
    refuse = {"use_dora": "DoRA", "use_rslora": "rsLoRA (scale alpha/sqrt(r))", "lora_bias": "LoRA biases",
              "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)", "rank_pattern": "per-module ranks (rank_pattern)",
              "alpha_pattern": "per-module alphas (alpha_pattern)", "modules_to_save": "modules_to_save",
              "layers_to_transform": "LoRA on only some layers (layers_to_transform)",
              "trainable_token_indices": "trainable_token_indices", "target_parameters": "target_parameters"}
    bad = [f"{k}={c[k]!r} ({what})" for k, what in refuse.items() if c.get(k)]
    if c.get("bias", "none") != "none":
        bad.append(f"bias={c['bias']!r} (trained biases)")
    if bad:
        raise ValueError(f"{cfg_path}: uvjax's LoRA (one rank and alpha on whole Llama projections of every layer, "
                         f"scale alpha/r) cannot hold " + ", ".join(bad))
    return c


def load_peft_adapter(path: str, model_cfg, dtype: str = "float32") -> dict:
    """The ``lora`` collection (nested numpy dict, factors stacked over layers as the scanned model holds
    them) of the PEFT LoRA adapter in ``path``. ``model_cfg``: a ``UnifiedConfig``/``DecoderConfig``, a run
    config or its ``cfg.model``; its ``lora.rank``/``alpha``/``targets`` must equal the adapter's."""
    dec = _decoder(model_cfg)
    c = read_adapter_config(path)
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    wfile = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.exists(wfile):
        bins = [f for f in os.listdir(path) if f.endswith(".bin")]
        hint = f" (found {bins}: uvjax reads safetensors only; save with safe_serialization=True)" if bins else ""
        raise FileNotFoundError(f"{path!r} has no {ADAPTER_WEIGHTS}{hint}")
    tensors = load_file(wfile)
    found: dict[tuple[str, int, str], np.ndarray] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        proj = _BY_TARGET_NAME.get(m.group(3)) if m else None
        if proj is None or HF_MODULE[proj] != f"{m.group(2)}.{m.group(3)}":
            raise ValueError(f"{wfile}: tensor {key} is not a LoRA factor of a Llama projection "
                             f"({', '.join(HF_MODULE.values())}); uvjax cannot hold it")
        layer = int(m.group(1))
        if layer >= dec.layers:
            raise ValueError(f"{wfile}: tensor {key} is layer {layer}, but the model has {dec.layers} layers "
                             f"(model.layers): the adapter belongs to another base")
        found[(proj, layer, m.group(4))] = t
    targets = [p for p in HF_MODULE if any(k[0] == p for k in found)]
    r, alpha = int(c.get("r", 8)), float(c.get("lora_alpha", 8))
    mism = []
    if r != int(dec.lora.rank):
        mism.append(f"model.lora.rank={dec.lora.rank} vs the adapter's r={r}")
    if not math.isclose(alpha, float(dec.lora.alpha), rel_tol=1e-6):
        mism.append(f"model.lora.alpha={dec.lora.alpha} vs the adapter's lora_alpha={c.get('lora_alpha')}")
    if set(targets) != set(dec.lora.targets):
        mism.append(f"model.lora.targets={list(dec.lora.targets)} vs the adapter's {targets} "
                    f"(target_modules={c.get('target_modules')})")
    if mism:
        raise ValueError(f"{cfg_path} does not match the config: " + "; ".join(mism))
    dt = np_dtype(dtype)
    lora: dict = {}
    missing = []
    for p in dec.lora.targets:
        i, o = _io(dec, p)
        a = np.empty((dec.layers, i, r), dt)
        b = np.empty((dec.layers, r, o), dt)
        for layer in range(dec.layers):
            for factor, arr, want in (("A", a, (r, i)), ("B", b, (o, r))):
                t = found.get((p, layer, factor))
                if t is None:
                    missing.append(peft_key(layer, p, factor))
                    continue
                if tuple(t.shape) != want:
                    raise ValueError(f"{wfile}: tensor {peft_key(layer, p, factor)} has shape {tuple(t.shape)}, "
                                     f"expected {want} (r={r}, {HF_MODULE[p]} {o}x{i} from the model config)")
                arr[layer] = t.T
        node = lora
        for k in LORA_PATH[p]:
            node = node.setdefault(k, {})
        node["a"], node["b"] = a, b
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ValueError(f"{wfile}: missing tensors {missing[:8]}{more}")
    return lora


# =============================================================================================== CLI
if __name__ == "__main__":  # the command's first name; it lives in uvjax/export.py (the entry-point layer)
    import runpy
    import sys
    sys.argv[1:1] = ["--format=peft"]
    runpy.run_module("uvjax.export", run_name="__main__", alter_sys=True)
