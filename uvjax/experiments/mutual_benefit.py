"""Mutual benefit (2505.23043): does training on both tasks help each task, at equal samples per task?

Per architecture (``ec.architectures``, e.g. VQ-VQ and SigLIP-VQ) three arms:

- ``<arch>-unified``: understanding + generation, the base mix, ``train.steps`` steps;
- ``<arch>-understanding``: understanding data only, as many understanding examples as the unified arm saw
  (fewer steps; measured, see ``uvjax.experiments.budget``); evaluated on VQA;
- ``<arch>-generation``: generation data only, as many generation examples as the unified arm saw;
  evaluated on generation (judge accuracy);
- ``<arch>-understanding-steps`` (``ec.step_control``): understanding data only for the unified arm's
  number of *steps* (so 1.5× its understanding examples at the 2 : 1 mix). Equal samples give the unified
  arm more optimizer updates and a longer schedule than understanding-only; if this control matches the
  unified arm, a VQA gain of unified over understanding-only came from the extra updates, not from the
  generation data.

Plot and table: VQA accuracy (all attributes and per attribute: weather, the two corner positions, battery,
time), generation accuracy (judge: all, weather, the two corners) and the Fréchet distance on judge
features, per architecture, one bar per arm, error bars over seeds.

``python -m uvjax.experiments.mutual_benefit --config=configs/experiments/mutual_benefit.py[:quick|:smollm2]``
"""
from uvjax.experiments.arms import GEN_DETAIL, VQA_DETAIL, Arm, Experiment, Panel, only
from uvjax.experiments.common import main


def arms(ec) -> list[Arm]:
    out = []
    for arch in ec.architectures:
        base = f"{arch}.py:{ec.arch_preset}"
        uni = f"{arch}-unified"
        out += [Arm(uni, group="unified", x=arch, base=base),
                Arm(f"{arch}-understanding", only("understanding"), group="understanding only", x=arch,
                    base=base, match=("understanding", uni), eval_tasks=("vqa",)),
                Arm(f"{arch}-generation", only("generation"), group="generation only", x=arch, base=base,
                    match=("generation", uni), eval_tasks=("generation",))]
        if ec.get("step_control", True):
            out.append(Arm(f"{arch}-understanding-steps", only("understanding"),
                           group="understanding only, unified's steps", x=arch, base=base, eval_tasks=("vqa",)))
    return out


def panels(ec) -> list[Panel]:
    return [Panel("vqa/all/strict", "VQA accuracy (all attributes, strict)"), *VQA_DETAIL,
            Panel("vqa/battery/tolerant", "VQA battery accuracy (tolerant)"),
            Panel("vqa/time/hour", "VQA time accuracy (hour right)"),
            Panel("gen/all/accuracy", "generation accuracy (judge, all mentioned)"), *GEN_DETAIL]


EXPERIMENT = Experiment("mutual_benefit", arms, panels, "architecture",
                        description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    main(EXPERIMENT)
