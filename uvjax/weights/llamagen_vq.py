"""LlamaGen VQ-16 (and Chameleon/Anole VQGAN) torch state dict -> uvjax Flax params (safetensors).

The conversion is strict in both directions: every source tensor must land on a target param (with the
exact expected shape) and every target param must be filled, otherwise a ValueError lists the misses —
a silently half-loaded tokenizer produces plausible-looking garbage codes, which is far harder to debug.

Rules (reference §B.4): conv OIHW -> HWIO (``transpose(2, 3, 1, 0)``), GroupNorm ``weight`` -> ``scale``,
``quantize.embedding.weight`` kept as [K, D] (not normalised: the model normalises at lookup time),
LlamaGen's ``quantize.codebook_used`` usage buffer is dropped. Chameleon keys follow taming-transformers
(§B.7): ``down.{i}.block.{j}`` / ``up.{i}.block.{j}`` with ``up`` indexed by level, i.e. reversed.

CLI: ``python -m uvjax.weights.llamagen_vq SRC.pt OUT.safetensors [--naming chameleon]``.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from uvjax.integrity_files import read_json
from uvjax.models.vq import VQConfig, chameleon_vqgan, llamagen_vq16, param_shapes

# A uvjax VQ tokenizer on disk: its weights and, beside them, the config it was trained with (uvjax.training.vq_train).
VQ_FILE = "vq.safetensors"
VQ_CONFIG_FILE = "vq_config.json"
VQ_CONFIG_TODO = ("It is written with the VQ tokenizer: when the VQ is a stage of the cache, move its directory "
                  "aside (mv DIR DIR.damaged) and rerun training to rebuild it; else restore the file from a copy, "
                  "or delete it (the image size is then taken from the run's config)")


def read_vq_config(path: str) -> dict:
    """``vq_config.json`` beside a VQ tokenizer; a damaged one raises ``DamagedFile`` naming it."""
    return read_json(path, "VQ tokenizer config", VQ_CONFIG_TODO)

# Keys that exist in released checkpoints but are no model parameters.
LLAMAGEN_DROP = ("quantize.codebook_used",)
# Lightning checkpoints of taming models may carry the training loss modules (discriminator, LPIPS).
CHAMELEON_DROP_PREFIXES = ("loss.",)


# ----------------------------------------------------------------------------------------- pytrees <-> files
def flatten_params(params: Mapping[str, Any], sep: str = "/", as_numpy: bool = True) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf} (leaves as np.ndarray unless ``as_numpy=False``, e.g. shape structs)."""
    out: dict[str, Any] = {}

    def rec(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(f"{prefix}{sep}{k}" if prefix else str(k), v)
        else:
            out[prefix] = np.asarray(node) if as_numpy else node

    rec("", params)
    return out


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def save_params(params, path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Save a params pytree as safetensors with flattened "a/b/c" keys (float32 contiguous arrays)."""

    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten_params(params).items()}
    save_file(flat, path, metadata=dict(metadata or {}))


def load_params(path: str) -> tuple[dict, dict[str, str]]:
    """Inverse of :func:`save_params`: (nested params of numpy arrays, metadata)."""

    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        flat = {k: f.get_tensor(k) for k in f.keys()}
    return unflatten_params(flat), dict(meta)


def save_vq(params, cfg: VQConfig, path: str, extra: Mapping[str, str] | None = None) -> None:
    """Params + their VQConfig (JSON in the safetensors metadata), so a file is self-describing."""
    meta = {"format": "uvjax-vq", "vq_config": json.dumps(cfg.to_dict())}
    meta.update(extra or {})
    save_params(params, path, meta)


def load_vq(path: str) -> tuple[VQConfig, dict]:
    """(VQConfig, params) from a file written by :func:`save_vq`."""
    params, meta = load_params(path)
    if "vq_config" not in meta:
        raise ValueError(f"{path}: no 'vq_config' metadata; was it written by uvjax save_vq?")
    return VQConfig.from_dict(json.loads(meta["vq_config"])), params


# --------------------------------------------------------------------------------------- torch checkpoints
def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor, without importing torch here
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """torch.load (weights_only, no pickle code execution) and pick ``ema`` > ``model`` > ``state_dict``."""
    import torch  # the torch extra: only .pth/.ckpt release files need it

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    for key in ("ema", "model", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            sd = ckpt[key]
            break
    else:
        if all(hasattr(v, "shape") for v in ckpt.values()):
            sd = ckpt  # already a bare state dict
        else:
            raise ValueError(f"{path}: none of 'ema', 'model', 'state_dict' in keys {sorted(ckpt)[:20]}")
    return {k: _to_numpy(v) for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ key maps
def _leaf(module_path: list[str], leaf: str, ndim: int) -> str:
    """torch leaf -> Flax leaf: conv weight -> kernel, norm weight -> scale, bias -> bias."""
    if leaf == "bias":
        return "bias"
    if leaf != "weight":
        raise KeyError(leaf)
    if module_path[-1].startswith("norm"):
        return "scale"
    if ndim == 4:
        return "kernel"
    raise KeyError(leaf)


def llamagen_key_to_flax(key: str, ndim: int, num_levels: int) -> str:
    """``encoder.conv_blocks.2.res.0.conv1.weight`` -> ``encoder/conv_blocks_2/res_0/conv1/kernel``.

    Raises KeyError for names outside the LlamaGen layout.
    """
    if key == "quantize.embedding.weight":
        return "quantize/embedding"
    parts = key.split(".")
    *mods, leaf = parts
    out: list[str] = []
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if m in ("conv_blocks", "res", "attn") and nxt is not None and nxt.isdigit():
            out.append(f"{m}_{nxt}")
            i += 2
        elif m == "mid" and nxt is not None and nxt.isdigit():
            out += ["mid", f"mid_{nxt}"]
            i += 2
        elif m.isdigit():
            raise KeyError(key)
        else:
            out.append(m)
            i += 1
    if not out or out[0] not in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        raise KeyError(key)
    return "/".join(out + [_leaf(out, leaf, ndim)])


_CHAMELEON_MID = {"block_1": "mid_0", "attn_1": "mid_1", "block_2": "mid_2"}


def chameleon_key_to_flax(key: str, ndim: int, num_levels: int) -> str:
    """taming/Chameleon naming -> uvjax Flax path; ``decoder.up.{i}`` is level i = ``conv_blocks_{n-1-i}``.

    | Chameleon (taming)                         | uvjax                                      |
    |--------------------------------------------|--------------------------------------------|
    | encoder.down.{i}.block.{j}.*               | encoder/conv_blocks_{i}/res_{j}/*          |
    | encoder.down.{i}.attn.{j}.*                | encoder/conv_blocks_{i}/attn_{j}/*         |
    | encoder.down.{i}.downsample.conv.*         | encoder/conv_blocks_{i}/downsample/conv/*  |
    | {en,de}coder.mid.block_1 / attn_1 / block_2| {en,de}coder/mid/mid_0 / mid_1 / mid_2     |
    | decoder.up.{i}.block.{j}.*                 | decoder/conv_blocks_{n-1-i}/res_{j}/*      |
    | decoder.up.{i}.attn.{j}.*                  | decoder/conv_blocks_{n-1-i}/attn_{j}/*     |
    | decoder.up.{i}.upsample.conv.*             | decoder/conv_blocks_{n-1-i}/upsample/conv/*|
    | conv_in, conv_out, norm_out, quant_conv, post_quant_conv, quantize.embedding.weight: same names  |
    """
    if key == "quantize.embedding.weight":
        return "quantize/embedding"
    *mods, leaf = key.split(".")
    out: list[str] = []
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if m in ("down", "up") and nxt is not None and nxt.isdigit():
            lvl = int(nxt)
            if not 0 <= lvl < num_levels:
                raise KeyError(key)
            out.append(f"conv_blocks_{lvl if m == 'down' else num_levels - 1 - lvl}")
            i += 2
        elif m in ("block", "attn") and nxt is not None and nxt.isdigit():
            out.append(f"{'res' if m == 'block' else 'attn'}_{nxt}")
            i += 2
        elif m == "mid" and nxt in _CHAMELEON_MID:
            out += ["mid", _CHAMELEON_MID[nxt]]
            i += 2
        elif m.isdigit():
            raise KeyError(key)
        else:
            out.append(m)
            i += 1
    if not out or out[0] not in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        raise KeyError(key)
    return "/".join(out + [_leaf(out, leaf, ndim)])


NAMINGS: dict[str, tuple[Callable[[str, int, int], str], Callable[[], VQConfig]]] = {
    "llamagen": (llamagen_key_to_flax, llamagen_vq16),
    "chameleon": (chameleon_key_to_flax, chameleon_vqgan),
}


def _is_dropped(key: str, naming: str) -> bool:
    if naming == "llamagen":
        return key in LLAMAGEN_DROP
    return key.startswith(CHAMELEON_DROP_PREFIXES)


# ------------------------------------------------------------------------------------------------ convert
def convert_state_dict(state_dict: Mapping[str, Any], cfg: VQConfig | None = None, naming: str = "llamagen",
                       strip_prefix: str = "") -> dict:
    """torch-layout state dict (numpy arrays or torch tensors) -> nested Flax params for ``VQModel(cfg)``.

    ``cfg`` defaults to the naming's published config; pass a reduced one for tests or other widths.
    ``strip_prefix`` removes e.g. ``"model.vqmodel."`` from HF ports. Raises ValueError listing every
    unconsumed source key, shape mismatch and unfilled target param.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {sorted(NAMINGS)}, got {naming!r}")
    keymap, default_cfg = NAMINGS[naming]
    cfg = (cfg or default_cfg()).validate()
    target = flatten_params(param_shapes(cfg), as_numpy=False)
    n = len(cfg.ch_mult)

    flat: dict[str, np.ndarray] = {}
    unexpected, bad_shape = [], []
    for key, value in state_dict.items():
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix):]
        if _is_dropped(key, naming):
            continue
        arr = _to_numpy(value)
        try:
            path = keymap(key, arr.ndim, n)
        except KeyError:
            unexpected.append(key)
            continue
        if path not in target:
            unexpected.append(f"{key} (-> {path})")
            continue
        if path.endswith("/kernel"):
            arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        want = tuple(target[path].shape)
        if tuple(arr.shape) != want:
            bad_shape.append(f"{key}: {tuple(arr.shape)} after layout change, expected {want} for {path}")
            continue
        if path in flat:
            unexpected.append(f"{key} (duplicate target {path})")
            continue
        flat[path] = np.ascontiguousarray(arr.astype(np.float32))
    missing = sorted(set(target) - set(flat))
    if unexpected or bad_shape or missing:
        def listing(items, limit=40):
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            return f"{len(items)}: {items[:limit]}{more}"

        msg = [f"{naming} VQ conversion failed (is cfg the checkpoint's architecture?):"]
        if unexpected:
            msg.append(f"  unconsumed source keys {listing(unexpected)}")
        if bad_shape:
            msg.append(f"  shape mismatches {listing(bad_shape)}")
        if missing:
            msg.append(f"  target params not filled {listing(missing)}")
        raise ValueError("\n".join(msg))
    return unflatten_params(flat)


def convert_checkpoint(src: str, out: str | None = None, naming: str = "llamagen", cfg: VQConfig | None = None,
                       strip_prefix: str = "") -> tuple[VQConfig, dict]:
    """Read a torch checkpoint (``weights_only=True``), convert, and optionally save with :func:`save_vq`."""
    cfg = cfg or NAMINGS[naming][1]()
    params = convert_state_dict(load_torch_state_dict(src), cfg, naming, strip_prefix)
    if out:
        save_vq(params, cfg, out, {"source": str(src), "naming": naming})
    return cfg, params


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="torch checkpoint, e.g. vq_ds16_c2i.pt or Chameleon vqgan.ckpt")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--naming", default="llamagen", choices=sorted(NAMINGS))
    p.add_argument("--strip_prefix", default="")
    a = p.parse_args(argv)
    cfg, params = convert_checkpoint(a.src, a.out, a.naming, strip_prefix=a.strip_prefix)
    n = sum(int(np.prod(v.shape)) for v in flatten_params(params).values())
    print(f"wrote {a.out}: {n:,} params, codebook {cfg.codebook_size}x{cfg.code_dim}, naming {a.naming}")


if __name__ == "__main__":
    main()
