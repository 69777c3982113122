"""Alignment (2505.23043, seed §9): how much does it matter that understanding and generation see the
image in the same space?

For each strength s in ``ec.strengths`` (0, 0.1, 0.2, 0.3) the understanding features (VQ code vectors)
get the fixed affine distortion y = x·A + b of ``uvjax/models/alignment.py`` (``model.image.align_strength``)
before the adapter; generation inputs are untouched. Two arms per s:

- ``unified-s<s>``: understanding + generation;
- ``understanding-s<s>``: understanding only, as many understanding examples as the unified arm.

The adapters are **shared** (``model.image.share_adapters=True``, as in the reference VQ-VQ runs): with
separate linear adapters an invertible affine map is absorbed exactly by the understanding adapter and the
knob would change nothing. Plot: VQA accuracy against s, unified vs understanding-only.

``python -m uvjax.experiments.alignment --config=configs/experiments/alignment.py[:quick]``
"""
from uvjax.experiments.arms import VQA_DETAIL, Arm, Experiment, Panel, only
from uvjax.experiments.common import main


def _tag(s: float) -> str:
    return f"s{float(s):g}"


def arms(ec) -> list[Arm]:
    out = []
    for s in ec.strengths:
        ov = (("model.image.align_strength", float(s)),)
        uni = f"unified-{_tag(s)}"
        out += [Arm(uni, ov, group="unified", x=float(s)),
                Arm(f"understanding-{_tag(s)}", ov + only("understanding"), group="understanding only",
                    x=float(s), match=("understanding", uni), eval_tasks=("vqa",))]
    return out


def panels(ec) -> list[Panel]:
    return [Panel("vqa/all/strict", "VQA accuracy (all, strict)"), *VQA_DETAIL,
            Panel("gen/all/accuracy", "generation accuracy (judge, unified arms)"),
            Panel("gen/frechet_judge", "Fréchet distance (judge features, unified arms)")]


EXPERIMENT = Experiment("alignment", arms, panels, "affine distortion strength s",
                        description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    main(EXPERIMENT)
