"""The import manifest ``{out_dir}/import_manifest.json`` (:data:`MANIFEST_NAME`), written beside the
shards by ``convert.convert``: ``{"format", "sources": [absolute input files], "image_dir": absolute real
path of the image folder ("" if none), "counts": ImportStats.as_dict(), "paths": {stream: [absolute
shard paths]}, "created": ISO time}``. Images stay paths relative to ``image_dir``, so later stages
take the folder from the manifest (:func:`read_manifest`) and work from any current directory."""
from __future__ import annotations

import datetime
import glob
import json
import logging
import os
from typing import Any, Sequence

log = logging.getLogger(__name__)

MANIFEST_NAME = "import_manifest.json"
MANIFEST_KEYS = ("format", "sources", "image_dir", "counts", "paths", "created")


def load_manifest(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the import manifest ({e})") from e
    if not isinstance(m, dict) or set(m) != set(MANIFEST_KEYS) or not isinstance(m["image_dir"], str) \
            or not isinstance(m["paths"], dict) or not isinstance(m["sources"], list):
        got = sorted(m) if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"{path}: not an import manifest; expected a JSON object with keys "
                         f"{list(MANIFEST_KEYS)} (image_dir a string), got {got}")
    return m


def read_manifest(shard_dir_or_glob: str | os.PathLike | Sequence[str]) -> dict[str, Any]:
    """The import manifest (module docstring) of a shard directory: ``shard_dir_or_glob`` is
    the directory, a shard path or glob whose directory holds :data:`MANIFEST_NAME`, the manifest
    file itself, or a list of those (all in one directory). Raises FileNotFoundError naming where it
    looked when there is none, ValueError when the shards span several directories' manifests or the
    file is not a manifest."""
    items = [shard_dir_or_glob] if isinstance(shard_dir_or_glob, (str, os.PathLike)) \
        else list(shard_dir_or_glob)
    looked: list[str] = []
    for it in map(os.fspath, items):
        if os.path.isdir(it):
            dirs = [it]
        elif os.path.basename(it) == MANIFEST_NAME:
            dirs = [os.path.dirname(it) or "."]
        elif any(ch in it for ch in "*?["):
            dirs = sorted({os.path.dirname(p) or "." for p in glob.glob(it)})
            if not dirs and not any(ch in os.path.dirname(it) for ch in "*?["):
                dirs = [os.path.dirname(it) or "."]
        else:
            dirs = [os.path.dirname(it) or "."]
        looked.extend(os.path.abspath(os.path.join(d, MANIFEST_NAME)) for d in dirs)
    looked = list(dict.fromkeys(looked))
    found = [p for p in looked if os.path.isfile(p)]
    if not found:
        where = ", ".join(looked) if looked else \
            "nowhere (no path matches it, so no directory to look in)"
        raise FileNotFoundError(f"no import manifest for shards {shard_dir_or_glob!r}: looked for "
                                f"{where}. It is written beside the shards by `python -m "
                                "uvjax.data.formats convert`; re-run the import to create it")
    if len({os.path.realpath(p) for p in found}) > 1:
        raise ValueError(f"shards {shard_dir_or_glob!r} span several import manifests {found}; "
                         "read each directory's manifest separately")
    return load_manifest(found[0])


def check_out_dir_manifest(out_dir: str, image_dir: str, prefix: str) -> None:
    """A shard directory has one manifest: refuse to import into a directory whose earlier import
    (other shards, still present) used another image folder, which the manifest could not name."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return
    try:
        old = load_manifest(path)
    except ValueError as e:
        log.warning("replacing an unreadable manifest: %s", e)
        return
    others = [p for ps in old["paths"].values() if isinstance(ps, list) for p in ps
              if isinstance(p, str) and os.path.isfile(p)
              and not os.path.basename(p).startswith(f"{prefix}-")]
    if not others:
        return
    if old["image_dir"] != image_dir:
        raise ValueError(f"{out_dir} already holds shards of another import ({len(others)} shard(s), "
                         f"e.g. {others[0]}) whose images are relative to {old['image_dir']!r}, but "
                         f"this import's images are relative to {image_dir!r}; the directory's one "
                         f"{MANIFEST_NAME} cannot name both: use a separate out_dir")
    log.warning("%s: replacing the manifest of an earlier import (%d other shard(s), same image "
                "folder); it will describe this import only", path, len(others))


def write_manifest(out_dir: str, *, format: str, sources: Sequence[str], image_dir: str,
                   counts: dict[str, Any], paths: dict[str, list[str]]) -> str:
    """Writes ``{out_dir}/import_manifest.json`` (atomically) and returns its path."""
    manifest = {
        "format": format,
        "sources": [os.path.abspath(p) for p in sources],
        "image_dir": (image_dir.rstrip("/") if "://" in image_dir else os.path.realpath(image_dir)) if image_dir else "",
        "counts": counts,
        "paths": {s: [os.path.abspath(p) for p in ps] for s, ps in paths.items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path
