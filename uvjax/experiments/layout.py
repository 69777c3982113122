"""Layout comparison (a finding neither paper reports): UnifiedVisual's Chameleon/Anole layout, where VQ
codes are rows of the one text vocabulary (one embedding in, one LM head out), against 2505.23043's two
heads + adapters (codes enter through an understanding adapter, generated codes through a generation
adapter and come out of a separate generation head).

Everything else is equal: the same Smart Watch data and stream mix, the same decoder shapes, steps, batch,
learning rate and seeds, so the arms see the same samples in the same order; only where image tokens enter
and leave the model differs (``model.image.layout``). The shared-vocabulary arm's vocabulary is the text
tokenizer's plus one row per code, which is also its generation head.

Metrics: VQA accuracy (strict) and judge-read generation accuracy on the held-out test images
(``uvjax.evaluate``), overall and for weather and both corners.

``python -m uvjax.experiments.layout --config=configs/experiments/layout.py[:quick]``
"""
from __future__ import annotations

from uvjax.experiments.arms import GEN_DETAIL, VQA_DETAIL, Arm, Experiment, Panel
from uvjax.experiments.common import main


def arms(ec) -> list[Arm]:
    text_vocab = int(ec.text_vocab)
    num_codes = int(ec.num_codes)
    shared = (("model.image.layout", "shared_vocab"), ("model.image.code_token_ids", ()),
              ("model.vocab_size", text_vocab + num_codes))
    return [Arm("two-heads", (), group="two heads + adapters", x="two heads + adapters"),
            Arm("shared-vocab", shared, group="shared vocabulary", x="shared vocabulary")]


def panels(ec) -> list[Panel]:
    return [Panel("vqa/all/strict", "VQA accuracy (all, strict)"), *VQA_DETAIL,
            Panel("gen/all/accuracy", "generation accuracy (judge)"), *GEN_DETAIL]


EXPERIMENT = Experiment("layout", arms, panels, "image-token layout", description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    main(EXPERIMENT)
