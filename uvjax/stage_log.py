"""Stage fingerprints (a hash of the config that produced an output) and ``<workdir>/stages.jsonl``: the record of which stage directory (and fingerprint) a run used, read by
everything that opens a run (the trainer, evaluation, decoding, export) and written by the stage cache."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

import ml_collections as mlc

from uvjax import integrity_files as itg
from uvjax import storage_paths as sp

_log = logging.getLogger(__name__)


class StageLog:
    """``<workdir>/stages.jsonl``, appended to (on ``gs://``: ``storage_paths.append_text``)."""

    def __init__(self, workdir: str):
        self.path = sp.join(workdir, "stages.jsonl")
        sp.makedirs(workdir)

    def write(self, **rec):
        sp.append_text(self.path, itg.seal_line({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **rec}))

    def used_content(self, stage: str, fp: str) -> str | None:
        """The content digest of ``stage``/``fp`` this work dir last recorded using (None: never)."""
        recs = [r for r in read_stage_log(sp.parent(self.path) if sp.is_remote(self.path)
                                          else os.path.dirname(self.path))
                if r.get("stage") == stage and r.get("fingerprint") == fp and r.get("content")]
        return recs[-1]["content"] if recs else None


def read_stage_log(workdir: str) -> list[dict]:
    """The records of ``<workdir>/stages.jsonl``. Each line carries a CRC-32 (``integrity_files.seal_line``);
    a damaged line (a killed append, a flipped bit) is left out with a warning naming the file and line."""
    path = sp.join(workdir, "stages.jsonl")
    if not sp.exists(path):
        return []
    recs, problems = itg.parse_lines(sp.read_text(path), path, "stage record")
    for p in problems:
        _log.warning("%s; left out", p)
    return [{k: v for k, v in r.items() if k != "crc32"} for r in recs]


def stage_dir(workdir: str, stage: str) -> str | None:
    """The local directory of the last ``stage`` recorded in ``<workdir>/stages.jsonl`` (a stage cached on
    ``gs://`` is mirrored locally when this machine has no copy yet), verified against its manifest (raises
    ``StageCacheDamaged``); None when none is recorded."""
    recs = [r for r in read_stage_log(workdir) if r.get("stage") == stage and r.get("path")]
    if not recs:
        return None
    r = recs[-1]
    if os.path.exists(r["path"]) or not r.get("remote"):
        return _checked(r["path"])
    return _checked(sp.local_tree(r["remote"], sp.remote_cache_dir("stages"), key=r.get("fingerprint")))


def _checked(path: str) -> str:
    """``path``, verified against its manifest when it is a finished stage directory that has one (a given
    tower or VQ file is not a stage: returned as it is). Raises StageCacheDamaged."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "DONE.json")):
        info = itg.load_done(path)
        if "manifest" in info:
            itg.verify_stage(path, info)
    return path


STAGES_VERSION = 1  # bump when a stage's output format changes


def fingerprint(*parts: Any) -> str:
    blob = json.dumps([STAGES_VERSION, *[_jsonable(p) for p in parts]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _jsonable(x):
    if isinstance(x, mlc.ConfigDict):
        return json.loads(x.to_json_best_effort(sort_keys=True))
    return x
