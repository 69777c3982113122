"""HF Chameleon / Anole checkpoints (``ChameleonForConditionalGeneration``) ⇄ uvjax's shared-vocab model.

Why a module beside ``hf_llama``: Chameleon's decoder is a Llama with two additions (a per-head LayerNorm
on queries and keys, and optionally the "swin" norm placement of Chameleon-30B), and its VQ codes are rows
of the one text vocabulary (``model.image.layout="shared_vocab"``). The decoder tensors go through
hf_llama's :class:`~uvjax.weights.hf_llama.StackedParams` (one copy of the model plus one tensor in
flight); the q/k norms, [layers, heads, head_dim], are filled beside it the same way.

Which vocabulary row is which code is read from the names ``IMGIMG<digits as A-J>Z`` in config.json's
``vocabulary_map`` (the tokenizer's vocabulary), never assumed to be ``code + 4`` (reference §A.3).

The VQGAN (``model.vqmodel.*``, taming naming, reference §B.7) is not part of the decoder: it is
converted to a uvjax VQ file (``save_vq``) on its own (:func:`convert_chameleon_vq`). HF's port of
Chameleon holds the encoder, the quantizer and the quant convs but no image *decoder*: such a file
encodes images (what training data needs) but cannot draw codes; it says so in its metadata
(``decoder=absent``) and :func:`require_vq_decoder` raises with the way to supply one. A missing decoder
is never filled with random weights.

Starting a run (``uvjax.weights.pretrained``): ``model.pretrained.kind="hf_chameleon"``, ``path`` the HF
directory; :func:`chameleon_preset` sets the shapes from its config.json. The tokenizer is the directory's
tokenizer.json with Chameleon's own specials by name (bos ``<s>``, eos ``</s>``, boi ``<racm3:break>``,
eoi ``<eoss>``) and the ChatML markers on reserved rows (``<reserved08708>``/``<reserved08706>``, the
latter Anole's end of turn) so the vocabulary does not grow.

Export (``chameleon_export.export_chameleon``, ``python -m uvjax.export --format=chameleon``) writes a
directory ``ChameleonForConditionalGeneration.from_pretrained`` loads: config.json (``vocabulary_map`` =
the tokenizer's vocabulary, ``vq_config``), sharded safetensors with LoRA merged, tokenizer files, and,
when the run's VQ is given, its encoder as ``model.vqmodel.*`` plus the whole uvjax VQ file
(``uvjax_vq.safetensors``, decoder included, which HF's class has no place for).

CLI: ``python -m uvjax.weights.hf_chameleon HF_DIR [--vq_out vq.safetensors]`` prints the ``config.model``
overrides and writes the VQ file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype, which safetensors asks for)
import numpy as np
import tokenizers
from safetensors import safe_open

from uvjax.data.tokenizer import IMAGE_TOKEN_PREFIX, TextTokenizer, image_code_ids, image_token_code
from uvjax.models.vq import VQConfig, param_shapes
from uvjax.weights.hf_llama import (
    IGNORABLE,
    StackedParams,
    checkpoint_files,
    iter_hf_tensors,
    model_dict_from_hf,
    np_dtype,
    read_hf_config,
    role_of_hf_name,
)
from uvjax.weights.llamagen_vq import (
    chameleon_key_to_flax,
    convert_state_dict,
    flatten_params,
    save_vq,
    unflatten_params,
)

SUPPORTED_MODEL_TYPES = ("chameleon",)
SUPPORTED_ARCHITECTURES = ("ChameleonForConditionalGeneration",)
VQ_PREFIX = "model.vqmodel."
VQ_EXPORT_FILE = "uvjax_vq.safetensors"
# role -> (uvjax path under decoder/layers, HF name under model.layers.{i}); each [layers, heads, head_dim]
QK_NORM_ROLES = {
    "q_norm_scale": (("attn", "q_norm", "scale"), "self_attn.q_norm.weight"),
    "q_norm_bias": (("attn", "q_norm", "bias"), "self_attn.q_norm.bias"),
    "k_norm_scale": (("attn", "k_norm", "scale"), "self_attn.k_norm.weight"),
    "k_norm_bias": (("attn", "k_norm", "bias"), "self_attn.k_norm.bias"),
}
_QK_BY_NAME = {hf: role for role, (_, hf) in QK_NORM_ROLES.items()}
# Chameleon's special tokens, by name (ids differ between tokenizer builds; reference §A.3)
SPECIALS = {"bos": "<s>", "eos": "</s>", "boi": "<racm3:break>", "eoi": "<eoss>"}
PAD = "<pad>"
CHAT_MARKERS = {"im_start": "<reserved08708>", "im_end": "<reserved08706>"}


# ============================================================================================ config
def read_chameleon_config(path: str) -> dict:
    """``config.json`` of a Chameleon checkpoint directory (``hf_llama.read_hf_config``'s checks)."""
    return read_hf_config(path, SUPPORTED_MODEL_TYPES, SUPPORTED_ARCHITECTURES,
                          "Chameleon/Anole (Llama-family checkpoints use model.pretrained.kind='hf')")


def code_token_ids_from_vocabulary_map(vocab: dict | None, num_codes: int, source: str = "config.json") -> tuple:
    """Vocabulary id of each VQ code 0..num_codes-1, from the ``IMGIMG…Z`` names of ``vocab``
    (name -> id). Raises naming what is wrong: no image tokens, gaps, duplicates, malformed names."""
    if not vocab:
        raise ValueError(f"{source}: no vocabulary_map; Chameleon's config.json carries the tokenizer's "
                         f"vocabulary there, and the VQ code -> vocabulary id map is read from it")
    found: dict[int, int] = {}
    for name, i in vocab.items():
        if not name.startswith(IMAGE_TOKEN_PREFIX):
            continue
        c = image_token_code(name)
        if c is None:  # HF's own mapping takes every IMGIMG… name as a code: a malformed one is a broken map
            raise ValueError(f"{source}: vocabulary_map entry {name!r} starts with {IMAGE_TOKEN_PREFIX} but is "
                             f"not an image-code name (IMGIMG<digits as A-J>Z)")
        if c in found:
            raise ValueError(f"{source}: vocabulary_map has two entries for image code {c}")
        found[c] = int(i)
    if not found:
        raise ValueError(f"{source}: vocabulary_map has no image tokens (IMGIMG…Z names): cannot map the "
                         f"{num_codes} VQ codes to vocabulary ids")
    missing = [c for c in range(num_codes) if c not in found]
    extra = sorted(c for c in found if c >= num_codes)
    if missing or extra:
        raise ValueError(f"{source}: vocabulary_map has image tokens for {len(found)} codes but vq_config."
                         f"num_embeddings={num_codes}: missing codes {missing[:5]}{'…' if len(missing) > 5 else ''}"
                         f"{f', beyond the codebook {extra[:5]}' if extra else ''}")
    return tuple(found[c] for c in range(num_codes))


def model_dict_from_chameleon(hf: dict) -> dict:
    """Decoder fields (the hf_llama model dict + ``qk_norm``, ``norm_placement``) of a Chameleon config."""
    m = model_dict_from_hf(hf)
    if m["hidden"] % m["heads"]:
        raise ValueError(f"hidden_size={m['hidden']} is not a multiple of num_attention_heads={m['heads']}")
    m["head_dim"] = m["hidden"] // m["heads"]  # Chameleon has no head_dim field: it is always hidden / heads
    m["qk_norm"] = True
    m["norm_placement"] = "swin" if hf.get("swin_norm") else "pre"
    return m


def vq_config_from_hf(vq: dict | None):
    """uvjax ``VQConfig`` for an HF ``ChameleonVQVAEConfig`` dict (``vq_config``; None = its defaults).

    Chameleon's decoder (absent from HF's port) has ``num_res_blocks + 1`` blocks per level. uvjax's VQ
    puts attention inside no level or only in the lowest one; HF places it at ``attn_resolutions``."""
    d = {"embed_dim": 256, "num_embeddings": 8192, "double_latent": False, "latent_channels": 256,
         "resolution": 512, "in_channels": 3, "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4],
         "num_res_blocks": 2, "attn_resolutions": None, "dropout": 0.0, "attn_type": "vanilla", **(vq or {})}
    if d["double_latent"]:
        raise ValueError("vq_config.double_latent=true is not supported (uvjax's VQ encoder has one latent)")
    if int(d["in_channels"]) != 3:
        raise ValueError(f"vq_config.in_channels={d['in_channels']}; uvjax's VQ reads RGB images")
    if float(d["dropout"] or 0.0) != 0.0:
        raise ValueError(f"vq_config.dropout={d['dropout']}; uvjax's VQ has no dropout")
    mult = tuple(int(x) for x in d["channel_multiplier"])
    vanilla = d["attn_type"] == "vanilla"
    res = [int(d["resolution"]) // 2 ** i for i in range(len(mult))]
    levels = [i for i, r in enumerate(res) if vanilla and r in (d["attn_resolutions"] or ())]
    if levels not in ([], [len(mult) - 1]):
        raise ValueError(f"vq_config.attn_resolutions={d['attn_resolutions']} puts attention in levels {levels} "
                         f"(resolutions {res}); uvjax's VQ supports none or only the lowest level")
    ch = int(d["base_channels"])
    if any(ch * m % 32 for m in mult):
        raise ValueError(f"vq_config.base_channels={ch} x channel_multiplier {mult}: HF's GroupNorm uses 32 "
                         f"groups, so every width must be a multiple of 32")
    return VQConfig(ch=ch, ch_mult=mult, enc_res_blocks=int(d["num_res_blocks"]),
                    dec_res_blocks=int(d["num_res_blocks"]) + 1, z_channels=int(d["latent_channels"]),
                    codebook_size=int(d["num_embeddings"]), code_dim=int(d["embed_dim"]),
                    attn_last_level=bool(levels), mid_attn=vanilla, l2_norm=False, norm_groups=32,
                    norm_eps=1e-6, legacy_beta=True).validate()


def model_overrides_from_hf(hf: dict) -> dict:
    """``config.model`` keys for a Chameleon config (a nested dict: decoder fields + ``image``)."""
    m = model_dict_from_chameleon(hf)
    vq = vq_config_from_hf(hf.get("vq_config"))
    ids = code_token_ids_from_vocabulary_map(hf.get("vocabulary_map"), vq.codebook_size)
    if max(ids) >= m["vocab_size"]:
        raise ValueError(f"config.json: image token ids reach {max(ids)}, outside vocab_size={m['vocab_size']}")
    return {**m, "image": dict(layout="shared_vocab", num_codes=vq.codebook_size, code_token_ids=ids,
                               code_dim=vq.code_dim, input_kind="codes", output_kind="codes")}


# ========================================================================================== import
class _QKNorms:
    """The four q/k norm arrays [layers, heads, head_dim], filled one layer at a time like StackedParams."""

    def __init__(self, m: dict, dtype: str, source: str):
        L, D = int(m["layers"]), int(m["head_dim"])
        self.source, self.L = source, L
        self.shapes = {r: (int(m["heads"] if r.startswith("q") else m["kv_heads"]), D) for r in QK_NORM_ROLES}
        self.arrays = {r: np.empty((L,) + s, np_dtype(dtype)) for r, s in self.shapes.items()}
        self.filled: set[tuple[str, int]] = set()

    def put(self, role: str, layer: int, value: np.ndarray, name: str) -> None:
        want = self.shapes[role]
        if tuple(value.shape) != want:
            raise ValueError(f"{self.source}: tensor {name} has shape {tuple(value.shape)}, expected {want} "
                             f"([heads, head_dim]) from the config")
        if not 0 <= layer < self.L:
            raise ValueError(f"{self.source}: tensor {name} is layer {layer}, but the config has {self.L} layers")
        if (role, layer) in self.filled:
            raise ValueError(f"{self.source}: tensor {name} appears twice")
        self.arrays[role][layer] = value
        self.filled.add((role, layer))

    def missing(self) -> list[str]:
        return [f"{r}[layer {i}]" for r in QK_NORM_ROLES for i in range(self.L) if (r, i) not in self.filled]

    def into(self, params: dict) -> dict:
        layers = params["decoder"]["layers"]
        for role, (path, _) in QK_NORM_ROLES.items():
            node = layers
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = self.arrays[role]
        return params


def _role(name: str):
    """("llama", role, layer) | ("qk", role, layer) | ("vq", None, None) | None for an HF tensor name."""
    if name.startswith(VQ_PREFIX):
        return "vq", None, None
    hit = role_of_hf_name(name)
    if hit is not None:
        return ("llama",) + hit
    if name.startswith("model.layers."):
        i, _, rest = name[len("model.layers."):].partition(".")
        if i.isdigit() and rest in _QK_BY_NAME:
            return "qk", _QK_BY_NAME[rest], int(i)
    return None


def load_hf_chameleon(path: str, dtype: str = "float32") -> tuple[dict, dict]:
    """(params, ckpt): uvjax params (``embed``, ``decoder`` with the q/k norms, ``lm_head`` when untied;
    numpy) and the checkpoint's model dict (decoder fields + ``num_codes``, ``code_token_ids``) that
    ``pretrained.check_compatible`` compares with the config. ``model.vqmodel.*`` is skipped here
    (:func:`convert_chameleon_vq` reads it)."""
    hf = read_chameleon_config(path)
    over = model_overrides_from_hf(hf)
    m = {k: v for k, v in over.items() if k != "image"}
    acc = StackedParams(m, dtype, source=path)
    norms = _QKNorms(m, dtype, path)
    unconsumed = []
    for name, t in iter_hf_tensors(checkpoint_files(path)):
        kind, role, layer = _role(name) or (None, None, None)
        if kind == "vq":
            continue
        if kind is None:
            if not IGNORABLE.fullmatch(name):
                unconsumed.append(name)
            continue
        if kind == "qk":
            norms.put(role, layer, t, name)
        elif not (role == "lm_head" and m["tie_embeddings"]):  # tied checkpoints may still store the head
            acc.put(role, layer, t, name)
    if unconsumed:
        more = f" (+{len(unconsumed) - 20} more)" if len(unconsumed) > 20 else ""
        raise ValueError(f"{path}: tensors not used by the uvjax Chameleon decoder: {unconsumed[:20]}{more}")
    miss = norms.missing()
    if miss:
        raise ValueError(f"{path}: missing tensors {miss[:20]}{f' (+{len(miss) - 20} more)' if len(miss) > 20 else ''}")
    params = norms.into(acc.finish())
    return params, {**m, "num_codes": over["image"]["num_codes"], "code_token_ids": over["image"]["code_token_ids"]}


# ============================================================================================== VQ
def _vq_state_dict(path: str) -> dict[str, np.ndarray]:
    """The ``model.vqmodel.*`` tensors (prefix removed), reading only those from each shard."""
    out = {}
    for fn in checkpoint_files(path):
        with safe_open(fn, framework="numpy") as f:
            for name in f.keys():
                if name.startswith(VQ_PREFIX):
                    out[name[len(VQ_PREFIX):]] = f.get_tensor(name).astype(np.float32)
    return out


def _convert_encoder_only(sd: dict, cfg, source: str) -> dict:
    """``convert_state_dict``'s strict conversion with the decoder left out of the targets."""
    target = {k: v for k, v in flatten_params(param_shapes(cfg), as_numpy=False).items()
              if not k.startswith("decoder/")}
    flat, problems = {}, []
    for key, arr in sd.items():
        try:
            p = chameleon_key_to_flax(key, arr.ndim, len(cfg.ch_mult))
        except KeyError:
            p = None
        if p not in target:
            problems.append(f"unused {VQ_PREFIX}{key}")
            continue
        if p.endswith("/kernel"):
            arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if tuple(arr.shape) != tuple(target[p].shape):
            problems.append(f"{VQ_PREFIX}{key}: shape {tuple(arr.shape)}, expected {tuple(target[p].shape)} for {p}")
            continue
        flat[p] = np.ascontiguousarray(arr, np.float32)
    problems += [f"missing {p}" for p in sorted(set(target) - set(flat))]
    if problems:
        raise ValueError(f"{source}: VQGAN encoder conversion failed (is vq_config the checkpoint's?): {problems[:30]}")
    return unflatten_params(flat)


def load_chameleon_vq(path: str):
    """(VQConfig, params, has_decoder) of the checkpoint's VQGAN. With ``decoder.*`` tensors (Anole ports)
    the conversion is the strict full one; without (HF's Chameleon port), encoder, quantizer and quant
    convs only."""
    hf = read_chameleon_config(path)
    cfg = vq_config_from_hf(hf.get("vq_config"))
    sd = _vq_state_dict(path)
    if not sd:
        raise ValueError(f"{path}: no {VQ_PREFIX}* tensors: the checkpoint carries no VQGAN")
    if any(k.startswith("decoder.") for k in sd):
        return cfg, convert_state_dict(sd, cfg, naming="chameleon"), True
    return cfg, _convert_encoder_only(sd, cfg, path), False


NO_DECODER = ("{src} has no VQGAN decoder (HF's Chameleon port keeps only the encoder): it encodes images "
              "but cannot turn codes into pixels. Convert Anole's tokenizer/vqgan.ckpt, which has both, with "
              "`python -m uvjax.weights.llamagen_vq vqgan.ckpt vq.safetensors --naming chameleon` and use that "
              "file instead")


def convert_chameleon_vq(path: str, out: str) -> dict:
    """Writes the checkpoint's VQGAN as a uvjax VQ file (``save_vq``); returns a summary."""
    hf = read_chameleon_config(path)
    cfg, params, has_dec = load_chameleon_vq(path)
    res = int((hf.get("vq_config") or {}).get("resolution", 512))
    save_vq(params, cfg, out, {"source": os.path.abspath(path), "naming": "chameleon",
                               "decoder": "present" if has_dec else "absent", "resolution": str(res)})
    return {"out": out, "decoder": has_dec, "codebook": [cfg.codebook_size, cfg.code_dim], "resolution": res,
            "tokens_per_image": (res // cfg.downsample) ** 2}


def require_vq_decoder(params: dict, source: str = "the VQ file") -> None:
    """Raises the clear error for VQ params without a decoder (before a decode would fail deep in Flax)."""
    if "decoder" not in params:
        raise ValueError(NO_DECODER.format(src=source))


# ======================================================================================= tokenizer
def load_chameleon_tokenizer(path: str):
    """The checkpoint's tokenizer.json as a TextTokenizer with Chameleon's specials by name (module
    docstring); checked against config.json's ``vocabulary_map`` image tokens when that file is there."""
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tj):
        raise FileNotFoundError(f"{path!r} has no tokenizer.json (Chameleon's HF fast tokenizer expected)")
    try:
        tok = tokenizers.Tokenizer.from_file(tj)
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises plain Exception)
        raise ValueError(f"{tj}: cannot read the tokenizer: {e}") from e
    absent = [s for s in SPECIALS.values() if tok.token_to_id(s) is None]
    if absent:
        raise ValueError(f"{tj}: no {absent} token(s): not a Chameleon/Anole tokenizer")
    pad = PAD if tok.token_to_id(PAD) is not None else SPECIALS["eos"]
    markers = {n: s for n, s in CHAT_MARKERS.items() if tok.token_to_id(s) is not None}  # else appended
    tt = TextTokenizer.from_tokenizers(tok, pad=pad, source=f"hf_chameleon:{path}", **SPECIALS, **markers)
    if os.path.exists(os.path.join(path, "config.json")):
        hf = read_chameleon_config(path)
        want = code_token_ids_from_vocabulary_map(hf.get("vocabulary_map"),
                                                  vq_config_from_hf(hf.get("vq_config")).codebook_size)
        if image_code_ids(tt, len(want)) != want:
            raise ValueError(f"{path}: tokenizer.json and config.json vocabulary_map disagree on the image "
                             f"token ids")
    return tt


# ============================================================================================== CLI
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m uvjax.weights.hf_chameleon",
                                 description="Inspect an HF Chameleon/Anole checkpoint; convert its VQGAN.")
    ap.add_argument("path", help="HF checkpoint directory (config.json + safetensors + tokenizer.json)")
    ap.add_argument("--vq_out", default="", help="write the VQGAN here as a uvjax VQ file")
    a = ap.parse_args(argv)
    hf = read_chameleon_config(a.path)
    over = model_overrides_from_hf(hf)
    over["image"] = {**over["image"], "code_token_ids": f"{len(over['image']['code_token_ids'])} ids from "
                     f"vocabulary_map (first {list(over['image']['code_token_ids'][:3])})"}
    report = {"model": over, "vq": dataclasses.asdict(vq_config_from_hf(hf.get("vq_config")))}
    if a.vq_out:
        report["vq_file"] = convert_chameleon_vq(a.path, a.vq_out)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
