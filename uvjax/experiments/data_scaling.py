"""Data scaling (2505.23043): does the benefit of the other task's data grow with its amount?

For each target task T in ``ec.targets`` (understanding, generation) and each fraction f in
``ec.fractions`` (0, 25, 50, 100 %): the arm trains on all of T's data plus the first f of the other
task's records (nested subsets: ``data.streams.<other>.fraction``), each record drawn as often as in the
full mix (weight ∝ f), and sees as many T examples as the single-task baseline (f = 0, ``train.steps``),
so the arms differ only in how much of the other task's data they add (more data → more steps).

Plot: T's metric (VQA accuracy for understanding, judge generation accuracy for generation) against f;
f = 0 is the single-task baseline.

``python -m uvjax.experiments.data_scaling --config=configs/experiments/data_scaling.py[:quick]``
"""
from uvjax.experiments.arms import GEN_DETAIL, NATURAL_WEIGHTS, VQA_DETAIL, Arm, Experiment, Panel, other, pct, subset
from uvjax.experiments.common import main

METRIC = {"understanding": "vqa/all/strict", "generation": "gen/all/accuracy"}
TASKS = {"understanding": ("vqa",), "generation": ("generation",)}


def group(target: str) -> str:
    return f"{target} (+ {other(target)} data)"


def arms(ec) -> list[Arm]:
    out = []
    for t in ec.targets:
        o = other(t)
        base_name = f"{t}-only"
        for f in ec.fractions:
            name = base_name if f == 0 else f"{t}+{o}{pct(f)}"
            ov = ((("train.steps", int(ec.steps[t])),) + subset(o, f, NATURAL_WEIGHTS[o]))
            out.append(Arm(name, ov, group=group(t), x=pct(f), match=None if f == 0 else (t, base_name),
                           eval_tasks=TASKS[t]))
        if 0 not in [float(f) for f in ec.fractions]:
            raise ValueError("data_scaling: ec.fractions must include 0 (the single-task baseline)")
    return out


DETAIL = {"understanding": VQA_DETAIL, "generation": GEN_DETAIL}


def panels(ec) -> list[Panel]:
    out = []
    for t in ec.targets:
        out.append(Panel(METRIC[t], f"{t}: {'VQA' if t == 'understanding' else 'generation'} accuracy", (group(t),)))
        out += [Panel(p.metric, f"{t}: {p.label}", (group(t),)) for p in DETAIL[t]]
    return out


EXPERIMENT = Experiment("data_scaling", arms, panels, "other task's data (% of its records)",
                        description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    main(EXPERIMENT)
