"""The first run's closing summary: the evaluation table (Smart Watch or held-out), the wall time of every
stage of this invocation, and where the grids, the report and the logs are."""
from __future__ import annotations

from uvjax import storage_paths as sp
from uvjax.evaluation import heldout
from uvjax.evaluation.report import format_table
from uvjax.stage_log import read_stage_log


def run_summary_table(summary: dict, workdir: str) -> str:
    """What the first run prints at the end: the evaluation table (VQA and generation accuracy per
    attribute, Fréchet distance), wall time per stage of this invocation, and where to look."""
    lines = []
    ev = summary.get("evaluation")
    if ev:
        lines += [(heldout.format_table if ev.get("split") == "heldout" else format_table)(ev), ""]
    log = read_stage_log(workdir)
    last = {}  # this invocation's entries: the stage log is appended to, one line per stage and run
    for rec in log:
        last[rec["stage"]] = rec
    if last:
        lines.append("stage        wall s  cached  path")
        for name, rec in last.items():
            lines.append(f"{name:<12} {float(rec['seconds']):7.1f}  {'yes' if rec['reused'] else 'no':>6}  {rec['path']}")
        lines.append(f"{'total':<12} {sum(float(r['seconds']) for r in last.values()):7.1f}")
    files = (ev or {}).get("files", {})
    lines += ["", f"generations (real | generated | prompt): {files.get('grid', '-')}",
              f"report: {files.get('report', '-')}",
              f"TensorBoard: tensorboard --logdir {sp.join(workdir, 'tensorboard')}",
              f"metrics: {sp.join(workdir, 'metrics.jsonl')}"]
    return "\n".join(lines)
