"""A shared-vocab uvjax run as an HF ``ChameleonForConditionalGeneration`` directory (LoRA merged; the VQGAN
under ``model.vqmodel.*`` when given): the writing side of ``hf_chameleon.py``, which reads that format."""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterator

import jax
import numpy as np

from uvjax.data.tokenizer import image_code_ids, image_token_name
from uvjax.weights.export import (
    CHATML_JINJA,
    merged_params,
    model_dict_from_decoder,
    parse_size,
    save_hf_tokenizer,
    write_safetensors_sharded,
)
from uvjax.weights.hf_chameleon import QK_NORM_ROLES, SUPPORTED_ARCHITECTURES, VQ_EXPORT_FILE, VQ_PREFIX
from uvjax.weights.hf_llama import hf_config_from_model, iter_hf_export
from uvjax.weights.llamagen_vq import flatten_params, load_vq, save_vq


# ========================================================================================== export
def flax_vq_key_to_chameleon(path: str, num_levels: int) -> str:
    """Inverse of ``llamagen_vq.chameleon_key_to_flax``: ``encoder/conv_blocks_1/res_0/conv1/kernel`` ->
    ``encoder.down.1.block.0.conv1.weight``."""
    inv_mid = {"mid_0": "block_1", "mid_1": "attn_1", "mid_2": "block_2"}
    *mods, leaf = path.split("/")
    if path == "quantize/embedding":
        return "quantize.embedding.weight"
    out = []
    for m in mods:
        if m.startswith("conv_blocks_"):
            k = int(m[len("conv_blocks_"):])
            out += ["down", str(k)] if mods[0] == "encoder" else ["up", str(num_levels - 1 - k)]
        elif m.startswith("res_"):
            out += ["block", m[len("res_"):]]
        elif m.startswith("attn_"):
            out += ["attn", m[len("attn_"):]]
        elif m in inv_mid:
            out.append(inv_mid[m])
        else:
            out.append(m)
    return ".".join(out + ["bias" if leaf == "bias" else "weight"])


def hf_vq_config(cfg, image_size: int = 512) -> dict:
    """HF ``vq_config`` for a uvjax VQConfig; raises where HF's Chameleon VQ cannot express it."""
    bad = []
    if cfg.l2_norm:
        bad.append("l2_norm=True (HF's quantizer is Euclidean)")
    if cfg.norm_groups != 32 or any(cfg.ch * m % 32 for m in cfg.ch_mult):
        bad.append(f"GroupNorm groups {cfg.norm_groups} over widths {[cfg.ch * m for m in cfg.ch_mult]} "
                   f"(HF uses 32 groups)")
    if cfg.norm_eps != 1e-6:
        bad.append(f"norm_eps={cfg.norm_eps} (HF: 1e-6)")
    if cfg.attn_last_level and not cfg.mid_attn:
        bad.append("level attention without mid attention")
    if bad:
        raise ValueError(f"the VQ cannot be exported as HF ChameleonVQVAE: {'; '.join(bad)}")
    low = image_size // cfg.downsample
    return {"model_type": "chameleon_vqgan", "embed_dim": cfg.code_dim, "num_embeddings": cfg.codebook_size,
            "double_latent": False, "latent_channels": cfg.z_channels, "resolution": int(image_size),
            "in_channels": 3, "base_channels": cfg.ch, "channel_multiplier": list(cfg.ch_mult),
            "num_res_blocks": cfg.enc_res_blocks, "attn_resolutions": [low] if cfg.attn_last_level else [],
            "dropout": 0.0, "attn_type": "vanilla" if cfg.mid_attn else None}


def iter_vq_export(params: dict, cfg) -> Iterator[tuple[str, np.ndarray]]:
    """(``model.vqmodel.*`` name, torch-layout array) for every VQ tensor HF's ChameleonVQVAE has (all but
    the decoder)."""
    for p, a in flatten_params(params).items():
        if p.startswith("decoder/"):
            continue
        a = np.asarray(a, np.float32)
        yield VQ_PREFIX + flax_vq_key_to_chameleon(p, len(cfg.ch_mult)), (a.transpose(3, 2, 0, 1)
                                                                          if p.endswith("/kernel") else a)


def iter_chameleon_export(params: dict, m: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every decoder tensor: hf_llama's, then the q/k norms."""
    yield from iter_hf_export(params, m)
    layers = params["decoder"]["layers"]
    for role, (path, hf) in QK_NORM_ROLES.items():
        node = layers
        for p in path:
            if p not in node:
                raise KeyError(f"uvjax params lack decoder/layers/{'/'.join(path)} (model.qk_norm off?)")
            node = node[p]
        for i in range(int(m["layers"])):
            yield f"model.layers.{i}.{hf}", np.asarray(node[i])


def chameleon_config_from_model(m: dict, *, vocabulary_map: dict, vq_config: dict, dtype: str = "float32",
                                bos_id=None, eos_id=None, pad_id=None, max_positions: int = 4096) -> dict:
    """A transformers ``ChameleonConfig`` dict for a uvjax model dict (rope keys as hf_llama writes them)."""
    hf = hf_config_from_model(m, dtype=dtype, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                              max_positions=max_positions)
    hf.pop("head_dim")  # Chameleon derives it (hidden / heads)
    hf.update(architectures=list(SUPPORTED_ARCHITECTURES), model_type="chameleon",
              swin_norm=m["norm_placement"] == "swin", model_parallel_size=1, attention_dropout=0.0,
              vocabulary_map=dict(vocabulary_map), vq_config=vq_config,
              image_token_id=vocabulary_map.get("<image>"))
    return hf


def _as_vq(vq):
    if vq is None:
        return None, None
    if isinstance(vq, (str, os.PathLike)):
        return load_vq(str(vq))
    cfg, params = vq
    return cfg, params


def export_chameleon(variables: dict, model_cfg, tokenizer, out: str, vq=None, *, dtype: str = "float32",
                     template: str | None = None, max_shard_size="5GB", image_size: int | None = None,
                     run_config=None, overwrite: bool = False) -> dict:
    """Writes ``out`` as an HF Chameleon directory (module docstring) from a shared-vocab model.

    ``variables``: ``{"params", "lora"}`` (LoRA merged here); ``model_cfg``: the UnifiedConfig; ``tokenizer``:
    the run's TextTokenizer (its vocabulary becomes ``vocabulary_map``; None writes the image tokens only);
    ``vq``: the run's VQ (a uvjax VQ file or ``(VQConfig, params)``), exported as ``model.vqmodel.*`` — without
    it, from_pretrained initialises the VQ encoder at random (reported as missing keys); ``image_size``:
    ``vq_config.resolution`` (default 512, Chameleon's). Returns a summary dict."""


    dec, im = model_cfg.decoder, model_cfg.image
    if not model_cfg.shared_vocab:
        raise ValueError("export as Chameleon needs model.image.layout='shared_vocab' (codes in the vocabulary); "
                         "two_heads models export as Llama + image modules (--format=llama)")
    if not dec.qk_norm:
        raise ValueError("export as Chameleon needs model.qk_norm=True (HF's Chameleon always normalises q and k)")
    if dec.dim_head * dec.heads != dec.hidden:
        raise ValueError(f"head_dim {dec.dim_head} x heads {dec.heads} != hidden {dec.hidden}: HF's Chameleon "
                         f"derives head_dim = hidden / heads")
    if dec.qk_norm_eps != 1e-5:
        raise ValueError(f"model qk_norm_eps={dec.qk_norm_eps}; HF's Chameleon LayerNorm uses 1e-5")
    if im.image_positions:
        raise ValueError("model.image.image_positions has no counterpart in HF's Chameleon")
    ids = tuple(int(i) for i in im.code_token_ids)
    if tokenizer is not None:
        if tokenizer.vocab_size > dec.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {dec.vocab_size}")
        if image_code_ids(tokenizer, im.num_codes) != ids:
            raise ValueError("the tokenizer's IMGIMG…Z ids differ from model.image.code_token_ids")
        vocab = {s: int(i) for s, i in tokenizer.tok.get_vocab(with_added_tokens=True).items()}
    else:
        vocab = {image_token_name(c): i for c, i in enumerate(ids)}
    vq_cfg, vq_params = _as_vq(vq)
    if vq_cfg is not None and vq_cfg.codebook_size != im.num_codes:
        raise ValueError(f"VQ codebook {vq_cfg.codebook_size} != model.image.num_codes {im.num_codes}")
    if vq_cfg is not None:
        vq_config = hf_vq_config(vq_cfg, image_size or 512)
    else:  # HF builds a VQ anyway: Chameleon's, sized to this codebook
        vq_config = {"model_type": "chameleon_vqgan", "num_embeddings": int(im.num_codes),
                     "embed_dim": int(im.code_dim), "resolution": int(image_size or 512)}

    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    m = {**model_dict_from_decoder(dec), "norm_placement": dec.norm_placement}
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(merged_params(variables, dec.lora)))

    def tensors():
        yield from iter_chameleon_export(host, m)
        if vq_cfg is not None:
            yield from iter_vq_export(vq_params, vq_cfg)

    files = write_safetensors_sharded(tensors(), out, dtype=dtype, max_shard_bytes=parse_size(max_shard_size))
    sid = tokenizer.ids if tokenizer is not None else {}
    hf_cfg = chameleon_config_from_model(m, vocabulary_map=vocab, vq_config=vq_config, dtype=dtype,
                                         bos_id=sid.get("bos"), eos_id=sid.get("eos"), pad_id=sid.get("pad"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=1)
    if sid:
        eos = [sid["eos"]] + ([sid["im_end"]] if template == "chatml" and sid["im_end"] != sid["eos"] else [])
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": sid["bos"], "eos_token_id": eos if len(eos) > 1 else eos[0],
                       "pad_token_id": sid["pad"]}, f, indent=1)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out, template=template if template != "chatml" else None)
        if template == "chatml":  # the markers are whatever rows the tokenizer gave them (reserved ones here)
            p = os.path.join(out, "tokenizer_config.json")
            with open(p) as f:
                tcfg = json.load(f)
            inv = {i: s for s, i in vocab.items()}
            tcfg["chat_template"] = CHATML_JINJA.replace("<|im_start|>", inv[sid["im_start"]]).replace(
                "<|im_end|>", inv[sid["im_end"]])
            with open(p, "w") as f:
                json.dump(tcfg, f, indent=1)
    if vq_cfg is not None:
        save_vq(vq_params, vq_cfg, os.path.join(out, VQ_EXPORT_FILE),
                {"decoder": "present" if "decoder" in vq_params else "absent"})
    if run_config is not None:
        with open(os.path.join(out, "uvjax_config.json"), "w") as f:
            f.write(run_config.to_json_best_effort(indent=2))
    return {"out": out, "weights": files, "dtype": dtype, "format": "chameleon",
            "vqmodel": "exported" if vq_cfg is not None else
            "absent: from_pretrained initialises model.vqmodel at random (pass the run's VQ to include it)"}
