"""``python -m uvjax.export --workdir=RUN --out=DIR [--format=llama|chameleon|peft]``: a trained run as a
self-contained Hugging Face directory (LoRA merged; + the image modules and the run's VQ tokenizer or
feature tower), a Chameleon checkpoint (shared-vocab runs) or a PEFT adapter. The formats themselves are
written by ``uvjax/weights/export.py``, ``chameleon_export.py`` and ``peft_adapter.py``; this module finds what a
run used and loads its checkpoint. (``python -m uvjax.weights.export`` and ``python -m
uvjax.weights.peft_adapter`` are the same command under its first names.)"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

from uvjax import storage_paths as sp
from uvjax.inference import loading  # module access: tests stub load_trained
from uvjax.inference.decode import find_vq
from uvjax.models.unified import uses_codes, uses_features
from uvjax.stage_log import stage_dir
from uvjax.stages.imported import given_tower
from uvjax.weights.chameleon_export import export_chameleon
from uvjax.weights.export import export_hf, parse_size
from uvjax.weights.peft_adapter import export_peft


def find_tower(workdir: str, cfg) -> tuple[str | None, dict]:
    """(path, info) of a feature run's SigLIP/CLIP tower: ``towers.<clip|siglip>.path`` (a pretrained tower
    the user gave) or the run's ``siglip`` stage (pretrained by uvjax). None when the run has none."""
    name, t = given_tower(cfg)
    if t is not None:
        return os.path.abspath(os.path.expanduser(str(t.path))), {
            "kind": name, "select_layer": int(t.get("select_layer", -2)),
            "feature_post_norm": bool(t.get("feature_post_norm", False))}
    d = stage_dir(workdir, "siglip")
    return (d, {"kind": "siglip"}) if d else (None, {})


FORMATS = ("llama", "chameleon")


def export_run(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
               max_shard_size="5GB", overwrite: bool = False, fmt: str = "llama", vq: str | None = None) -> dict:
    """Loads a run's checkpoint (``uvjax.inference.loading.load_trained``) and exports it: ``fmt`` "llama"
    (HF Llama + image modules + the run's VQ tokenizer or feature tower) or "chameleon"
    (``hf_chameleon.export_chameleon``). ``vq``: a uvjax VQ file, default the run's own
    (``inference.decode.find_vq``); a code run without one is exported without it (``summary["warnings"]``)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}; expected one of {FORMATS}")
    max_shard_size = parse_size(max_shard_size)
    run = loading.load_trained(workdir, step)
    workdir = run.workdir
    dtype = dtype or str(run.cfg.model.param_dtype)
    local = out
    if sp.is_remote(out):  # written locally, then uploaded (safetensors and HF files are local writers)
        if sp.exists(out) and sp.listdir(out) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite")
        os.makedirs(sp.remote_cache_dir("export"), exist_ok=True)
        local = tempfile.mkdtemp(prefix="export-", dir=sp.remote_cache_dir("export"))
    kw = dict(dtype=dtype, template=str(run.cfg.data.get("template", "")) or None,
              max_shard_size=max_shard_size, overwrite=overwrite or local != out)
    im = run.model.cfg.image
    codes, features = uses_codes(im), uses_features(im)
    warnings = []
    looked: list = []
    if vq is None and codes:
        vq, looked = find_vq(workdir, run.cfg)
    if fmt == "chameleon":
        size = ((run.cfg.get("stages") or {}).get("data") or {}).get("image_size")
        summary = export_chameleon(run.variables, run.model.cfg, run.tokenizer, local, vq=vq,
                                   image_size=int(size) if size else None, run_config=run.cfg, **kw)
    else:
        if codes and not vq:
            warnings.append(f"no VQ tokenizer found (looked at {looked}): the export cannot encode or draw images; "
                            f"pass --vq=FILE")
        tower = find_tower(workdir, run.cfg) if features else None
        if features and not (tower and tower[0]):
            warnings.append("no SigLIP/CLIP tower found (towers.*.path or a siglip stage): image inputs cannot "
                            "be encoded from the export")
        summary = export_hf(run.variables, run.model.cfg, run.tokenizer, local, run_config=run.cfg, vq=vq,
                            tower=tower, step=run.step, source_workdir=workdir, **kw)
    if local != out:
        sp.upload(local, out)
        shutil.rmtree(local, ignore_errors=True)
        summary = json.loads(json.dumps(summary, default=str).replace(local, sp.resolve(out)))
    summary["step"] = run.step
    if warnings:
        summary["warnings"] = warnings
    return summary


def _size_arg(s: str) -> int:
    try:
        return parse_size(s, "--max_shard_size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m uvjax.export",
                                 description="Export a uvjax run (LoRA merged) as a self-contained HF Llama (or "
                                             "Chameleon) directory.")
    ap.add_argument("--workdir", required=True, help="run directory (holds config.json + checkpoints/)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="stored dtype (default: the run's model.param_dtype)")
    ap.add_argument("--max_shard_size", default="5GB", type=_size_arg,
                    help="largest weight file: 5GB = 5*10^9 bytes, 5GiB = 5*2^30, or an int number of bytes")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--format", default="llama", choices=FORMATS + ("peft",),
                    help="llama: LlamaForCausalLM + uvjax image modules; chameleon: ChameleonForConditionalGeneration "
                         "(shared-vocab runs); peft: the LoRA as a PEFT adapter + the unmerged base "
                         "(uvjax/weights/peft_adapter.py)")
    ap.add_argument("--vq", default=None, help="uvjax VQ file to export (default: the run's own, when found)")
    ap.add_argument("--base", default=None, help="peft: the HF Llama directory the run started from (default: "
                                                 "write the run's base to OUT/base)")
    a = ap.parse_args(argv)
    if a.format == "peft":
        s = export_peft_run(a.workdir, a.out, step=a.step, base=a.base, dtype=a.dtype, overwrite=a.overwrite)
        print(json.dumps(s, indent=1, default=str))
        return
    if a.base:
        ap.error("--base is only for --format=peft")
    s = export_run(a.workdir, a.out, step=a.step, dtype=a.dtype, max_shard_size=a.max_shard_size,
                   overwrite=a.overwrite, fmt=a.format, vq=a.vq)
    print(json.dumps(s, indent=1))


def export_peft_run(workdir: str, out: str, *, step: int | None = None, base: str | None = None,
                    dtype: str | None = None, overwrite: bool = False) -> dict:
    """Loads a run's checkpoint (``uvjax.inference.loading.load_trained``) and writes its PEFT adapter;
    ``out`` may be a ``gs://`` URL (written locally, then uploaded)."""
    run = loading.load_trained(workdir, step)
    local = out
    if sp.is_remote(out):
        if sp.exists(out) and sp.listdir(out) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite")
        os.makedirs(sp.remote_cache_dir("export"), exist_ok=True)
        local = tempfile.mkdtemp(prefix="peft-", dir=sp.remote_cache_dir("export"))
    summary = export_peft(run.variables, run.model.cfg, run.tokenizer, local, base_dir=base,
                          dtype=dtype or str(run.cfg.model.param_dtype), overwrite=overwrite or local != out,
                          run_config=run.cfg)
    if local != out:
        sp.upload(local, out)
        shutil.rmtree(local, ignore_errors=True)
        summary = json.loads(json.dumps(summary, default=str).replace(local, sp.resolve(out)))
    summary["step"] = run.step
    return summary


def console_main():
    """``uvjax-export`` (the console script) and ``python -m uvjax.export``."""
    main()


if __name__ == "__main__":
    console_main()
