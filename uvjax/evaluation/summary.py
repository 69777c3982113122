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
    lines += data_lines(summary.get("data") or {}, summary.get("seq_len"))
    files = (ev or {}).get("files", {})
    lines += ["", f"generations (real | generated | prompt): {files.get('grid', '-')}",
              f"report: {files.get('report', '-')}",
              *([f"learning curves: {sp.join(workdir, 'eval', 'curves.png')}"]
                if sp.exists(sp.join(workdir, "eval", "curves.png")) else []),
              f"TensorBoard: tensorboard --logdir {sp.join(workdir, 'tensorboard')}",
              f"metrics: {sp.join(workdir, 'metrics.jsonl')}"]
    return "\n".join(lines)


def data_lines(counts: dict, seq_len: int | None = None) -> list[str]:
    """The records the run's training read (all its invocations: the counts are checkpointed) that it did not use
    whole (no silent data change): skipped as
    bad, dropped as over-long, or truncated at ``train.seq_len`` (a cut never splits an image: an image that
    does not fit is left out with everything after it)."""
    n = int(counts.get("records", 0) or 0)
    parts = [f"{int(counts[k])} {what}" for k, what in (("skipped", "skipped as bad"), ("dropped", "dropped as too long"),
                                                       ("truncated", "truncated")) if int(counts.get(k, 0) or 0)]
    if not n or not parts:
        return []
    at = f" at train.seq_len={seq_len}" if seq_len else ""
    return ["", f"data: of {n} training records read, {', '.join(parts)}{at} (an image that does not fit is cut whole; "
                "data/* in metrics.jsonl)"]
