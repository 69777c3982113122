"""HF ``SiglipVisionModel`` / ``CLIPVisionModel`` weights -> uvjax ViT params (``uvjax.models.siglip``).

Strict in both directions, like the VQ converter: every source tensor lands on exactly one target param of
the expected shape, every target param is filled, otherwise a ValueError lists the misses (a half-loaded
tower gives plausible garbage features). Keys that are deliberately not used are listed, not guessed:

- SigLIP's MAP pooling head ``head.*`` (unused when patch features feed the LM, reference §C.2);
- the other tower and projections of a full ``SiglipModel`` / ``CLIPModel`` checkpoint (``text_model.*``,
  ``logit_scale``, ``logit_bias``, ``visual_projection``, ``text_projection``);
- the ``position_ids`` buffer some checkpoints persist.

Accepted prefixes: none (transformers 5 ``SiglipVisionModel``/``CLIPVisionModel``), ``vision_model.``
(transformers 4 vision models and every full model on the Hub).

| HF (after the prefix)                                 | uvjax                                   |
|-------------------------------------------------------|-----------------------------------------|
| embeddings.patch_embedding.weight [D,3,p,p] / .bias   | embedding/kernel [p,p,3,D] / bias       |
| embeddings.position_embedding.weight [N,D]            | pos_embedding [1,N,D]                   |
| embeddings.class_embedding [D] (CLIP)                 | cls_token [D]                           |
| pre_layrnorm.{weight,bias} (CLIP)                     | pre_norm/{scale,bias}                   |
| encoder.layers.{i}.layer_norm{1,2}.{weight,bias}      | block_{i}/norm{1,2}/{scale,bias}        |
| encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*       | block_{i}/attn/{q,k,v,out}/{kernel^T,bias} |
| encoder.layers.{i}.mlp.fc{1,2}.*                      | block_{i}/fc{1,2}/{kernel^T,bias}       |
| post_layernorm.{weight,bias}                          | post_norm/{scale,bias}                  |

Sources: a directory with ``config.json`` + ``*.safetensors`` (HF ``save_pretrained`` layout, sharded or
not), a single ``.safetensors`` file plus a config, an in-memory torch module, or a state dict.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open

from uvjax.models.siglip import CLIP_MEAN, CLIP_STD, ViTConfig, param_shapes, siglip_b16
from uvjax.weights.llamagen_vq import _to_numpy, flatten_params, load_params, save_params, unflatten_params

# A uvjax SigLIP tower on disk (uvjax.training.siglip_pretrain writes it): its weights and its ViT config.
SIGLIP_FILE = "siglip.safetensors"
SIGLIP_CONFIG_FILE = "siglip_config.json"

PREFIXES = ("vision_model.",)
_IGNORED = re.compile(r"^(text_model\.|logit_scale$|logit_bias$|visual_projection\.|text_projection\.|"
                      r"embeddings\.position_ids$|head\.)")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "layer_norm1.weight": "norm1/scale", "layer_norm1.bias": "norm1/bias",
    "layer_norm2.weight": "norm2/scale", "layer_norm2.bias": "norm2/bias",
    "mlp.fc1.weight": "fc1/kernel", "mlp.fc1.bias": "fc1/bias",
    "mlp.fc2.weight": "fc2/kernel", "mlp.fc2.bias": "fc2/bias",
    **{f"self_attn.{n}_proj.{leaf}": f"attn/{n}/{'kernel' if leaf == 'weight' else 'bias'}"
       for n in ("q", "k", "v", "out") for leaf in ("weight", "bias")},
}
_GLOBAL_MAP = {
    "embeddings.patch_embedding.weight": "embedding/kernel",
    "embeddings.patch_embedding.bias": "embedding/bias",
    "embeddings.position_embedding.weight": "pos_embedding",
    "embeddings.class_embedding": "cls_token",
    "pre_layrnorm.weight": "pre_norm/scale", "pre_layrnorm.bias": "pre_norm/bias",
    "post_layernorm.weight": "post_norm/scale", "post_layernorm.bias": "post_norm/bias",
}
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}


def hf_key_to_flax(key: str) -> str | None:
    """HF vision key (prefix already stripped) -> uvjax path; None for deliberately ignored keys.
    Raises KeyError for names outside the SigLIP/CLIP vision layout."""
    if _IGNORED.match(key):
        return None
    if key in _GLOBAL_MAP:
        return _GLOBAL_MAP[key]
    m = _LAYER.match(key)
    if m and m.group(2) in _LAYER_MAP:
        return f"block_{int(m.group(1))}/{_LAYER_MAP[m.group(2)]}"
    raise KeyError(key)


def _layout(path: str, arr: np.ndarray) -> np.ndarray:
    if path == "embedding/kernel":
        return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if path == "pos_embedding":
        return arr[None]
    if path.endswith("/kernel"):
        return arr.T  # Linear [out, in] -> [in, out]
    return arr


def vit_config_from_hf(hf: Mapping[str, Any], **overrides) -> ViTConfig:
    """transformers config dict (vision config, or a full SigLIP/CLIP config holding ``vision_config``)
    -> ViTConfig. Missing fields take the *transformers class defaults* of that model type, which is
    how the Hub's SigLIP config.json (model types only) must be read (reference §C.1)."""
    hf = dict(hf)
    mt = str(hf.get("model_type", ""))
    if "vision_config" in hf and isinstance(hf["vision_config"], Mapping):
        hf = {"model_type": mt + "_vision_model", **dict(hf["vision_config"])}
        mt = hf["model_type"]
    if mt.startswith("siglip"):
        d = dict(siglip_b16().to_dict())
    elif mt.startswith("clip"):
        # transformers CLIPVisionConfig defaults (ViT-B/32 at 224), not the L/14-336 preset
        d = dict(siglip_b16().to_dict(), patch_size=32, act="quick_gelu", norm_eps=1e-5, class_token=True,
                 pre_norm=True, patch_bias=False, mean=list(CLIP_MEAN), std=list(CLIP_STD))
    else:
        raise ValueError(f"unsupported model_type {mt!r}; expected a siglip or clip (vision) config")
    for src, dst in (("hidden_size", "width"), ("num_hidden_layers", "depth"), ("num_attention_heads", "heads"),
                     ("intermediate_size", "mlp"), ("image_size", "image_size"), ("patch_size", "patch_size"),
                     ("layer_norm_eps", "norm_eps")):
        if hf.get(src) is not None:
            d[dst] = hf[src]
    if hf.get("hidden_act") is not None:
        if hf["hidden_act"] not in _ACTS:
            raise ValueError(f"hidden_act {hf['hidden_act']!r} not supported; expected one of {sorted(_ACTS)}")
        d["act"] = _ACTS[hf["hidden_act"]]
    if hf.get("num_channels", 3) != 3:
        raise ValueError("only 3-channel images are supported")
    d.update(overrides)
    return ViTConfig.from_dict(d)


def _state_dict_and_config(src) -> tuple[Mapping[str, Any], dict | None]:
    if hasattr(src, "state_dict") and callable(src.state_dict):  # torch module
        cfg = src.config.to_dict() if hasattr(src, "config") else None
        return src.state_dict(), cfg
    if isinstance(src, Mapping):
        return src, None
    raise TypeError(f"expected a torch module or a state dict, got {type(src).__name__}")


def convert_hf_vision(src, cfg: ViTConfig | None = None, prefix: str | None = None) -> tuple[ViTConfig, dict]:
    """torch module / state dict (torch tensors or numpy) -> (ViTConfig, nested params).

    ``cfg`` defaults to the module's own config (modules) and is required for bare state dicts.
    ``prefix``: stripped from every key (default: ``vision_model.`` when present). Raises ValueError
    listing every unconsumed source key, shape mismatch and unfilled target param."""
    sd, hf_cfg = _state_dict_and_config(src)
    if cfg is None:
        if hf_cfg is None:
            raise ValueError("a bare state dict needs cfg (a ViTConfig); pass vit_config_from_hf(config_json)")
        cfg = vit_config_from_hf(hf_cfg)
    cfg = cfg.validate()
    target = flatten_params(param_shapes(cfg), as_numpy=False)
    prefixes = (prefix,) if prefix is not None else PREFIXES
    flat: dict[str, np.ndarray] = {}
    unexpected, bad_shape, ignored = [], [], []
    for key, value in sd.items():
        k = key
        for p in prefixes:
            if p and k.startswith(p):
                k = k[len(p):]
                break
        try:
            path = hf_key_to_flax(k)
        except KeyError:
            unexpected.append(key)
            continue
        if path is None:
            ignored.append(key)
            continue
        if path not in target:
            unexpected.append(f"{key} (-> {path}, not in this architecture)")
            continue
        arr = _layout(path, _to_numpy(value).astype(np.float32))
        want = tuple(target[path].shape)
        if tuple(arr.shape) != want:
            bad_shape.append(f"{key}: {tuple(arr.shape)} after layout change, expected {want} for {path}")
            continue
        if path in flat:
            unexpected.append(f"{key} (duplicate target {path})")
            continue
        flat[path] = np.ascontiguousarray(arr)
    missing = sorted(set(target) - set(flat))
    if unexpected or bad_shape or missing:
        def listing(items, limit=40):
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            return f"{len(items)}: {items[:limit]}{more}"
        msg = ["HF SigLIP/CLIP vision conversion failed (does cfg match the checkpoint?):"]
        if unexpected:
            msg.append(f"  unconsumed source keys {listing(unexpected)}")
        if bad_shape:
            msg.append(f"  shape mismatches {listing(bad_shape)}")
        if missing:
            msg.append(f"  target params not filled {listing(missing)}")
        raise ValueError("\n".join(msg))
    return cfg, unflatten_params(flat)


def read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
    """All tensors of the files as float32 numpy (bf16/fp16 checkpoints included, via torch when present)."""
    try:
        import torch  # noqa: F401
        framework = "pt"
    except ImportError:
        framework = "numpy"
    out = {}
    for f in files:
        with safe_open(f, framework=framework) as fh:
            for k in fh.keys():
                out[k] = _to_numpy(fh.get_tensor(k))
    return out


def load_hf_vision(path: str, cfg: ViTConfig | None = None, **overrides) -> tuple[ViTConfig, dict]:
    """A local HF directory (config.json + safetensors) or one .safetensors file (then ``cfg`` or a
    config.json beside it) -> (ViTConfig, params). ``overrides``: ViTConfig fields such as
    ``select_layer`` or ``feature_post_norm``."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        cfg_path = os.path.join(path, "config.json")
    else:
        files, cfg_path = [path], os.path.join(os.path.dirname(path), "config.json")
    if not files or not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"no .safetensors weights at {path}")
    if cfg is None:
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{cfg_path} not found; pass cfg=ViTConfig(...) for a bare weights file")
        with open(cfg_path) as f:
            cfg = vit_config_from_hf(json.load(f), **overrides)
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return convert_hf_vision(read_safetensors(files), cfg)


# ------------------------------------------------------------------------------------ uvjax files
def save_vit(params, cfg: ViTConfig, path: str, extra: Mapping[str, str] | None = None) -> None:
    """Params + ViTConfig (JSON in the safetensors metadata): a self-describing tower file."""
    meta = {"format": "uvjax-vit", "vit_config": cfg.to_json()}
    meta.update(extra or {})
    save_params(params, path, meta)


def load_vit(path: str) -> tuple[ViTConfig, dict]:
    params, meta = load_params(path)
    if "vit_config" not in meta:
        raise ValueError(f"{path}: no 'vit_config' metadata; was it written by uvjax save_vit?")
    return ViTConfig.from_dict(json.loads(meta["vit_config"])), params


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="HF SigLIP/CLIP vision weights -> uvjax ViT safetensors")
    p.add_argument("src", help="HF model directory (config.json + *.safetensors)")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--select_layer", type=int, default=-2)
    p.add_argument("--feature_post_norm", action="store_true")
    a = p.parse_args(argv)
    cfg, params = load_hf_vision(a.src, select_layer=a.select_layer, feature_post_norm=a.feature_post_norm)
    save_vit(params, cfg, a.out, {"source": os.path.abspath(a.src)})
    n = sum(int(np.prod(v.shape)) for v in flatten_params(params).values())
    print(f"wrote {a.out}: {n:,} params, {cfg.feature_tokens} tokens x {cfg.width}")


if __name__ == "__main__":
    main()
