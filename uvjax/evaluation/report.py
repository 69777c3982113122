"""What an evaluation writes and prints: report.json, the table, and flat scalars for metric writers."""
from __future__ import annotations

import json
import os

import numpy as np

from uvjax import storage_paths as sp
from uvjax.data import smartwatch as sw

GEN_ATTRS = ("time_hour", "time_quarter", "time_5min", "weather", "battery", "weather_pos", "battery_pos")


def write_report(report: dict, out_dir: str, files: dict, table) -> None:
    """``report.json`` and ``table.txt`` (``table(report)``) in ``out_dir`` (local or gs://); ``files`` (grid
    paths so far) gains both and is stored in the report."""
    files["report"] = os.path.join(out_dir, "report.json")
    files["table"] = os.path.join(out_dir, "table.txt")
    report["files"] = files
    sp.atomic_write_text(files["report"], json.dumps(report, indent=1, default=_json_default))
    sp.atomic_write_text(files["table"], table(report) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def flat_metrics(report: dict) -> dict[str, float]:
    """Scalars for a metric writer: ``eval/vqa/<attr>/<score>``, ``eval/caption/...``, ``eval/gen/...``."""
    out = {}
    for sect in ("vqa", "caption"):
        for attr, d in report.get(sect, {}).items():
            out.update({f"eval/{sect}/{attr}/{k}": float(v) for k, v in d.items() if k != "n"})
    g = report.get("generation", {})
    for attr, d in g.get("judge_accuracy", {}).items():
        out[f"eval/gen/{attr}/accuracy"] = float(d["accuracy"])
    if "frechet_judge" in g:
        out["eval/gen/frechet_judge"] = float(g["frechet_judge"]["generated_vs_real"])
    fid = g.get("fid_inception")
    if isinstance(fid, dict):
        out["eval/gen/fid_inception"] = float(fid["generated_vs_real"])
        if fid.get("real_vs_real") is not None:
            out["eval/gen/fid_inception_floor"] = float(fid["real_vs_real"])
    if "images_generated" in g:
        out["eval/gen/images_generated"] = float(g["images_generated"])
    return out


def format_table(report: dict) -> str:
    """A fixed-width text table of the report's headline numbers."""
    lines = [f"uvjax evaluation: {report['workdir']} step {report['step']}"
             f" ({report['split']['num_images']} test images{', quick' if report.get('quick') else ''})"]
    if "vqa" in report:
        lines += ["", f"{'VQA':14s} {'n':>5s} {'strict':>7s} {'toler.':>7s} {'coarse':>7s} {'hour':>6s} {'ref':>6s}"]
        for a in list(sw.VQA_ATTRIBUTES) + ["all"]:
            d = report["vqa"].get(a)
            if d:
                hour = f"{d['hour']:6.3f}" if "hour" in d else f"{'':6s}"
                lines.append(f"{a:14s} {d['n']:5d} {d['strict']:7.3f} {d['tolerant']:7.3f} {d['coarse']:7.3f} "
                             f"{hour} {d['reference']:6.3f}")
    if "caption" in report:
        lines += ["", f"{'caption recall':14s} {'n':>5s} {'recall':>7s}"]
        for a in list(sw.FRAGMENT_ORDER) + ["all"]:
            d = report["caption"].get(a)
            if d:
                lines.append(f"{a:14s} {d['n']:5d} {d['recall']:7.3f}")
    g = report.get("generation")
    if g:
        lines.append("")
        if "skipped" in g:
            lines.append(f"generation: skipped ({g['skipped']})")
        else:
            lines.append(f"generation: {g['n']} prompts, images produced {g['images_generated']:.3f}")
            if "judge_accuracy" in g:
                lines.append(f"{'judge reads':14s} {'n':>5s} {'gen':>7s} {'real':>7s}")
                for a in list(GEN_ATTRS) + ["all"]:
                    d, r = g["judge_accuracy"].get(a), g["judge_accuracy_on_real"].get(a)
                    if d:
                        lines.append(f"{a:14s} {d['n']:5d} {d['accuracy']:7.3f} {r['accuracy']:7.3f}")
            elif "judge_skipped" in g:
                lines.append(f"judge: {g['judge_skipped']}")
            if "frechet_judge" in g:
                fj = g["frechet_judge"]
                lines.append(f"Fréchet (judge features): generated-real {fj['generated_vs_real']:.3f}, "
                             f"real-real floor {fj['real_vs_real']:.3f} (n={fj['n_generated']})")
            fid = g.get("fid_inception")
            if isinstance(fid, dict):
                floor = "n/a" if fid.get("real_vs_real") is None else f"{fid['real_vs_real']:.2f}"
                lines.append(f"FID (Inception pool3, 299 px): generated-real {fid['generated_vs_real']:.2f}, "
                             f"real-real floor {floor} (halves of {fid['n_real']}) (n={fid['n']})")
            elif fid is not None:
                lines.append(f"FID (Inception): {fid}")
    lines.append(f"\ntime: {report['timing']}")
    return "\n".join(lines)


