"""Integrity of the files a run keeps besides its checkpoints: stage caches, JSON markers, JSON-lines logs.

What a bad disk, a bad copy or a killed writer does to a file (truncated, one bit flipped, deleted) must be
detected, never used silently (issue #33; the table is in docs/RELIABILITY.md):

* **Stage manifests.** A finished stage (``uvjax.stages.cached_stage``) records in its ``DONE.json`` every
  file of the stage (relative path, size, sha256; ``DONE.json`` itself excluded) under ``manifest``, and a
  ``digest`` of ``DONE.json``'s own content. Reusing the stage verifies it (:func:`verify_stage`): every
  listed file is there with its size and sha256, no unlisted file was added (a shard glob would pick it up),
  ``DONE.json`` parses and matches its digest. A mismatch raises :class:`StageCacheDamaged` naming the
  directory, the file, expected vs found, and what to do.
  ArrayRecord shards of a large stage (more than ``$UVJAX_STAGE_HASH_LIMIT_MB``, default 1024 MB of
  shards) have their sizes checked but are not hashed at every start: riegeli stores a 64-bit hash of every
  chunk header and every chunk's data (the records, the index and the footer are chunks), and
  ``uvjax.data.storage.RecordReader`` / the training pipeline name the shard and record when a read fails
  (a bit flipped anywhere in a shard's data is detected at read; measured in tests/test_fault_drill_files.py).
  ``python -m uvjax.integrity_files DIR`` hashes everything, whatever the size.
* **Content digest.** :func:`content_digest` hashes the manifest minus the files whose bytes legitimately
  differ between two builds of the same fingerprint (timings in reports and chunk markers:
  :data:`VOLATILE`), so "bit-identical rebuild" is decidable.
* **Inputs.** Fingerprints hash configs, not the bytes of the stages a stage is built from, so a stage
  built from other stages records their content digests (:func:`stage_content`) in its ``DONE.json`` under
  ``inputs``; reuse compares them with the inputs now in use (``uvjax.stages._check_inputs``).
* **JSON files** read back from a work dir or a cache go through :func:`read_json`: a parse error names the
  file. Chunk markers (resume points inside a ``.partial`` build) carry a digest (:func:`write_marker`);
  a damaged one is reported and its chunk redone (:func:`read_marker` returns None).
* **JSON lines** (``metrics.jsonl``, ``stages.jsonl``) carry a CRC-32 per line (:func:`seal_line`); a line
  that does not parse or whose CRC differs is skipped, counted and reported with the file and line number
  (:func:`parse_lines`). A killed writer leaves exactly such a last line.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import sys
import zlib
from typing import Any

from uvjax import storage_paths as sp
from uvjax.storage_paths import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
DONE_FILE = "DONE.json"
IGNORED = (".DS_Store",)  # unlisted files a file browser drops into a directory; never read by uvjax
# files whose bytes differ between two builds of one fingerprint (wall-clock timings, creation times); still
# verified for integrity, left out of the content digest
VOLATILE = ("*_metrics.json", "report-*.json", ".*-chunk*.done", "import_manifest.json")
SHARD_SUFFIX = ".array_record"
_CHUNK = 1 << 20


class StageCacheDamaged(ValueError):
    """A finished stage cache whose files differ from what its ``DONE.json`` recorded (or whose ``DONE.json``
    is unreadable). ``problems`` lists (relative path, what was expected, what was found)."""

    def __init__(self, message: str, directory: str = "", problems: list | None = None):
        super().__init__(message)
        self.directory = directory
        self.problems = list(problems or [])


class DamagedFile(ValueError):
    """A JSON file (marker, report, manifest) that does not parse or does not match its digest."""


# ------------------------------------------------------------------------------------------------ hashing
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def _files(root: str) -> list[str]:
    """Relative '/'-separated paths of the regular files under ``root`` (sorted)."""
    out = []
    for d, dirs, names in os.walk(root):
        dirs.sort()
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def build_manifest(root: str, exclude: tuple[str, ...] = (DONE_FILE,)) -> dict:
    """``{"version": 1, "files": {relpath: {"size": n, "sha256": hex}}}`` of every file under ``root``."""
    files = {}
    for rel in _files(root):
        if rel in exclude:
            continue
        p = os.path.join(root, *rel.split("/"))
        files[rel] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
    return {"version": MANIFEST_VERSION, "files": files}


def is_volatile(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, pat) for pat in VOLATILE)


def content_digest(manifest: dict) -> str:
    """sha256 of the manifest's non-volatile files (path, size, sha256): equal for bit-identical builds."""
    files = {k: [v["size"], v["sha256"]] for k, v in sorted(manifest["files"].items()) if not is_volatile(k)}
    return hashlib.sha256(_canonical(files)).hexdigest()


def seal(info: dict) -> dict:
    """``info`` with ``digest``: sha256 of its canonical JSON (every key but ``digest``)."""
    body = {k: v for k, v in info.items() if k != "digest"}
    return {**body, "digest": hashlib.sha256(_canonical(body)).hexdigest()}


def unsealed(info: dict) -> dict:
    """A stage's info as callers see it: without the integrity keys."""
    return {k: v for k, v in info.items() if k not in ("manifest", "digest", "content", "inputs")}


def stage_content(directory: str) -> str | None:
    """The content digest of the finished stage in ``directory`` (its ``DONE.json``, digest checked), or None
    for a stage finished before manifests, or a directory that is not a stage (no ``DONE.json``)."""
    if not os.path.exists(os.path.join(directory, DONE_FILE)):
        return None
    info = load_done(directory)
    if "manifest" not in info:
        return None
    return info.get("content") or content_digest(info["manifest"])


# ------------------------------------------------------------------------------------------------ JSON
def parse_json(text: str, path: str, what: str = "JSON file", todo: str = "") -> Any:
    """``json.loads`` whose errors name the file, say what it is and (``todo``) what to do."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise DamagedFile(f"{path}: damaged {what}: not valid JSON ({e}; {len(text)} characters)"
                          + (f". {todo}" if todo else "")) from e


def read_json(path: str, what: str = "JSON file", todo: str = "") -> Any:
    """``json.load`` whose errors name the file (and say what it is, and ``todo``: what to do)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DamagedFile(f"{path}: damaged {what}: not UTF-8 text ({e})" + (f". {todo}" if todo else "")) from e
    return parse_json(text, path, what, todo)


def write_marker(path: str, obj: dict) -> None:
    """A chunk marker: ``obj`` sealed with a digest, written atomically (temp + rename)."""
    atomic_write_text(path, json.dumps(seal(obj)))


def read_marker(path: str, say=None) -> dict | None:
    """A marker written by :func:`write_marker` (or an older unsealed one), or None when it is damaged (does
    not parse, or its digest differs): the caller redoes that chunk. The damage is reported."""
    try:
        obj = read_json(path, "chunk marker")
        if not isinstance(obj, dict):
            raise DamagedFile(f"{path}: damaged chunk marker: a JSON object expected, got {type(obj).__name__}")
        if "digest" in obj and seal(obj)["digest"] != obj["digest"]:
            raise DamagedFile(f"{path}: damaged chunk marker: content does not match its digest")
    except DamagedFile as e:
        msg = f"{e}; the chunk is redone"
        (say or log.warning)(msg)
        return None
    return {k: v for k, v in obj.items() if k != "digest"}


# ------------------------------------------------------------------------------------------------ JSON lines
_CRC = re.compile(r', "crc32": "([0-9a-f]{8})"\}$')


def seal_line(obj: dict) -> str:
    """One JSON line (with its newline) ending in a CRC-32 of the rest: ``{..., "crc32": "1a2b3c4d"}``."""
    body = json.dumps(obj)
    if not body.startswith("{") or body == "{}":
        raise ValueError("seal_line needs a non-empty JSON object")
    return f'{body[:-1]}, "crc32": "{zlib.crc32(body.encode()):08x}"}}\n'


def parse_lines(text: str, path: str, what: str = "record") -> tuple[list[dict], list[str]]:
    """(records, problems) of a JSON-lines file written with :func:`seal_line`. A line that does not parse,
    is not an object, or whose CRC differs is left out and described in ``problems`` (file and line number).
    Lines before the first line with a CRC were written before CRCs existed (a run started with an older
    uvjax and resumed with this one) and are read as they are; after it, a line without a CRC is damaged."""
    lines = text.splitlines()
    first = next((n for n, ln in enumerate(lines, 1) if _CRC.search(ln.rstrip())), len(lines) + 1)
    out, problems = [], []
    for n, ln in enumerate(lines, 1):
        ln = ln.rstrip()
        if not ln.strip():
            continue
        if n >= first:  # lines before the first sealed one were written before CRCs (an upgraded run)
            m = _CRC.search(ln)
            body = ln[:m.start()] + "}" if m else None
            if m is None or zlib.crc32(body.encode()) != int(m.group(1), 16):
                problems.append(f"{path}:{n}: damaged {what} (checksum {'missing' if m is None else 'mismatch'}): "
                                f"{ln[:120]!r}")
                continue
        else:
            body = ln
        try:
            rec = json.loads(body)
        except ValueError as e:
            problems.append(f"{path}:{n}: damaged {what} (not valid JSON: {e}): {ln[:120]!r}")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{path}:{n}: damaged {what} (a JSON object expected): {ln[:120]!r}")
            continue
        out.append(rec)
    return out, problems


# ------------------------------------------------------------------------------------------------ stages
def hash_limit_bytes() -> int:
    """Above this many bytes of ArrayRecord shards a stage's shards are size-checked, not hashed, at reuse."""
    return int(float(os.environ.get("UVJAX_STAGE_HASH_LIMIT_MB", "1024")) * (1 << 20))


def _what_to_do(directory: str) -> str:
    return (f"Move the directory aside (mv {directory} {directory}.damaged): the next run rebuilds the stage "
            f"and accepts the rebuild only if it is bit-identical to the record in {directory}.damaged/{DONE_FILE} "
            "(a run that already trained on the original stage must not continue on different data). "
            "Stages built from this one may be damaged too: `python -m uvjax.integrity_files DIR` checks one")


def load_done(directory: str) -> dict:
    """``DONE.json`` of a finished stage, checked against its digest (when it has one)."""
    path = os.path.join(directory, DONE_FILE)
    try:
        info = read_json(path, "stage completion record")
        if not isinstance(info, dict):
            raise DamagedFile(f"{path}: damaged stage completion record: a JSON object expected")
        if "digest" in info and seal(info)["digest"] != info["digest"]:
            raise DamagedFile(f"{path}: damaged stage completion record: its content does not match its digest")
        if "manifest" in info and not isinstance((info["manifest"] or {}).get("files"), dict):
            raise DamagedFile(f"{path}: damaged stage completion record: no file list in its manifest")
    except DamagedFile as e:
        raise StageCacheDamaged(f"stage cache {directory} is damaged: {e}. {_what_to_do(directory)}",
                                directory, [(DONE_FILE, "a sealed completion record", str(e))]) from e
    return info


def verify_stage(directory: str, info: dict, *, full: bool = False) -> dict:
    """Checks a finished stage against the manifest in its ``DONE.json`` (``info``); raises
    :class:`StageCacheDamaged` on any difference. ArrayRecord shards are hashed when ``full`` or when their
    total size is under :func:`hash_limit_bytes`. Returns ``{"files", "bytes", "hashed_bytes", "shards_hashed"}``."""
    files = info["manifest"]["files"]
    shard_bytes = sum(int(v["size"]) for k, v in files.items() if k.endswith(SHARD_SUFFIX))
    hash_shards = full or shard_bytes <= hash_limit_bytes()
    problems = []
    hashed = total = 0
    for rel, want in sorted(files.items()):
        p = os.path.join(directory, *rel.split("/"))
        if not os.path.isfile(p):
            problems.append((rel, f"{want['size']} bytes", "missing"))
            continue
        size = os.path.getsize(p)
        total += size
        if size != int(want["size"]):
            problems.append((rel, f"{want['size']} bytes", f"{size} bytes"))
            continue
        if hash_shards or not rel.endswith(SHARD_SUFFIX):
            got = sha256_file(p)
            hashed += size
            if got != want["sha256"]:
                problems.append((rel, f"sha256 {want['sha256'][:16]}...", f"sha256 {got[:16]}..."))
    for rel in _files(directory):
        if rel != DONE_FILE and rel not in files and rel.rsplit("/", 1)[-1] not in IGNORED:
            problems.append((rel, "no such file (not written by the stage)", "an extra file"))
    if problems:
        lines = "\n".join(f"  {rel}: expected {exp}, found {got}" for rel, exp, got in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise StageCacheDamaged(
            f"stage cache {directory} is damaged: {len(problems)} file(s) differ from its {DONE_FILE} "
            f"manifest:\n{lines}{more}\n{_what_to_do(directory)}", directory, problems)
    return {"files": len(files), "bytes": total, "hashed_bytes": hashed, "shards_hashed": hash_shards}


def main(argv: list[str]) -> int:
    """``python -m uvjax.integrity_files DIR...``: verifies finished stage caches in full (shards hashed)."""
    rc = 0
    for d in argv or ["."]:
        try:
            info = load_done(d)
            if "manifest" not in info:
                print(f"{d}: finished before stage manifests existed: nothing to verify against")
                continue
            r = verify_stage(d, info, full=True)
            print(f"{d}: OK ({r['files']} files, {r['bytes'] / 1e6:.1f} MB hashed)")
        except (StageCacheDamaged, FileNotFoundError) as e:
            print(f"{d}: {e}")
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ------------------------------------------------------------------------------------------------ run inputs
def input_digests(paths: dict[str, str]) -> dict[str, dict]:
    """``{name: {"path", "sha256"}}`` of the files a trained LM is bound to (its tokenizer, its VQ): recorded in
    every checkpoint's metadata, so a resume or an evaluation that would read other files is refused. A file
    that does not exist has ``sha256: None``."""
    out = {}
    for name, p in paths.items():
        if not p or not sp.exists(p):
            out[name] = {"path": p, "sha256": None}
        elif sp.is_remote(p):
            out[name] = {"path": p, "sha256": hashlib.sha256(sp.as_path(p).read_bytes()).hexdigest()}
        else:
            out[name] = {"path": p, "sha256": sha256_file(p)}
    return out


def changed_inputs(recorded: dict, current: dict) -> list[str]:
    """What differs between two :func:`input_digests` (by content; a file recorded but not needed now is fine)."""
    out = []
    for name, rec in (recorded or {}).items():
        now = (current or {}).get(name)
        if now is None or rec.get("sha256") == now.get("sha256"):
            continue
        found = "missing" if now.get("sha256") is None else f"sha256 {now['sha256'][:16]}…"
        want = "absent" if rec.get("sha256") is None else f"sha256 {rec['sha256'][:16]}…"
        out.append(f"{name} {now.get('path')}: the run was trained with {want}, found {found}")
    return out
