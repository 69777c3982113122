"""Understanding/generation ratio (UnifiedVisual-style ablation, 2509.14738): one side's data fixed, the
other's share varied.

``ec.fixed`` (understanding by default) keeps all its data and the same number of its examples in every
arm (``train.steps`` at ratio 0, matched elsewhere); the other side gets the first r of its records
(r in ``ec.ratios``: 0, 25, 50, 75, 100 %), each drawn as often as in the full mix. Both metrics (VQA and
judge generation accuracy) are plotted against r.

``python -m uvjax.experiments.ratio --config=configs/experiments/ratio.py[:quick]``
"""
from uvjax.experiments.arms import GEN_DETAIL, NATURAL_WEIGHTS, VQA_DETAIL, Arm, Experiment, Panel, other, pct, subset
from uvjax.experiments.common import main


def arms(ec) -> list[Arm]:
    fixed = str(ec.fixed)
    varied = other(fixed)
    ref = f"{varied}0"
    out = []
    for r in ec.ratios:
        out.append(Arm(f"{varied}{pct(r)}", subset(varied, r, NATURAL_WEIGHTS[varied]),
                       group=f"{fixed} fixed", x=pct(r), match=None if r == 0 else (fixed, ref)))
    if ref not in [a.name for a in out]:
        raise ValueError("ratio: ec.ratios must include 0 (the reference arm whose steps are configured)")
    return out


def panels(ec) -> list[Panel]:
    return [Panel("vqa/all/strict", "VQA accuracy (all, strict)"), *VQA_DETAIL,
            Panel("gen/all/accuracy", "generation accuracy (judge)"), *GEN_DETAIL]


EXPERIMENT = Experiment("ratio", arms, panels, "varied side's data (% of its records)",
                        description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    main(EXPERIMENT)
