"""What an experiment is made of: its config (``configs/experiments/<name>.py`` builds it with
:func:`experiment_config`), its arms, its plot panels, and the training config of one arm × seed.

An experiment config holds a base model config, overrides shared by every arm, the arm variable's
values, seeds and evaluation settings; a driver module (``uvjax/experiments/<name>.py``) turns it into
:class:`Arm` objects and says what to plot (an :class:`Experiment`). Overrides are ``("dotted.key",
value)`` pairs applied with :func:`uvjax.config.apply_overrides`, the one override mechanism.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import ml_collections as mlc

from uvjax.config import apply_overrides, load_config_file, shared_vocab_layout


# ------------------------------------------------------------------------------------------ arms
@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of an experiment, run once per seed.

    ``overrides``: ``(("dotted.key", value), ...)`` applied on top of the base config and the
    experiment's shared overrides (missing leaf keys are created, e.g. ``data.streams.generation.fraction``).
    ``group``: the series it belongs to in the plot; ``x``: its value of the arm variable (a number, or a
    string for a categorical axis). ``base``: another base config than the experiment's (e.g.
    ``siglipvq.py:tiny``). ``match``: ``(stream, reference arm name)``: see ``uvjax.experiments.budget``.
    ``eval_tasks``: the evaluation tasks of this arm (default: the experiment's)."""
    name: str
    overrides: tuple[tuple[str, Any], ...] = ()
    group: str = ""
    x: float | str | None = None
    base: str = ""
    match: tuple[str, str] | None = None
    eval_tasks: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Panel:
    """One plot panel and table column: ``metric`` (a key of the run's metrics), its label, and the
    groups it shows (empty: every group that has the metric)."""
    metric: str
    label: str
    groups: tuple[str, ...] = ()


# Per-attribute panels shown beside a driver's headline metrics: the attributes the `tiny` model can
# learn (weather, the two corners) and, for generation, the Fréchet distance; exact time and battery stay
# near zero at this scale (tiny-scale-calibration.md), so they would only widen the tables.
VQA_DETAIL = (Panel("vqa/weather/strict", "VQA weather"), Panel("vqa/weather_pos/strict", "VQA weather corner"),
              Panel("vqa/battery_pos/strict", "VQA battery corner"))
GEN_DETAIL = (Panel("gen/weather/accuracy", "generation weather (judge)"),
              Panel("gen/weather_pos/accuracy", "generation weather corner (judge)"),
              Panel("gen/battery_pos/accuracy", "generation battery corner (judge)"),
              Panel("gen/frechet_judge", "Fréchet distance (judge features, lower is better)"))


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a driver module declares: how to build the arms from the experiment config, what to plot,
    and optionally extra per-run metrics (``extra(ec, arm, run_dir, cfg) -> {name: float}``)."""
    name: str
    arms: Callable[[Any], list[Arm]]
    panels: Callable[[Any], list[Panel]]
    x_label: str
    extra: Callable[[Any, Arm, str, Any], dict] | None = None
    description: str = ""


# ------------------------------------------------------------------------------------------ one arm's config
def load_base(spec: str):
    """``"vqvq.py:tiny"`` / ``"configs/vqvq.py:tiny"`` / ``"vqvq"`` → that config file's ``get_config``."""
    path, _, preset = spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return load_config_file(name, preset or None)


def shared_overrides(ec) -> list[tuple[str, Any]]:
    """The experiment config's ``overrides`` (shared by every arm: a tuple of (key, value) pairs or a
    dict) as a list of pairs, as they enter an arm's key."""
    overrides = ec.get("overrides")
    if not overrides:
        return []
    if hasattr(overrides, "items"):
        return [(k, v) for k, v in overrides.items()]
    return [(str(k), v) for k, v in overrides]


def arm_config(ec, arm: Arm, seed: int, workdir: str, *, steps: int | None = None):
    """The full training config of one run: base config + shared overrides + the arm's + seed/cache."""
    cfg = load_base(arm.base or ec.base)
    apply_overrides(cfg, shared_overrides(ec) + list(arm.overrides))
    layout = ec.get("layout", "") or "two_heads"
    if layout == "shared_vocab":  # the same experiment on the Chameleon/Anole layout (config.shared_vocab_layout)
        shared_vocab_layout(cfg)
    elif layout != "two_heads":
        raise ValueError(f"experiment config layout={layout!r}; expected 'two_heads' or 'shared_vocab'")
    apply_overrides(cfg, [("train.seed", int(seed)), ("stages.cache_dir", cache_dir(ec, workdir)),
                          ("stages.evaluate.enabled", False),  # the driver evaluates with the experiment's settings
                          ("stages.evaluate.judge_preset", str(ec.eval.judge_preset)),  # and learning curves
                          ("train.eval_every", int(ec.get("curve_every", 0) or 0)),
                          ("train.eval_images", int(ec.get("curve_images", 64) or 64))])
    if steps is not None:
        apply_overrides(cfg, [("train.steps", int(steps))])
    return cfg


def cache_dir(ec, workdir: str) -> str:
    return os.path.abspath(ec.get("cache_dir") or os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache"))


def arm_key(ec, arm: Arm) -> str:
    """What an arm's results depend on (base, overrides, evaluation settings); a finished run of another
    key in the same work dir is refused instead of being mixed into the table."""
    return json.dumps([arm.base or ec.base, shared_overrides(ec), list(arm.overrides), arm.match,
                       list(arm.eval_tasks or ()), json.loads(ec.eval.to_json_best_effort(sort_keys=True))]
                      + layout_key(ec), sort_keys=True, default=str)


def layout_key(ec) -> list:
    """The model layout joins an arm's key when it is not the default (keys of earlier runs stay valid)."""
    layout = ec.get("layout", "") or "two_heads"
    return [] if layout == "two_heads" else [{"layout": layout}]


# ------------------------------------------------------------------------------------------ helpers for drivers
NATURAL_WEIGHTS = {"understanding": 2.0, "generation": 1.0}  # vqa + caption per image vs one generation record


def other(stream: str) -> str:
    return {"understanding": "generation", "generation": "understanding"}[stream]


def only(stream: str) -> tuple[tuple[str, Any], ...]:
    """Overrides that leave ``stream`` the only active stream (the single-task baseline)."""
    return ((f"data.streams.{other(stream)}.weight", 0.0),)


def subset(stream: str, fraction: float, natural: float) -> tuple[tuple[str, Any], ...]:
    """``stream`` restricted to the first ``fraction`` of its records (nested subsets) and weighted by
    ``fraction · natural`` so each of its records is drawn as often as in the full mix; 0 switches it off."""
    if fraction <= 0:
        return ((f"data.streams.{stream}.weight", 0.0),)
    return ((f"data.streams.{stream}.fraction", float(fraction)),
            (f"data.streams.{stream}.weight", float(natural) * float(fraction)))


def pct(f: float) -> int:
    return int(round(100 * float(f)))


# ------------------------------------------------------------------------------------------ config defaults
def experiment_config(name: str, preset: str):
    """Defaults shared by ``configs/experiments/*.py``: ``tiny`` (the CPU default: the ``tiny`` model, 200
    test images, the cached ``full`` judge, 2 seeds) and ``quick`` (the ``smoke`` chain, a handful of steps,
    3 test images, the ``test`` judge, one seed: minutes on CPU, for tests). The experiment file then sets
    its arm variable, steps and overrides."""
    c = mlc.ConfigDict()
    c.name = name
    c.preset = preset
    c.workdir = ""  # "" = runs/experiments/<name> (or --workdir)
    c.cache_dir = ""  # "" = <parent of workdir>/cache, shared by every experiment under that parent
    c.budget_batches = 16  # batches read to measure examples per step (equal samples per task)
    c.stop_on_error = False
    c.compilation_cache = True  # persistent XLA cache in <cache_dir>/xla shared by the arms
    c.x_label = ""
    # learning curves: every arm × seed evaluates the first curve_images test images every curve_every steps
    # (0: off); curves.png draws them per arm. Not part of an arm's key: the trained model does not change
    c.curve_every = 0
    c.curve_images = 64
    # two_heads (2505.23043's adapters + generation head) | shared_vocab (Chameleon/Anole: codes are rows
    # of the text vocabulary); every experiment runs on either, its data unchanged
    c.layout = "two_heads"
    c.eval = mlc.ConfigDict(dict(num_images=200, judge_preset="full", batch_size=32, tasks=("vqa", "generation"),
                                 sample_seed=0))
    if preset in ("tiny", "smollm2"):
        # tiny: the first run's model with the paper's recipe (vqvq.py:tiny_paper; α = 0.2, the paper's mix), on
        # which every result of docs/RESULTS.md was measured
        c.base = "vqvq.py:" + ("tiny_paper" if preset == "tiny" else preset)
        c.seeds = (0, 1)
        c.overrides = (("train.progress", True),)
        c.curve_every = 150 if preset == "tiny" else 0  # 10 points over 1,500 steps, ~5 s each on 2 cores
    elif preset == "quick":
        c.base = "vqvq.py:smoke"
        c.seeds = (0,)
        c.overrides = (("train.steps", 3), ("train.checkpoint_every", 1000), ("train.log_every", 1),
                       ("train.progress", False), ("optim.warmup_steps", 1))
        c.eval.num_images, c.eval.judge_preset, c.eval.batch_size = 3, "test", 8
        c.budget_batches = 2
    else:
        raise ValueError(f"configs/experiments/{name}.py: unknown preset {preset!r}")
    return c


def add_overrides(c, *items) -> None:
    """Appends (key, value) pairs to ``c.overrides`` (later pairs win)."""
    c.overrides = tuple(c.overrides) + tuple(items)
