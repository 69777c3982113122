"""HF Llama-family checkpoints (config.json + safetensors) → uvjax decoder params, and back.

Why this shape: a 7B checkpoint is 13–27 GB, so the importer never holds two copies. It allocates the
scan-stacked uvjax arrays once (fp32 or bf16), then reads the checkpoint one tensor at a time with
``safetensors.safe_open`` and writes each (transposed) tensor into its layer slot. Peak host memory is
one copy of the model plus one tensor.

The uvjax layout (``uvjax/models/llama.py``, ``unified.py``): kernels are [in, out] (HF Linear weights
are [out, in]); the 30/32 layers are stacked on a leading axis under ``decoder/layers``; RoPE is
rotate-half (the HF layout, so no permutation is needed here — GGUF differs, see ``gguf.py``).

Canonical tensor *roles* (``embed``, ``q``, ``attn_norm``, ...) are shared with the GGUF importer and
the exporter, so all three agree on one mapping table (:data:`LAYER_ROLES`).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype, which safetensors asks for)
import numpy as np
from safetensors import safe_open

from uvjax.data.tokenizer import TextTokenizer

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# role -> (uvjax path under decoder/layers, HF name under model.layers.{i}, is a Linear weight)
LAYER_ROLES = {
    "q": (("attn", "q", "kernel"), "self_attn.q_proj.weight", True),
    "k": (("attn", "k", "kernel"), "self_attn.k_proj.weight", True),
    "v": (("attn", "v", "kernel"), "self_attn.v_proj.weight", True),
    "o": (("attn", "o", "kernel"), "self_attn.o_proj.weight", True),
    "gate": (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", True),
    "up": (("mlp", "up", "kernel"), "mlp.up_proj.weight", True),
    "down": (("mlp", "down", "kernel"), "mlp.down_proj.weight", True),
    "attn_norm": (("attn_norm", "scale"), "input_layernorm.weight", False),
    "mlp_norm": (("mlp_norm", "scale"), "post_attention_layernorm.weight", False),
}
# role -> (uvjax path from the model root, HF name, HF layout is [out, in] i.e. needs a transpose)
GLOBAL_ROLES = {
    "embed": (("embed", "embedding"), "model.embed_tokens.weight", False),
    "final_norm": (("decoder", "final_norm", "scale"), "model.norm.weight", False),
    "lm_head": (("lm_head", "kernel"), "lm_head.weight", True),
}
# Buffers some older checkpoints carry; recomputed by the model, safe to skip.
IGNORABLE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_BY_SUFFIX = {hf: role for role, (_, hf, _) in LAYER_ROLES.items()}

_DTYPES = {"float32": np.float32, "bfloat16": None, "float16": np.float16}


def np_dtype(name: str):
    """numpy dtype for a uvjax dtype name (bf16 via ml_dtypes, which jax already depends on)."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return np.dtype(_DTYPES[name])


# ============================================================================================ config
def read_hf_config(path: str, model_types: tuple = SUPPORTED_MODEL_TYPES,
                   architectures: tuple = SUPPORTED_ARCHITECTURES, family: str = "Llama-family") -> dict:
    """``config.json`` of a checkpoint directory, with a clear error for the usual mistakes (shared by the
    Llama and Chameleon importers: ``model_types`` / ``architectures`` are what the caller reads)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF checkpoint directory {path!r} does not exist "
                                f"(set config.model.pretrained.path to a local {family} checkpoint)")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json: not an HF model directory")
    with open(cfg_path) as f:
        hf = json.load(f)
    mt, arch = hf.get("model_type"), tuple(hf.get("architectures") or ())
    if mt not in model_types:
        raise ValueError(f"{cfg_path}: model_type={mt!r} is not a supported {family} type {model_types}")
    bad = [a for a in arch if a not in architectures]
    if bad:
        raise ValueError(f"{cfg_path}: architectures {bad} not supported; expected {architectures}")
    return hf


def rope_scaling_from_hf(hf: dict) -> tuple[float, tuple]:
    """(rope_base, rope_scaling tuple as ``DecoderConfig`` expects) from transformers 4.x keys
    (``rope_theta`` + ``rope_scaling``) or 5.x keys (``rope_parameters``)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    base = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    spec = {**scaling, **params}
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind in (None, "default"):
        return base, ()
    if kind == "linear":
        return base, ("linear", float(spec["factor"]))
    if kind == "llama3":
        return base, ("llama3", float(spec["factor"]), float(spec["low_freq_factor"]),
                      float(spec["high_freq_factor"]), int(spec["original_max_position_embeddings"]))
    raise ValueError(f"rope scaling type {kind!r} is not supported (uvjax has default, linear, llama3)")


def model_dict_from_hf(hf: dict) -> dict:
    """``config.model`` keys (DecoderConfig fields) for an HF Llama config."""
    for k in ("attention_bias", "mlp_bias"):
        if hf.get(k):
            raise ValueError(f"HF config has {k}=true; the uvjax decoder has bias-free projections")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}; uvjax's SwiGLU uses silu")
    if hf.get("model_type") == "mistral" and hf.get("sliding_window"):
        raise ValueError("Mistral sliding-window attention is not implemented in uvjax")
    heads = int(hf["num_attention_heads"])
    base, scaling = rope_scaling_from_hf(hf)
    hidden = int(hf["hidden_size"])
    return dict(vocab_size=int(hf["vocab_size"]), hidden=hidden, layers=int(hf["num_hidden_layers"]),
                heads=heads, kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                intermediate=int(hf["intermediate_size"]), rope_base=base, rope_scaling=scaling,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


# ====================================================================== shapes + stacked assembler
def hf_shapes(m: dict) -> dict[str, tuple]:
    """HF-layout shape of every role ([out, in] for Linear weights) for a model dict."""
    E, D, V, F = m["hidden"], m["head_dim"] or m["hidden"] // m["heads"], m["vocab_size"], m["intermediate"]
    H, K = m["heads"], m["kv_heads"]
    s = {"q": (H * D, E), "k": (K * D, E), "v": (K * D, E), "o": (E, H * D), "gate": (F, E), "up": (F, E),
         "down": (E, F), "attn_norm": (E,), "mlp_norm": (E,), "embed": (V, E), "final_norm": (E,)}
    if not m["tie_embeddings"]:
        s["lm_head"] = (V, E)
    return s


class StackedParams:
    """Pre-allocated uvjax param arrays filled one HF-layout tensor at a time.

    ``put(role, layer, array)`` checks the shape, transposes Linear weights to [in, out], casts, and
    records the slot; ``finish()`` lists every slot never filled. Arrays are allocated lazily on the
    first put, so a failing import does not touch most of the memory."""

    def __init__(self, m: dict, dtype: str = "float32", source: str = ""):
        self.m, self.dtype, self.source = m, np_dtype(dtype), source
        self.shapes = hf_shapes(m)
        self.L = int(m["layers"])
        self.arrays: dict[str, np.ndarray] = {}
        self.filled: set[tuple[str, int]] = set()

    def _target_shape(self, role):
        shp = self.shapes[role]
        transpose = role in LAYER_ROLES and LAYER_ROLES[role][2] or role == "lm_head"
        shp = shp[::-1] if transpose else shp
        return ((self.L,) + shp if role in LAYER_ROLES else shp), transpose

    def put(self, role: str, layer: int | None, value: np.ndarray, name: str = "") -> None:
        if role not in self.shapes:
            raise ValueError(f"{self.source}: tensor {name or role} has no place in this model "
                             f"(tie_word_embeddings={self.m['tie_embeddings']})")
        want = self.shapes[role]
        if tuple(value.shape) != tuple(want):
            raise ValueError(f"{self.source}: tensor {name or role} has shape {tuple(value.shape)}, "
                             f"expected {tuple(want)} from the config")
        if role in LAYER_ROLES and not 0 <= layer < self.L:
            raise ValueError(f"{self.source}: tensor {name} is layer {layer}, but the config has {self.L} layers")
        key = (role, -1 if layer is None else layer)
        if key in self.filled:
            raise ValueError(f"{self.source}: tensor {name or role} appears twice")
        shape, transpose = self._target_shape(role)
        if role not in self.arrays:
            self.arrays[role] = np.empty(shape, self.dtype)
        v = value.T if transpose else value
        if role in LAYER_ROLES:
            self.arrays[role][layer] = v  # numpy casts on assignment: no extra full-size copy
        else:
            self.arrays[role][...] = v
        self.filled.add(key)

    def missing(self) -> list[str]:
        out = []
        for role in self.shapes:
            if role in LAYER_ROLES:
                out += [f"{role}[layer {i}]" for i in range(self.L) if (role, i) not in self.filled]
            elif (role, -1) not in self.filled:
                out.append(role)
        return out

    def finish(self) -> dict:
        """The nested uvjax params dict (embed, decoder, lm_head when untied)."""
        miss = self.missing()
        if miss:
            more = f" (+{len(miss) - 20} more)" if len(miss) > 20 else ""
            raise ValueError(f"{self.source}: missing tensors {miss[:20]}{more}")
        params: dict = {}
        for role, arr in self.arrays.items():
            path = (("decoder", "layers") + LAYER_ROLES[role][0]) if role in LAYER_ROLES else GLOBAL_ROLES[role][0]
            node = params
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = arr
        self.arrays = {}
        return params


def role_of_hf_name(name: str) -> tuple[str, int | None] | None:
    """(role, layer) of an HF tensor name, or None when it is not a Llama decoder tensor."""
    mt = _HF_LAYER.fullmatch(name)
    if mt:
        role = _HF_BY_SUFFIX.get(mt.group(2))
        return (role, int(mt.group(1))) if role else None
    for role, (_, hf, _) in GLOBAL_ROLES.items():
        if name == hf:
            return role, None
    return None


# ========================================================================================== import
def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: the shards named by ``model.safetensors.index.json``
    (all must exist), or the single ``model.safetensors`` / the one ``*.safetensors`` present."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f).get("weight_map") or {}
        files = sorted(set(wm.values()))
        absent = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are missing: {absent}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(path, found[0])]
    if not found:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {bins}: uvjax reads safetensors only; convert them first)" if bins else ""
        raise FileNotFoundError(f"{path!r} has no *.safetensors weights{hint}")
    raise FileNotFoundError(f"{path!r} holds several safetensors files {found} but no "
                            f"model.safetensors.index.json saying which belong to the model")


def iter_hf_tensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) one tensor at a time, so only one tensor is in flight."""
    for fn in files:
        with safe_open(fn, framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_hf_llama(path: str, dtype: str = "float32") -> tuple[dict, dict]:
    """(params, model_dict): uvjax params (nested dict of numpy arrays: ``embed``, ``decoder``,
    ``lm_head`` when untied) and the ``config.model`` keys of the checkpoint at ``path``."""
    hf = read_hf_config(path)
    m = model_dict_from_hf(hf)
    files = checkpoint_files(path)
    acc = StackedParams(m, dtype, source=path)
    unconsumed = []
    for name, t in iter_hf_tensors(files):
        hit = role_of_hf_name(name)
        if hit is None:
            if not IGNORABLE.fullmatch(name):
                unconsumed.append(name)
            continue
        role, layer = hit
        if role == "lm_head" and m["tie_embeddings"]:
            continue  # some tied checkpoints still store the (identical) head
        acc.put(role, layer, t, name)
    if unconsumed:
        more = f" (+{len(unconsumed) - 20} more)" if len(unconsumed) > 20 else ""
        raise ValueError(f"{path}: tensors not used by the uvjax Llama decoder: {unconsumed[:20]}{more}")
    return acc.finish(), m


def load_hf_tokenizer(path: str, **overrides):
    """The checkpoint's ``tokenizer.json`` behind :class:`~uvjax.data.tokenizer.TextTokenizer`."""
    return TextTokenizer.from_hf_dir(path, **overrides)


# ========================================================================================== export
def iter_hf_export(params: dict, m: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, [out, in] array) for every decoder tensor of uvjax ``params``, one at a time, so
    the exporter can write shards without building a second copy of the model."""
    def get(path):
        node = params
        for p in path:
            if p not in node:
                raise KeyError(f"uvjax params lack {'/'.join(path)}")
            node = node[p]
        return np.asarray(node)

    yield GLOBAL_ROLES["embed"][1], get(GLOBAL_ROLES["embed"][0])
    for i in range(int(m["layers"])):
        for role, (path, hf, linear) in LAYER_ROLES.items():
            a = get(("decoder", "layers") + path)[i]
            yield f"model.layers.{i}.{hf}", (a.T if linear else a)
    yield GLOBAL_ROLES["final_norm"][1], get(GLOBAL_ROLES["final_norm"][0])
    if not m["tie_embeddings"]:
        yield GLOBAL_ROLES["lm_head"][1], get(GLOBAL_ROLES["lm_head"][0]).T


def hf_config_from_model(m: dict, *, dtype: str = "float32", bos_id=None, eos_id=None, pad_id=None,
                         max_positions: int = 4096) -> dict:
    """A transformers ``LlamaConfig`` dict for a uvjax model dict (4.x keys, which 5.x also reads)."""
    rs = tuple(m.get("rope_scaling") or ())
    scaling = None
    if rs and rs[0] == "linear":
        scaling = {"rope_type": "linear", "factor": float(rs[1])}
    elif rs and rs[0] == "llama3":
        scaling = {"rope_type": "llama3", "factor": float(rs[1]), "low_freq_factor": float(rs[2]),
                   "high_freq_factor": float(rs[3]), "original_max_position_embeddings": int(rs[4])}
    elif rs:
        raise ValueError(f"cannot export rope_scaling {rs!r}")
    head_dim = int(m.get("head_dim") or 0) or int(m["hidden"]) // int(m["heads"])
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(m["vocab_size"]), "hidden_size": int(m["hidden"]),
        "intermediate_size": int(m["intermediate"]), "num_hidden_layers": int(m["layers"]),
        "num_attention_heads": int(m["heads"]), "num_key_value_heads": int(m["kv_heads"]),
        "head_dim": head_dim, "hidden_act": "silu", "rms_norm_eps": float(m["norm_eps"]),
        "rope_theta": float(m["rope_base"]), "rope_scaling": scaling,
        "tie_word_embeddings": bool(m["tie_embeddings"]), "attention_bias": False, "mlp_bias": False,
        "max_position_embeddings": int(max_positions), "torch_dtype": dtype,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
    }
