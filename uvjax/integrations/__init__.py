"""Bridges to the harnesses researchers already use: lmms-eval (``uvjax.integrations.lmms_eval``) and GenEval's
sample layout (``uvjax.integrations.geneval``).

This package imports nothing heavy: ``import uvjax`` never pulls in lmms-eval (torch, transformers, accelerate);
only the modules below do, when they are used.
"""
from __future__ import annotations

LMMS_EVAL_MODEL = "uvjax"
LMMS_EVAL_CLASS = "uvjax.integrations.lmms_eval.UvjaxLMM"


def lmms_eval_models():
    """The payload of the ``lmms_eval.models`` entry point (lmms-eval 0.7.3 reads that group when its model
    registry starts): a manifest naming the model class by path, so lmms-eval imports this package's plugin
    only when ``--model uvjax`` is asked for."""
    from lmms_eval.models.registry_v2 import ModelManifest  # the lmms extra; called by lmms-eval only
    return [ModelManifest(model_id=LMMS_EVAL_MODEL, simple_class_path=LMMS_EVAL_CLASS)]


__all__ = ["LMMS_EVAL_CLASS", "LMMS_EVAL_MODEL", "lmms_eval_models"]
