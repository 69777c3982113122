"""The stage cache: content fingerprints, the stage log, and :func:`cached_stage`, which builds a stage
once into ``<cache_dir>/<stage>-<fingerprint>/`` (local or ``gs://``), seals it and reuses it after."""
from __future__ import annotations

import glob as _glob
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Callable

from uvjax import integrity_files as itg
from uvjax import interrupt
from uvjax import storage_paths as sp
from uvjax.integrity_files import (
    StageCacheDamaged,  # noqa: F401  (raised by cached_stage)
    unsealed,
)
from uvjax.stage_log import StageLog
from uvjax.storage_paths import atomic_write_text

_log = logging.getLogger(__name__)


def stage_cache_dir(sc, workdir: str) -> str:
    """``stages.cache_dir``, else ``<parent of workdir>/cache``; either may be a ``gs://`` URL (see
    :func:`cached_stage` for how remote stages are read and written)."""
    if sp.is_remote(sc.cache_dir or workdir):
        return sp.resolve(sc.cache_dir) if sc.cache_dir else sp.join(sp.parent(workdir), "cache")
    cache = os.path.abspath(sc.cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache"))
    os.makedirs(cache, exist_ok=True)
    return cache


def cached_stage(name: str, fp: str, cache_dir: str, build: Callable[[str], dict], log: StageLog,
                 progress=None, inputs: dict[str, str | None] | None = None) -> tuple[str, dict]:
    """Returns (directory, info). Builds into a temporary directory and renames it when complete.

    Integrity (``uvjax/integrity_files.py``): ``DONE.json`` records a manifest of the stage's files (path,
    size, sha256) and a digest of itself, written before the rename. A reused stage is verified against it
    first; a damaged one raises :class:`StageCacheDamaged` (naming the directory, the file, expected vs
    found) and is left as it is. Its directory moved aside as ``<dir>.damaged*``, the next run rebuilds it and
    promotes the rebuild only if its content equals the record of the damaged one. A stage whose content
    differs from what this work dir used before (``stages.jsonl`` records each stage's content digest) is
    refused too: an LM is never continued on different data. Stages finished before manifests existed are
    reused unverified (one log line says so).

    ``inputs``: the stages this one is built from, ``{stage name: its directory}`` (None values, e.g. a VQ
    file the user gave instead of a stage, are left out). Fingerprints hash configs, not the inputs' bytes,
    so ``DONE.json`` records each input's content digest under ``inputs``; reusing the stage compares them
    with the current inputs' content, and a difference (an input deleted and rebuilt differently) raises
    :class:`StageCacheDamaged` naming both stages (:func:`_check_inputs`). A stage without an ``inputs``
    record (finished before it existed) is reused as before. A ``.partial`` build records them too
    (``.uvjax-inputs.json``, removed before sealing), so a killed build is resumed only from the same inputs.

    A ``gs://`` cache_dir: the stage lives in ``<cache_dir>/<name>-<fp>/`` in the bucket, and the returned
    directory is always a local one (every consumer reads local files): a finished remote stage
    (``DONE.json`` there) is mirrored once into ``$UVJAX_CACHE/stages`` (``storage_paths.local_tree``,
    keyed by the URL and the fingerprint), and the mirror is verified as a local stage is (a damaged mirror
    is moved aside and downloaded again once); an unfinished one is built locally (``<mirror>.partial``,
    resumable as here), uploaded, ``DONE.json`` last, and the local build becomes the mirror."""
    if sp.is_remote(cache_dir):
        return _cached_remote_stage(name, fp, cache_dir, build, log, progress, inputs)
    out = os.path.join(cache_dir, f"{name}-{fp}")
    done = os.path.join(out, "DONE.json")
    t0 = time.time()
    current = _input_contents(inputs)
    if os.path.exists(done) or os.path.isdir(out):  # `out` only ever appears with DONE.json in it (rename)
        info, content = _verified(name, fp, out, log, progress, current=current)
        log.write(stage=name, fingerprint=fp, reused=True, seconds=0.0, path=out, content=content,
                  verified=content is not None, verify_seconds=round(time.time() - t0, 3),
                  **({"inputs": current} if current else {}))
        if progress:
            progress(f"{name}: reused {out}")
        return out, info
    interrupt.check()  # a stop requested during the previous stage: before starting this one
    work = out + ".partial"
    os.makedirs(work, exist_ok=True)  # a .partial left by a killed run is resumed (chunk markers)
    _start_partial(name, work, current, progress)
    if progress:
        progress(f"{name}: building {out}")
    info = _finish(name, fp, out, work, build(work) or {}, t0, log, current)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(work, out)
    log.write(stage=name, fingerprint=fp, reused=False, seconds=info["seconds"], path=out, content=info["content"],
              **({"inputs": current} if current else {}))
    return out, _unsealed(info)


def _unsealed(info: dict) -> dict:
    return unsealed(info)


def _say(progress, msg: str) -> None:
    (progress or (lambda m: print(f"[stage] {m}", flush=True)))(msg)


def _verified(name: str, fp: str, out: str, log: StageLog, progress, *, where: str | None = None,
              current: dict | None = None, remote: str | None = None) -> tuple[dict, str | None]:
    """(info, content digest) of the finished stage in ``out``, verified against its manifest and (``current``:
    its inputs' content now) the inputs it was built from; content None for a stage finished before manifests
    (reused unverified, said once). Raises StageCacheDamaged."""
    if not os.path.exists(os.path.join(out, "DONE.json")):
        raise StageCacheDamaged(
            f"stage cache {where or out} is damaged: its DONE.json is missing (a finished stage always has "
            f"one). {itg._what_to_do(out)}", out, [("DONE.json", "the stage's completion record", "missing")])
    info = itg.load_done(out)
    if "manifest" not in info:
        _say(progress, f"{name}: {out} was finished before stage manifests existed: reused UNVERIFIED "
                       "(move it aside to rebuild it with a manifest)")
        return itg.unsealed(info), None
    itg.verify_stage(out, info)
    content = info.get("content") or itg.content_digest(info["manifest"])
    _check_history(name, fp, content, out, log)
    aside = (f"gcloud storage mv {remote} {remote}.stale, and rm -r {out} (its local copy)" if remote
             else f"mv {out} {out}.stale")
    _check_inputs(name, where or out, out, info.get("inputs"), current, aside)
    return itg.unsealed(info), content


INPUTS_FILE = ".uvjax-inputs.json"  # in a .partial build: the inputs it started from (removed before sealing)


def _input_contents(inputs: dict | None) -> dict:
    """``{input stage: {"content": digest or None, "path": directory}}`` of the given input stages (a None
    directory, or one that is not a stage, e.g. a VQ file the user gave, is left out)."""
    out = {}
    for k, d in sorted((inputs or {}).items()):
        if d and os.path.exists(os.path.join(d, "DONE.json")):
            out[k] = {"content": itg.stage_content(d), "path": d}
    return out


def _recorded(current: dict) -> dict:
    """What ``DONE.json`` records of the inputs: their content only (the directory may move)."""
    return {k: v["content"] for k, v in current.items()}


class StageInputsChanged(StageCacheDamaged):
    """A finished stage built from input stages whose content differs from the inputs now in use."""


def _check_inputs(name: str, where: str, out: str, recorded: dict | None, current: dict | None, aside: str) -> None:
    """Refuses (:class:`StageInputsChanged`) a stage built from inputs whose content differs from the inputs
    now in use; ``aside``: the command that moves the stage aside."""
    if not recorded or current is None:
        return  # finished before inputs were recorded (reused as before), or the caller gave none
    diff = [(k, recorded[k], current[k]) for k in sorted(recorded) if k in current
            and recorded[k] != current[k]["content"]]
    if not diff:
        return
    short = lambda c: f"{c[:16]}..." if c else "unknown (finished before stage manifests)"
    lines = "\n".join(f"  {k}: built from content {short(was)}, the {k} stage now in use ({now['path']}) holds "
                      f"content {short(now['content'])}" for k, was, now in diff)
    ks = ", ".join(k for k, _, _ in diff)
    raise StageInputsChanged(
        f"stage {name} in {where} was built from other {ks} stage content than the one now in use:\n{lines}\n"
        f"(the {ks} stage was deleted or moved aside and rebuilt, and the rebuild is not bit-identical: VQ and "
        f"tower training are not reproducible bit for bit). Its files were made from the old {ks}, so they are "
        f"not used. Either restore the original {ks} stage directory, or move this stage aside so that the next "
        f"run rebuilds it from the current {ks}: {aside} (not .damaged: a .damaged copy makes the "
        f"rebuild be checked against it). A run that trained on the old {name} must continue in a new work "
        f"directory; stages built from this one are refused in the same way until moved aside too", out,
        [(f"inputs/{k}", f"content {was}", f"content {now['content']}") for k, was, now in diff])


def _start_partial(name: str, work: str, current: dict, progress) -> None:
    """Records in ``work`` the inputs a build starts from; a ``.partial`` left by a killed build that started
    from other inputs, or whose record is damaged or missing, is emptied first, with a line saying so: its
    finished chunks may have been made from other inputs (redoing them costs time, never correctness)."""
    if not current:
        return
    path = os.path.join(work, INPUTS_FILE)
    want = _recorded(current)
    if os.path.exists(path):
        try:
            had = itg.read_json(path, "record of a partial build's inputs")
        except itg.DamagedFile:
            had = None
        if had != want:
            _say(progress, f"{name}: the unfinished build in {work} started from other inputs ({path}: {had}, now "
                           f"{want}) or its record is damaged: starting it over")
            shutil.rmtree(work)
            os.makedirs(work)
    elif os.listdir(work):  # started by a uvjax before input records, or the record was deleted: unknown
        _say(progress, f"{name}: the unfinished build in {work} has no record of the inputs it started from "
                       f"({INPUTS_FILE}): starting it over")
        shutil.rmtree(work)
        os.makedirs(work)
    atomic_write_text(path, json.dumps(want))


def _check_history(name: str, fp: str, content: str, out: str, log: StageLog) -> None:
    """Refuses a stage whose content differs from what this work dir used before under the same fingerprint."""
    used = log.used_content(name, fp)
    if used is not None and used != content:
        raise StageCacheDamaged(
            f"stage {name} in {out} is not the one this run used before: {log.path} records content "
            f"{used[:16]}..., the cache now holds {content[:16]}... (rebuilt after damage or deletion, and not "
            "bit-identical). A run must not continue on different data: restore the original stage directory, "
            "or train in a new work directory", out, [("*", f"content {used}", f"content {content}")])


def _finish(name: str, fp: str, out: str, work: str, info: dict, t0: float, log: StageLog,
            current: dict | None = None) -> dict:
    """Seals a completed build in ``work``: manifest + content digest + the inputs' content (``current``) +
    DONE.json (digested), after checking the rebuild against the record of a damaged copy moved aside
    (``<out>.damaged*``) and this work dir's history. Returns the sealed info."""
    if os.path.exists(os.path.join(work, INPUTS_FILE)):
        os.remove(os.path.join(work, INPUTS_FILE))
    manifest = itg.build_manifest(work)
    content = itg.content_digest(manifest)
    info = itg.seal({**info, "fingerprint": fp, "seconds": time.time() - t0, "manifest": manifest,
                     "content": content, **({"inputs": _recorded(current)} if current else {})})
    for old in sorted(_glob.glob(out + ".damaged*"), key=os.path.getmtime, reverse=True):
        try:
            rec = itg.load_done(old)
        except StageCacheDamaged:
            continue  # its record is damaged too: nothing to compare with
        if "manifest" not in rec:
            continue
        want = rec.get("content") or itg.content_digest(rec["manifest"])
        if want != content:
            diff = sorted(k for k in set(manifest["files"]) | set(rec["manifest"]["files"]) if not itg.is_volatile(k)
                          and (manifest["files"].get(k) or {}).get("sha256")
                          != (rec["manifest"]["files"].get(k) or {}).get("sha256"))
            raise StageCacheDamaged(
                f"the rebuilt {name} stage ({work}) is not bit-identical to the damaged one's record "
                f"({old}/DONE.json); differing files: {diff[:10]}. It is not used: runs and stages built on the "
                f"original must not continue on different data. To start afresh with the rebuild (a new work "
                f"directory), move {old} out of {os.path.dirname(out)} and move aside the stages built from this "
                "one (later stages in the cache), then rerun", work, [(k, "as recorded", "different") for k in diff])
        _log.info("%s: rebuild is bit-identical to the record in %s", name, old)
        break
    _check_history(name, fp, content, out, log)
    with open(os.path.join(work, "DONE.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _cached_remote_stage(name: str, fp: str, cache_dir: str, build: Callable[[str], dict], log: StageLog,
                         progress=None, inputs: dict | None = None) -> tuple[str, dict]:
    """:func:`cached_stage` for a ``gs://`` cache_dir; the log records the local mirror as ``path`` (what
    consumers open) and the URL as ``remote``."""
    out = sp.join(cache_dir, f"{name}-{fp}")
    mirrors = sp.remote_cache_dir("stages")
    mirror = sp.tree_mirror_path(out, mirrors, fp)
    t0 = time.time()
    current = _input_contents(inputs)
    if os.path.exists(os.path.join(mirror, "DONE.json")) or sp.exists(sp.join(out, "DONE.json")):
        for attempt in (0, 1):
            mirror = sp.local_tree(out, mirrors, key=fp)  # no request when the mirror is there
            try:
                info, content = _verified(name, fp, mirror, log, progress, where=f"{out} (local copy {mirror})",
                                          current=current, remote=out)
                break
            except StageInputsChanged:
                raise  # the copy is sound: the stage was built from other inputs (downloading it again is no help)
            except StageCacheDamaged as e:
                if attempt:
                    raise StageCacheDamaged(
                        f"{e}\nIt was downloaded again from {out}, so the copy in the bucket is damaged: move it "
                        f"aside (gcloud storage mv {out} {out}.damaged); the next run rebuilds the stage", out,
                        e.problems) from e
                aside = tempfile.mkdtemp(prefix=f"{os.path.basename(mirror)}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-",
                                         dir=os.path.dirname(mirror))
                os.replace(mirror, aside)  # a local copy: moved aside, fetched again from the bucket
                _say(progress, f"{name}: local copy {mirror} of {out} is damaged (moved to {aside}); downloading "
                               "it again")
        log.write(stage=name, fingerprint=fp, reused=True, seconds=0.0, path=mirror, remote=out, content=content,
                  verified=content is not None, verify_seconds=round(time.time() - t0, 3),
                  **({"inputs": current} if current else {}))
        if progress:
            progress(f"{name}: reused {out} (local copy {mirror})")
        return mirror, info
    interrupt.check()
    work = mirror + ".partial"
    os.makedirs(work, exist_ok=True)  # a .partial left by a killed run is resumed (chunk markers)
    _start_partial(name, work, current, progress)
    if progress:
        progress(f"{name}: building {out} (locally in {work})")
    info = _finish(name, fp, mirror, work, build(work) or {}, t0, log, current)
    sp.upload(work, out, exclude=("DONE.json",))
    sp.upload(os.path.join(work, "DONE.json"), sp.join(out, "DONE.json"))  # last: the stage is complete
    if os.path.exists(mirror):
        shutil.rmtree(mirror)
    os.replace(work, mirror)
    log.write(stage=name, fingerprint=fp, reused=False, seconds=info["seconds"], path=mirror, remote=out,
              content=info["content"], **({"inputs": current} if current else {}))
    return mirror, _unsealed(info)

