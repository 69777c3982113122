"""``python -m uvjax.evaluate --workdir=RUN [--quick] [--num_images=N] [--judge_dir=DIR]``: flags and main.

What is evaluated and written: :mod:`uvjax.evaluation.run` (Smart Watch runs) and
:mod:`uvjax.evaluation.heldout` (imported data's held-out split).
"""
from __future__ import annotations

from absl import app, flags

from uvjax import cli
from uvjax.evaluation.heldout import evaluate_imported_run, is_imported_run
from uvjax.evaluation.heldout import format_table as heldout_table
from uvjax.evaluation.report import format_table
from uvjax.evaluation.run import QUICK_IMAGES, evaluate_run, inception_extractor, inception_path
from uvjax.inference.loading import load_config
from uvjax.stages.features import evaluation_kwargs


def main(argv):
    F = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    run_cfg = load_config(F.workdir)
    if is_imported_run(run_cfg):  # the run's own held-out split (no Smart Watch judge)
        report = evaluate_imported_run(F.workdir, out_dir=F.out, num_records=F.num_images or None,
                                       batch_size=F.batch_size, cfg_scale=F.cfg_scale,
                                       image_temperature=F.image_temperature, image_top_k=F.image_top_k,
                                       seed=F.seed, progress=True)
        print(heldout_table(report))
        print(f"\nwrote {report['files']['report']}")
        return
    extra = evaluation_kwargs(F.workdir, run_cfg)  # SigLIP inputs: the run's own tower
    weights = F.inception_weights or inception_path(run_cfg)
    if weights:
        try:  # a bad file fails here, before any decoding, with the file and key named
            extra["inception"] = inception_extractor(weights)
        except (FileNotFoundError, ValueError, ImportError) as e:
            where = "--inception_weights" if F.inception_weights else "config stages.evaluate.inception_path"
            raise SystemExit(f"{where}: {e}")
    report = evaluate_run(F.workdir, quick=F.quick, num_images=F.num_images or None, judge_dir=F.judge_dir,
                          batch_size=F.batch_size, cfg_scale=F.cfg_scale, image_temperature=F.image_temperature,
                          image_top_k=F.image_top_k, seed=F.seed, tasks=tuple(F.tasks), out_dir=F.out,
                          image_size=F.image_size or None, progress=True, **extra)
    print(format_table(report))
    print(f"\nwrote {report['files']['report']}")


def _define_flags():
    cli.define_workdir_flag()
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_bool("quick", False, f"evaluate {QUICK_IMAGES} test images (never trains a judge)")
    flags.DEFINE_integer("num_images", 0, "test images to evaluate (0: the whole test split)")
    flags.DEFINE_string("judge_dir", None, "cached judge directory (default <workdir>/judge; trained if absent)")
    flags.DEFINE_string("out", None, "output directory (default <workdir>/eval/step_<step>)")
    flags.DEFINE_integer("batch_size", 32, "prompts per decoding batch")
    flags.DEFINE_float("cfg_scale", 0.0, "classifier-free guidance scale s (logits = c + s (c - u))")
    flags.DEFINE_float("image_temperature", 1.0, "image code temperature (0 = greedy)")
    flags.DEFINE_integer("image_top_k", 0, "image code top-k (0 = off)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_integer("image_size", 0, "test image size (default: the VQ tokenizer's training size)")
    flags.DEFINE_list("tasks", ["vqa", "caption", "generation"], "tasks to evaluate")
    flags.DEFINE_string("inception_weights", None, "FID Inception weights (pytorch-fid's "
                        "pt_inception-2015-12-05-6726825d.pth, or its .safetensors/.npz conversion) for standard "
                        "FID; default: the run config's stages.evaluate.inception_path (docs/WEIGHTS.md)")
    flags.DEFINE_alias("inception", "inception_weights")


def console_main():
    """``uvjax-evaluate`` (the console script) and ``python -m uvjax.evaluate``."""
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    console_main()
