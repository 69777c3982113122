"""Weights in and out: HF Llama safetensors and GGUF → uvjax, trained model → HF (+ image modules).

Importing the package registers the ``"gguf"`` tokenizer loader with ``uvjax.data.tokenizer`` (cheap:
the ``gguf`` package itself is imported only when a file is read). Modules:
``hf_llama`` (HF import, shared name/layout tables), ``gguf`` (GGUF import + tokenizer),
``pretrained`` (config presets + the trainer hook), ``export`` (HF export + CLI).
"""
from uvjax.weights import gguf as _gguf  # noqa: F401  (registers load_tokenizer("gguf", ...))
