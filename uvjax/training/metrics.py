"""Metric sinks: TensorBoard event files and ``metrics.jsonl`` (one JSON object per logged step).

On a ``gs://`` work dir (``uvjax/storage_paths.py``) ``metrics.jsonl`` cannot be appended to in place: each
append rewrites the object, so lines are buffered and appended in one batch every ``flush_secs`` seconds, at
``flush()`` (the trainer calls it before every checkpoint, so the metrics of checkpointed steps are in the
bucket) and at ``close()``. Each line ends in a CRC-32 of the rest (``"crc32": "..."``, see
:func:`read_metrics`). TensorBoard is given the URL as it is (tensorboardX writes ``gs://`` itself).

Beyond scalars the writer takes images and text (the evaluations' grids and tables, ``write_images`` /
``write_text``: called at evaluation steps only, so the event files stay small) and, given the run's config,
writes it once per writer as the TensorBoard HParams plugin's session (:func:`flat_hparams`). Only a session
start is written, no experiment summary: TensorBoard then builds the HParams table from every run under
``--logdir``, so runs can be compared, and takes each run's scalars (``loss``, ``eval/...``) as its metrics.

An optional Weights & Biases sink (config ``train.wandb``, off by default; ``mode="offline"`` writes
``<workdir>/wandb`` without network, ``wandb sync`` uploads it later) receives the same scalars, images, text
and the config. wandb is imported only when the sink is on.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
import time
from typing import Any, Mapping

import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto.api_pb2 import Status
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboardX.summary import hparams as hparams_summary

from uvjax import integrity_files as itg
from uvjax import storage_paths as sp
from uvjax.integrity_files import seal_line

log = logging.getLogger(__name__)


WANDB_MODES = ("online", "offline", "disabled", "shared")
HPARAM_STR_MAX = 1024  # longer values (a code-token id list) are cut: the HParams table shows them in a cell


def flat_hparams(config) -> dict[str, bool | int | float | str]:
    """The config as HParams plugin values: ``section.key`` → bool / int / float / str. Lists and tuples
    (JSON of the config) become their JSON text (``[1, -1, 1]``) and None ``"null"``, since the plugin only
    stores scalars and strings; strings over ``HPARAM_STR_MAX`` characters end in ``…``."""
    tree = _config_dict(config)
    out: dict[str, bool | int | float | str] = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                walk(v, key + ".")
                continue
            if not isinstance(v, (bool, int, float, str)):
                v = json.dumps(v)
            if isinstance(v, str) and len(v) > HPARAM_STR_MAX:
                v = v[:HPARAM_STR_MAX - 1] + "…"
            out[key] = v
    walk(tree, "")
    return out


def _config_dict(config) -> dict:
    """A plain JSON-able dict of a ConfigDict (or a dict)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def wandb_settings(config) -> dict | None:
    """The config's ``train.wandb`` section as a dict when the sink is on, else None (older run configs
    have no such section: off)."""
    if config is None:
        return None
    train = config.get("train") if hasattr(config, "get") else None
    sect = train.get("wandb") if train is not None and hasattr(train, "get") else None
    if sect is None or not bool(sect.get("enabled", False)):
        return None
    return dict(sect)


class MetricWriter:
    """``metrics.jsonl`` + TensorBoard (+ W&B when ``config.train.wandb.enabled``). ``config``: the run's
    config; given, it is logged once (TensorBoard HParams, W&B run config) and read for ``train.wandb``."""

    def __init__(self, workdir: str, enabled: bool = True, flush_secs: float = 10.0, *, config=None):
        self.enabled = enabled
        self.workdir = workdir
        self.path = sp.join(workdir, "metrics.jsonl")
        self.remote = sp.is_remote(workdir)
        self.flush_secs = float(flush_secs)
        self._pending: list[str] = []
        self._last_push = time.monotonic()
        self._tb = None
        self._wandb = None
        self._session = False
        if enabled:
            self._tb = SummaryWriter(logdir=sp.join(workdir, "tensorboard"), flush_secs=10)
            wb = wandb_settings(config)
            if wb is not None:
                try:
                    self._wandb = _start_wandb(workdir, wb, config)
                except BaseException:
                    self._tb.close()
                    raise
            if config is not None:
                self.write_hparams(flat_hparams(config))

    def write_hparams(self, hparams: dict) -> None:
        """The HParams plugin's session start for this run (values: bool / int / float / str)."""
        if self._tb is None:
            return
        _, start, _ = hparams_summary(hparams, {})
        self._tb._get_file_writer().add_summary(start)
        self._session = True

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """uint8 ``[H, W, 3]`` arrays as TensorBoard images (PNG, lossless) and W&B images at ``step``."""
        if not self.enabled or not images:
            return
        arrays = {}
        for tag, img in images.items():
            a = np.asarray(img)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
                raise ValueError(f"image {tag!r}: expected a uint8 [H, W, 1|3|4] array, got {a.dtype} {a.shape}")
            arrays[tag] = a
            self._tb.add_image(tag, a, int(step), dataformats="HWC")
        if self._wandb is not None:
            import wandb  # the viz extra; only when the W&B sink is on
            self._wandb.log({t: wandb.Image(a) for t, a in arrays.items()}, step=int(step))

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Fixed-width text (tables) at ``step``: TensorBoard's text plugin renders Markdown, so each text is
        sent as a fenced code block (spacing kept); W&B gets it as preformatted HTML."""
        if not self.enabled or not texts:
            return
        for tag, text in texts.items():
            self._tb.add_text(tag, f"```\n{text}\n```", int(step))
        if self._wandb is not None:

            import wandb  # the viz extra; only when the W&B sink is on
            self._wandb.log({t: wandb.Html(f"<pre>{html.escape(x)}</pre>") for t, x in texts.items()},
                            step=int(step))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()}
        line = seal_line({"step": int(step), **{k: (v if not (isinstance(v, float) and not math.isfinite(v))
                                                    else str(v)) for k, v in clean.items()}})
        if self.remote:
            self._pending.append(line)
            if time.monotonic() - self._last_push >= self.flush_secs:
                self._push()
        else:
            with open(self.path, "a") as f:
                f.write(line)
        scalars = {k: v for k, v in clean.items() if isinstance(v, float)}
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=int(step))

    def _push(self) -> None:
        if self._pending:
            sp.append_text(self.path, "".join(self._pending))
            self._pending = []
        self._last_push = time.monotonic()

    def flush(self):
        if self.enabled:
            self._push()
        if self._tb is not None:
            self._tb.flush()

    def close(self, status: str = "success"):
        """Pushes buffered lines, ends the HParams session (``status``: success | failure) and the W&B run."""
        try:
            if self.enabled:
                self._push()
        finally:
            try:
                if self._tb is not None:
                    if self._session:
                        self._tb._get_file_writer().add_summary(_session_end(status))
                        self._session = False
                    self._tb.close()
            finally:
                if self._wandb is not None:
                    run, self._wandb = self._wandb, None
                    run.finish(exit_code=0 if status == "success" else 1)


def _session_end(status: str):
    """The HParams plugin's session end summary (tensorboardX's protos; its ``hparams`` always says success)."""
    info = SessionEndInfo(status=Status.Value("STATUS_SUCCESS" if status == "success" else "STATUS_FAILURE"),
                          end_time_secs=time.time())
    content = HParamsPluginData(session_end_info=info, version=0).SerializeToString()
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content))
    return Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=meta)])


def _start_wandb(workdir: str, settings: dict, config):
    """``wandb.init`` for the run, files under ``<workdir>/wandb`` (a gs:// run: in the local cache, wandb
    writes local files). One id per work dir (kept in ``wandb/uvjax_run_id``): online, a resumed training and
    the final evaluation continue that W&B run; offline, wandb cannot resume a run (syncing a second offline
    directory of the same id replaces the first's history: wandb/wandb#5865), so each writer is a new
    offline run in the W&B group of that id."""
    mode = str(settings.get("mode", "offline"))
    if mode not in WANDB_MODES:
        raise ValueError(f"train.wandb.mode={mode!r}; expected one of {', '.join(WANDB_MODES)}")
    try:
        import wandb
    except ImportError as e:
        raise ImportError("train.wandb.enabled=True needs the wandb package: pip install 'uvjax[viz]' (or set "
                          f"train.wandb.enabled=False) ({e})") from None
    if sp.is_remote(workdir):
        base = os.path.join(sp.remote_cache_dir("wandb"), hashlib.sha256(workdir.encode()).hexdigest()[:16])
    else:
        base = workdir
    os.makedirs(os.path.join(base, "wandb"), exist_ok=True)
    id_file = os.path.join(base, "wandb", "uvjax_run_id")
    if os.path.exists(id_file):
        run_id = open(id_file).read().strip()
    else:
        run_id = wandb.util.generate_id()
        with open(id_file, "w") as f:
            f.write(run_id + "\n")
    resumable = mode in ("online", "shared")
    return wandb.init(project=str(settings.get("project") or "uvjax"), entity=str(settings.get("entity") or "") or None,
                      name=str(settings.get("run_name") or "") or None, mode=mode, dir=base,
                      id=run_id if resumable else wandb.util.generate_id(), resume="allow" if resumable else None,
                      group=run_id, reinit="create_new",
                      config=_config_dict(config) if config is not None else None)


class Metrics(dict):
    """``read_metrics``' result: step → metrics, plus ``damaged``: the lines left out (file:line: why)."""

    damaged: list[str]


def read_metrics(workdir: str) -> Metrics:
    """Step → metrics; a step logged twice (re-run after a crash) keeps its last record.

    Every line carries a CRC-32 (``integrity_files.seal_line``; files written before have none and are read as
    they are). A damaged line (does not parse, CRC mismatch: a run killed mid-append, a flipped bit) is left out,
    counted in ``.damaged`` and reported in a warning naming the file and line: metrics are a log that plots and
    experiment tables read, and training never reads them back, so one bad line costs that line, not the file."""
    out = Metrics()
    out.damaged = []
    path = sp.join(workdir, "metrics.jsonl")
    if not sp.exists(path):
        return out
    recs, problems = itg.parse_lines(sp.read_text(path), path, "metrics line")
    for rec in recs:
        rec.pop("crc32", None)
        try:
            step = int(rec["step"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: damaged metrics line (no integer step): {json.dumps(rec)[:120]}")
            continue
        out[step] = rec
    out.damaged = problems
    if problems:
        log.warning("%d damaged line(s) of %s left out:\n  %s", len(problems), path, "\n  ".join(problems[:20]))
    return out
