"""The stage graph before the LM: source → tokenizer → towers → pre-tokenised dataset (→ LM → evaluation).

One graph for every source and architecture (:func:`prepare`): the source is the Smart Watch renderer (the
first run; + the reasoning generator) or the user's imported data (``stages.source``, uvjax/stages_imported.py);
the towers are the VQ tokenizer and/or a SigLIP/CLIP tower, trained by uvjax or given as files; user images go
through the understanding tower and assistant images through the generation tower (uvjax/stages_features.py
has the SigLIP pieces).

Each stage's output lives in ``<cache_dir>/<stage>-<fingerprint>/`` where the fingerprint hashes the
config that produced it and the fingerprints of its inputs. A finished stage writes ``DONE.json``
last (after its files are complete), so a killed stage is rebuilt and a finished one is reused by the
next run — and by other configs that share it (e.g. vqvq and siglipvq share the dataset and the text
tokenizer). Every decision is appended to ``<workdir>/stages.jsonl`` (stage, fingerprint, reused or
built, seconds), which is also how tests check what was rebuilt. SIGTERM/SIGINT stop a stage at its next
safe point (``uvjax.interrupt``: between chunks or training steps); the rerun resumes.

The pre-tokenisation pass renders the Smart Watch records image by image, runs the frozen VQ encoder
over them in batches and stores codes in the records (ArrayRecord), so the train step never runs a
frozen tower. It is resumable by chunk: finished chunks have their own marker and are skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Callable

import ml_collections as mlc
import numpy as np

from uvjax.integrity_files import StageCacheDamaged  # noqa: F401  (raised by cached_stage)

_log = logging.getLogger(__name__)

STAGES_VERSION = 1  # bump when a stage's output format changes


def fingerprint(*parts: Any) -> str:
    blob = json.dumps([STAGES_VERSION, *[_jsonable(p) for p in parts]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _jsonable(x):
    if isinstance(x, mlc.ConfigDict):
        return json.loads(x.to_json_best_effort(sort_keys=True))
    return x


def stages_config() -> mlc.ConfigDict:
    """Defaults for ``config.stages`` (the LM config embeds it)."""
    from uvjax.config import load_config_file
    vq_config = lambda preset: load_config_file("vq_tokenizer", preset)
    c = mlc.ConfigDict()
    c.build = True  # run the stages; False: use config.data paths and config.data.tokenizer as given
    c.cache_dir = ""  # "" = <parent of workdir>/cache
    c.data = mlc.ConfigDict(dict(seed=0, num_train=4000, num_test=500, image_size=64, time_seconds=False,
                                 records_per_shard=1000, encode_batch=64))
    c.tokenizer = mlc.ConfigDict(dict(vocab_size=2048, corpus_images=2000))
    # knowledge-transfer splits: ((attribute, keep rate), ...) thins VQA turns and caption fragments about
    # an attribute in the *train* understanding records (generation and the test split stay complete)
    c.data.understanding_keep = ()
    # UnifiedVisual-style reasoning records (uvjax/data/reasoning.py) pre-tokenised into the interleaved
    # stream when num_scenes > 0; rationale=False is the ablation (same prompts and images, no rationale)
    c.reasoning = mlc.ConfigDict(dict(num_scenes=0, rationale=True, tasks=("gen_reasoning",)))
    c.vq = vq_config("tiny")
    # What the run's final evaluation covers: VQA and generation (the first run's table). Caption recall
    # costs ~11 s more on 500 test images: add "caption", or run `python -m uvjax.evaluate --workdir=RUN`.
    # num_images: test images evaluated (0: the whole test split); a slow preset (smollm2) evaluates fewer.
    c.evaluate = mlc.ConfigDict(dict(enabled=True, quick=False, tasks=("vqa", "generation"), num_images=0))
    # where the records come from: the Smart Watch renderer (default) or the user's data (uvjax/stages_imported.py)
    from uvjax.stages_imported import source_config
    c.source = source_config()
    return c


def stage_cache_dir(sc, workdir: str) -> str:
    """``stages.cache_dir``, else ``<parent of workdir>/cache``; either may be a ``gs://`` URL (see
    :func:`cached_stage` for how remote stages are read and written)."""
    from uvjax import storage_paths as sp
    if sp.is_remote(sc.cache_dir or workdir):
        return sp.resolve(sc.cache_dir) if sc.cache_dir else sp.join(sp.parent(workdir), "cache")
    cache = os.path.abspath(sc.cache_dir or os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache"))
    os.makedirs(cache, exist_ok=True)
    return cache


def check_no_user_streams(cfg) -> None:
    """The stages point ``data.streams.*.paths`` at their own shards; a config that set them itself would
    have its data replaced without a word, so it is refused instead."""
    given = {s: tuple(cfg.data.streams[s].paths) for s in cfg.data.streams if tuple(cfg.data.streams[s].paths)}
    if given:
        raise ValueError(
            f"data.streams paths are set ({given}) while stages.build=True, which would replace them with the "
            "stages' shards. To train on your own data either let the stages import and pre-tokenise it "
            "(--config.stages.source.kind=imported --config.stages.source.train=DATA.json "
            "--config.stages.source.image_dir=IMAGES; README 'Train on your own data'), or train on shards you "
            "pre-tokenised yourself with --config.stages.build=False")


class StageLog:
    """``<workdir>/stages.jsonl``, appended to (on ``gs://``: ``storage_paths.append_text``)."""

    def __init__(self, workdir: str):
        from uvjax import storage_paths as sp
        self.path = sp.join(workdir, "stages.jsonl")
        sp.makedirs(workdir)

    def write(self, **rec):
        from uvjax import storage_paths as sp
        from uvjax import integrity_files as itg
        sp.append_text(self.path, itg.seal_line({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **rec}))

    def used_content(self, stage: str, fp: str) -> str | None:
        """The content digest of ``stage``/``fp`` this work dir last recorded using (None: never)."""
        from uvjax import storage_paths as sp
        recs = [r for r in read_stage_log(sp.parent(self.path) if sp.is_remote(self.path)
                                          else os.path.dirname(self.path))
                if r.get("stage") == stage and r.get("fingerprint") == fp and r.get("content")]
        return recs[-1]["content"] if recs else None


def read_stage_log(workdir: str) -> list[dict]:
    """The records of ``<workdir>/stages.jsonl``. Each line carries a CRC-32 (``integrity_files.seal_line``);
    a damaged line (a killed append, a flipped bit) is left out with a warning naming the file and line."""
    from uvjax import integrity_files as itg
    from uvjax import storage_paths as sp
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
    from uvjax import storage_paths as sp
    return _checked(sp.local_tree(r["remote"], sp.remote_cache_dir("stages"), key=r.get("fingerprint")))


def _checked(path: str) -> str:
    """``path``, verified against its manifest when it is a finished stage directory that has one (a given
    tower or VQ file is not a stage: returned as it is). Raises StageCacheDamaged."""
    from uvjax import integrity_files as itg
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "DONE.json")):
        info = itg.load_done(path)
        if "manifest" in info:
            itg.verify_stage(path, info)
    return path


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
    from uvjax import storage_paths as sp
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
    from uvjax import interrupt
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
    from uvjax.integrity_files import unsealed
    return unsealed(info)


def _say(progress, msg: str) -> None:
    (progress or (lambda m: print(f"[stage] {m}", flush=True)))(msg)


def _verified(name: str, fp: str, out: str, log: StageLog, progress, *, where: str | None = None,
              current: dict | None = None, remote: str | None = None) -> tuple[dict, str | None]:
    """(info, content digest) of the finished stage in ``out``, verified against its manifest and (``current``:
    its inputs' content now) the inputs it was built from; content None for a stage finished before manifests
    (reused unverified, said once). Raises StageCacheDamaged."""
    from uvjax import integrity_files as itg
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
    from uvjax import integrity_files as itg
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
    from uvjax import integrity_files as itg
    from uvjax.storage_paths import atomic_write_text
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
    import glob as _glob
    from uvjax import integrity_files as itg
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
    from uvjax import storage_paths as sp
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
                import tempfile
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
    from uvjax import interrupt
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


# ------------------------------------------------------------------------------------------ fingerprints
def data_fp_parts(sc, *, for_tokenizer: bool = False) -> dict:
    """``stages.data`` as fingerprinted. Options at their defaults are left out, so adding an option never
    changes existing fingerprints; ``understanding_keep`` does not change the tokenizer's corpus."""
    d = dict(sc.data)
    keep = d.pop("understanding_keep", ())
    if keep and not for_tokenizer:
        d["understanding_keep"] = [list(kv) for kv in keep]
    return d


def reasoning_enabled(sc) -> bool:
    r = sc.get("reasoning")
    return r is not None and int(r.get("num_scenes", 0)) > 0


def train_split_spec(sc):
    """The Smart Watch train split of ``stages.data`` (with ``understanding_keep`` applied)."""
    import dataclasses
    from uvjax.data import smartwatch as sw
    d = sc.data
    spec = sw.default_splits(seed=int(d.seed), num_train=int(d.num_train), num_test=int(d.num_test),
                             image_size=int(d.image_size))["train"]
    keep = tuple(sorted((str(k), float(r)) for k, r in (d.get("understanding_keep") or ())))
    return dataclasses.replace(spec, understanding_keep=keep, time_seconds=bool(d.time_seconds))


def _reasoning_spec(sc, image_size: int | None = None):
    from uvjax.data import reasoning as rs
    r = sc.reasoning
    return rs.ReasoningSpec("train", seed=int(sc.data.seed), num_scenes=int(r.num_scenes),
                            image_size=int(image_size or sc.data.image_size), rationale=bool(r.rationale),
                            tasks=tuple(r.tasks))


# ------------------------------------------------------------------------------------------ stages
def build_tokenizer(sc, template_name: str, out: str) -> dict:
    from uvjax.data import smartwatch as sw
    from uvjax.data.tokenizer import template_texts, train_bpe
    spec = sw.SmartWatchSpec(name="train", seed=int(sc.data.seed), num_images=int(sc.data.num_train),
                             image_size=16, time_seconds=bool(sc.data.time_seconds))
    texts = list(sw.corpus_texts(spec, num_images=int(sc.tokenizer.corpus_images))) + template_texts()
    if reasoning_enabled(sc):  # the reasoning phrasings (with rationales, whatever the switch says)
        from uvjax.data import reasoning as rs
        texts += list(rs.corpus_texts(_reasoning_spec(sc, 16), num_scenes=min(500, int(sc.reasoning.num_scenes))))
    tok = train_bpe(texts, vocab_size=int(sc.tokenizer.vocab_size))
    tok.save(out)
    return {"vocab_size": tok.vocab_size, "template": template_name}


def build_vq(sc, out: str) -> dict:
    from uvjax.training.vq_train import images_for, train_vq
    vq_cfg = sc.vq.copy_and_resolve_references()
    with vq_cfg.unlocked():
        vq_cfg.data.image_size = int(sc.data.image_size)
    images = images_for(vq_cfg)
    _, metrics = train_vq(images, vq_cfg, out, progress=True)
    ev = metrics.get("eval", {})
    return {"psnr": ev.get("psnr"), "usage": ev.get("usage"), "train_time_s": metrics.get("train_time_s")}


from uvjax.inference.decode import VQCodec  # noqa: E402  (the one VQ codec: jitted, fixed-shape chunks)


def pretokenise_split(spec, codec: VQCodec, out_dir: str, *, chunk: int, batch: int, progress=None) -> dict:
    """Renders ``spec``'s records chunk by chunk, VQ-encodes every image once, writes per-stream shards,
    resumable by chunk: the one-tower case of ``stages_features.pretokenise_split_features``."""
    from uvjax.stages_features import _as_encoder, pretokenise_split_features
    enc = _as_encoder(codec)  # one encoder object for both roles: each image is encoded once
    return pretokenise_split_features(spec, {"user": enc, "assistant": enc}, out_dir, chunk=chunk, batch=batch,
                                      progress=progress)


def build_dataset(sc, vq_dir: str, out: str, progress_factory=None) -> dict:
    from uvjax.data import smartwatch as sw
    codec = VQCodec(vq_dir)
    d = sc.data
    splits = sw.default_splits(seed=int(d.seed), num_train=int(d.num_train), num_test=int(d.num_test),
                               image_size=int(d.image_size))
    splits["train"] = train_split_spec(sc)
    info = {"image_tokens": None}
    for name, spec in splits.items():
        if d.time_seconds:
            import dataclasses
            spec = dataclasses.replace(spec, time_seconds=True)
        os.makedirs(os.path.join(out, name), exist_ok=True)
        bar = progress_factory(f"pretokenise {name}", spec.num_images) if progress_factory else None
        info[name] = pretokenise_split(spec, codec, os.path.join(out, name), chunk=int(d.records_per_shard),
                                       batch=int(d.encode_batch), progress=(bar.update if bar else None))
        if bar:
            bar.close()
    h, w = codec.cfg.grid(int(d.image_size))
    info.update(image_tokens=int(h * w), codebook_size=int(codec.cfg.codebook_size),
                code_dim=int(codec.cfg.code_dim))
    return info


def build_reasoning(sc, vq_dir: str, out: str) -> dict:
    """Pre-tokenises the reasoning records (``stages.reasoning``) into ``train-interleaved-*`` shards, chunk
    by chunk (a finished chunk has a marker and is skipped when a killed build resumes)."""
    from uvjax.data import reasoning as rs
    from uvjax.data import storage
    from uvjax.data.records import Record, Segment
    from uvjax.integrity_files import read_marker, write_marker
    codec = VQCodec(vq_dir)
    spec = _reasoning_spec(sc)
    chunk, batch = int(sc.data.records_per_shard), int(sc.data.encode_batch)
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    n = 0
    from uvjax import interrupt
    for c in range((spec.num_scenes + chunk - 1) // chunk):
        interrupt.check()
        marker = os.path.join(out, "train", f".reasoning-chunk{c:05d}.done")
        done = read_marker(marker) if os.path.exists(marker) else None  # damaged: reported, chunk redone
        if done is not None:
            n += done["records"]
            continue
        recs = list(rs.generate(spec, c * chunk, (c + 1) * chunk))
        pix = {id(s.pixels): s.pixels for r in recs for s in r.images()}
        keys, codes = list(pix), {}
        for i in range(0, len(keys), batch):
            enc = np.asarray(codec.encode(np.stack([pix[k] for k in keys[i:i + batch]])))
            codes.update({k: e.reshape(-1).astype(np.int32) for k, e in zip(keys[i:i + batch], enc)})
        recs = [Record(r.id, r.task, [Segment(s.role, "image", codes=codes[id(s.pixels)]) if s.kind == "image"
                                      else s for s in r.segments], r.attributes) for r in recs]
        prefix = f"train-{rs.STREAM}-c{c:05d}"
        for p in os.listdir(os.path.join(out, "train")):  # leftovers of a killed attempt at this chunk
            if p.startswith(prefix):
                os.remove(os.path.join(out, "train", p))
        storage.write_records(recs, os.path.join(out, "train"), prefix, records_per_shard=10 ** 9)
        write_marker(marker, {"records": len(recs)})
        n += len(recs)
    return {"records": n, "rationale": spec.rationale, "tasks": list(spec.tasks)}


# ------------------------------------------------------------------------------------------ runner
def _bar(desc: str, total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


class SmartWatchSource:
    """The records uvjax renders itself (``stages.data``, and ``stages.reasoning`` when on): the first run's
    source. Its fingerprints are those of the original VQ-VQ chain, so existing caches stay valid."""

    kind = "smartwatch"

    def __init__(self, sc):
        self.sc = sc

    def tokenizer_fp(self, cfg, base_part) -> str:
        sc = self.sc
        return fingerprint("tokenizer", sc.tokenizer, data_fp_parts(sc, for_tokenizer=True), cfg.data.template,
                           base_part, *_reasoning_tokenizer_parts(sc))

    def build_tokenizer(self, cfg, out: str) -> dict:
        return build_tokenizer(self.sc, cfg.data.template, out)

    def vq_fp(self) -> str:
        return fingerprint("vq", self.sc.vq, int(self.sc.data.image_size))

    def dataset_fp(self, kinds, vq_fp, tower_fp, feature_dtype) -> str:
        if "features" not in kinds.values():
            return fingerprint("dataset", data_fp_parts(self.sc), vq_fp)
        return fingerprint("dataset-features", data_fp_parts(self.sc), dict(kinds), vq_fp, tower_fp,
                           dict(dtype=feature_dtype) if feature_dtype else None)

    def train_paths(self, ds_dir: str) -> dict[str, tuple]:
        return {s: (os.path.join(ds_dir, "train", f"train-{s}-*.array_record"),)
                for s in ("understanding", "generation")}

    def test_split(self, ds_dir: str) -> str:
        return os.path.join(ds_dir, "test")


def prepare(cfg, workdir: str, *, progress: bool = True) -> tuple[mlc.ConfigDict, dict]:
    """The one stage graph before the LM; returns the config pointed at its outputs and the stage paths.

        source   the Smart Watch renderer (+ reasoning generator), or imported data (import-train/-test)
        tokenizer  BPE trained on the source's texts, or the base model's
        towers   vq: given (stages.source.vq) or trained on the source's images; SigLIP/CLIP: given
                 (towers.siglip/clip.path) or, for the Smart Watch source, pretrained by uvjax (stages.siglip)
        dataset  pre-tokenised shards: user images through the understanding tower, assistant images
                 through the generation tower, each distinct image once (+ reasoning shards)
        lengths  (imported) how many records train.seq_len cuts, printed at every start
    """
    from uvjax import stages_imported as si
    from uvjax.stages_features import build_feature_dataset, build_siglip, features_config
    from uvjax.weights.pretrained import pretrained_spec, save_base_tokenizer
    check_no_user_streams(cfg)
    sc = cfg.stages
    cache = stage_cache_dir(sc, workdir)
    log = StageLog(workdir)
    say = (lambda m: print(f"[stage] {m}", flush=True)) if progress else None
    im = cfg.model.image
    kinds = {"user": str(im.input_kind), "assistant": str(im.output_kind)}
    uses_codes, uses_features = "codes" in kinds.values(), "features" in kinds.values()
    size = int(sc.data.image_size)
    src_cfg = sc.get("source") or si.source_config()
    towers_vq = ((cfg.get("towers") or {}).get("vq") or {}).get("path", "")  # clipvq's name for it
    given_vq_path = str(src_cfg.get("vq", "") or towers_vq or "")
    tower_name, tower = si.given_tower(cfg) if uses_features else (None, None)

    # checks before any work
    imported = si.is_imported(sc)
    if reasoning_enabled(sc) and (imported or kinds != {"user": "codes", "assistant": "codes"}):
        raise ValueError("stages.reasoning.num_scenes > 0 is supported for VQ-VQ on the Smart Watch source only "
                         "(the reasoning records are pre-tokenised with the VQ tokenizer)")
    if uses_features and tower is None and (imported or "siglip" not in sc):
        raise ValueError("this architecture reads or writes SigLIP/CLIP features" + (
            ", and imported images need a pretrained tower" if imported else "") + ": set "
            "--config.towers.siglip.path= (or towers.clip.path=) to an HF SiglipVisionModel/CLIPVisionModel "
            "directory or a uvjax tower file (siglip.safetensors)" + (
            "" if imported else ", or config.stages.siglip to pretrain one (configs/siglip_pretrain.py)"))
    if uses_codes and not given_vq_path and (int(im.num_codes) != int(sc.vq.model.codebook_size)
                                             or int(im.code_dim) != int(sc.vq.model.code_dim)):
        raise ValueError(f"model.image.num_codes/code_dim ({im.num_codes}/{im.code_dim}) must match the VQ tokenizer "
                         f"the stages train ({sc.vq.model.codebook_size}/{sc.vq.model.code_dim}): set "
                         "stages.vq.model.codebook_size/code_dim or the model's, or stages.source.vq to a converted "
                         "VQ tokenizer (e.g. LlamaGen VQ-16 for 16384 codes)")

    # 1. source
    source = si.ImportedSource(sc, cache, log, say) if imported else SmartWatchSource(sc)

    # 2. text tokenizer
    base = pretrained_spec(cfg)
    tok_fp = source.tokenizer_fp(cfg, _jsonable(cfg.model.get("pretrained")) if base else None)

    def build_tok(out: str) -> dict:
        if base:
            return save_base_tokenizer(cfg, out)
        if not imported:
            return source.build_tokenizer(cfg, out)
        from uvjax.data.tokenizer import template_texts, train_bpe
        tok = train_bpe(source.texts() + template_texts(), vocab_size=int(sc.tokenizer.vocab_size))
        tok.save(out)
        return {"vocab_size": tok.vocab_size, "template": str(cfg.data.template)}

    if str(cfg.data.get("tokenizer", "") or ""):  # the user's tokenizer directory, used as given
        from uvjax.data.tokenizer import TextTokenizer
        from uvjax import storage_paths as sp
        tok_dir = sp.local_tree(str(cfg.data.tokenizer), sp.remote_cache_dir("trees"))  # gs://: a local mirror
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            raise FileNotFoundError(f"data.tokenizer={cfg.data.tokenizer!r}: no tokenizer.json there")
        tok_info = {"vocab_size": TextTokenizer.load(tok_dir).vocab_size}
        log.write(stage="tokenizer", fingerprint=fingerprint("tokenizer-given", tok_dir), reused=True, seconds=0.0,
                  path=tok_dir)
        tok_stage = None  # the user's: not a stage
    else:  # an imported source's BPE reads the import-train stage's texts
        tok_dir, tok_info = cached_stage("tokenizer", tok_fp, cache, build_tok, log, say,
                                         inputs=source.stage_dirs("train") if imported and not base else None)
        tok_stage = tok_dir

    # 3. towers
    vq_dir = vq_fp = None
    vq_info: dict = {}
    if uses_codes and given_vq_path:
        vq_dir, vq_fp = si.given_vq(given_vq_path, log)
    elif uses_codes:
        vq_fp = source.vq_fp()

        def build_vq_stage(out: str) -> dict:
            if not imported:
                return build_vq(sc, out)
            from uvjax.training.vq_train import train_vq
            vq_cfg = sc.vq.copy_and_resolve_references()
            with vq_cfg.unlocked():
                vq_cfg.data.image_size = size
            images, vq_cfg = source.vq_images(vq_cfg)
            _, metrics = train_vq(images, vq_cfg, out, progress=progress)
            ev = metrics.get("eval", {})
            return {"psnr": ev.get("psnr"), "usage": ev.get("usage"), "images": int(len(images)),
                    "train_time_s": metrics.get("train_time_s")}

        vq_dir, vq_info = cached_stage("vq", vq_fp, cache, build_vq_stage, log, say,
                                       inputs=source.stage_dirs("train") if imported else None)
    tower_dir = tower_fp = None
    tower_info: dict = {}
    if uses_features and tower is not None:
        tower_dir = os.path.abspath(os.path.expanduser(str(tower.path)))
        tower_fp = fingerprint("tower", si.given_tower_fp(tower_name, tower))
        log.write(stage="siglip", fingerprint=tower_fp, reused=True, seconds=0.0, path=tower_dir, tower=tower_name)
    elif uses_features:
        tower_name, tower_fp = "siglip", fingerprint("siglip", sc.siglip, size)
        tower_dir, tower_info = cached_stage("siglip", tower_fp, cache, lambda out: build_siglip(sc, out), log, say)

    # 4. pre-tokenised dataset
    feats_cfg = sc.get("features") or features_config()
    feature_dtype = str(feats_cfg.get("dtype", "float16")) if uses_features else None
    ds_fp = source.dataset_fp(kinds, vq_fp, tower_fp, feature_dtype)

    def encoders() -> dict:
        from uvjax import pretokenise as pt
        made = {}
        if uses_codes:
            made["codes"] = pt.vq_encoder(vq_dir, size, str(src_cfg.get("resize", "")) if imported else "")
        if uses_features:
            made["features"] = pt.tower_encoder(
                tower_dir, kind=tower_name, resize=str(src_cfg.get("resize", "")) if imported else "",
                **({} if tower is None else dict(select_layer=int(tower.get("select_layer", -2)),
                                                 feature_post_norm=bool(tower.get("feature_post_norm", False)))))
        return {role: made[k] for role, k in kinds.items()}

    def build_ds(out: str) -> dict:
        if not imported and not uses_features:
            return build_dataset(sc, vq_dir, out, _bar if progress else None)
        enc = encoders()
        if imported:
            info = source.pretokenise(enc, out, feature_dtype or "float16", _bar if progress else None)
        else:
            sc_run = sc.copy_and_resolve_references()
            with sc_run.unlocked():
                sc_run.features = feats_cfg
            info = build_feature_dataset(sc_run, kinds, enc, out, _bar if progress else None)
        tokens = {}
        for role, e in enc.items():
            if e.kind == "codes":
                h, w = e.tower.cfg.grid(e.image_size)
                tokens[role] = int(h * w)
                info.update(codebook_size=int(e.tower.cfg.codebook_size), code_dim=int(e.tower.cfg.code_dim))
            else:
                tokens[role] = int(e.tower.cfg.feature_tokens)
                info["feature_dim"] = int(e.tower.cfg.width)
        info["image_tokens_by_role"] = tokens
        return info

    # the input stages the dataset is made from (a VQ file or tower the user gave is not a stage: left out,
    # its fingerprint holds its size and mtime)
    ds_inputs = {"vq": vq_dir if uses_codes and not given_vq_path else None,
                 "siglip": tower_dir if uses_features and tower is None else None,
                 **(source.stage_dirs("train", "test") if imported else {})}
    ds_dir, ds_info = cached_stage("dataset", ds_fp, cache, build_ds, log, say, inputs=ds_inputs)
    if say and imported:
        from uvjax import pretokenise as pt
        for split in ("train", "test"):
            if split in ds_info:
                say(pt.format_report(ds_info[split]))
    rs_dir = None
    if reasoning_enabled(sc):
        rs_fp = fingerprint("reasoning", sc.reasoning, int(sc.data.seed), size, vq_fp)
        rs_dir, _ = cached_stage("reasoning", rs_fp, cache, lambda out: build_reasoning(sc, vq_dir, out), log, say,
                                 inputs={"vq": None if given_vq_path else vq_dir})

    # 5. the config, pointed at the stages' outputs
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.tokenizer = tok_dir
        for stream, paths in source.train_paths(ds_dir).items():
            cfg.data.streams[stream].paths = paths
            if not paths:
                cfg.data.streams[stream].weight = 0.0
            elif imported and float(cfg.data.streams[stream].weight) <= 0 and say:
                n = (ds_info.get("train") or {}).get("records_written", {}).get(stream, "?")
                say(f"WARNING: {n} imported {stream} records are not trained on: data.streams.{stream}.weight is "
                    f"{cfg.data.streams[stream].weight} (set --config.data.streams.{stream}.weight=1 to use them)")
        if rs_dir is not None:
            cfg.data.streams.interleaved.paths = (os.path.join(rs_dir, "train", "train-interleaved-*.array_record"),)
        if not any(cfg.data.streams[s].paths for s in cfg.data.streams):
            raise ValueError(f"no pre-tokenised training records in {ds_dir}/train; see the skip report above")
        if "image_tokens_by_role" in ds_info:
            n = set(ds_info["image_tokens_by_role"].values())
            cfg.data.image_tokens = n.pop() if len(n) == 1 else 0  # mixed counts (e.g. 576 CLIP vs 256 VQ)
        else:
            cfg.data.image_tokens = int(ds_info["image_tokens"])
        if uses_features and int(im.feature_dim) != int(ds_info["feature_dim"]):
            raise ValueError(f"model.image.feature_dim={im.feature_dim} must equal the {tower_name} tower's width "
                             f"{ds_info['feature_dim']} ({tower_dir}; stages.siglip.vit.width when uvjax pretrains it)")
        if uses_codes:
            if im.num_codes != ds_info["codebook_size"] or im.code_dim != ds_info["code_dim"]:
                raise ValueError(f"model.image.num_codes/code_dim ({im.num_codes}/{im.code_dim}) must match the VQ "
                                 f"tokenizer ({ds_info['codebook_size']}/{ds_info['code_dim']}) in {vq_dir}")
            cfg.model.image.codebook_from = vq_dir  # fresh runs start their code vectors from the VQ's
        if cfg.model.vocab_size < tok_info["vocab_size"]:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < tokenizer vocab {tok_info['vocab_size']}")
    paths = {"tokenizer": tok_dir, "vq": vq_dir, "dataset": ds_dir, "vq_metrics": vq_info,
             "test_split": source.test_split(ds_dir), "reasoning": rs_dir}
    if uses_features:
        paths.update(siglip=tower_dir, siglip_metrics=tower_info)
    if imported:
        paths.update(import_train=source.train_dir, import_test=source.test_dir)
        lengths = si.length_report(cfg, ds_dir, tok_dir, cache, log, inputs={"dataset": ds_dir, "tokenizer": tok_stage})
        paths["lengths"] = lengths
        if say:
            say(si.format_length_report(lengths, int(cfg.train.seq_len)))
    return cfg, paths


def _reasoning_tokenizer_parts(sc) -> tuple:
    """Extra tokenizer fingerprint parts when reasoning records are on (none otherwise, so the other
    configs keep their fingerprints); the rationale switch does not change the corpus."""
    if not reasoning_enabled(sc):
        return ()
    return (["reasoning", int(sc.reasoning.num_scenes), list(sc.reasoning.tasks)],)
