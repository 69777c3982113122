"""Local paths and object-store URLs (``gs://``) behind one small API over ``etils.epath``.

Every file that train / evaluate / generate / pre-tokenise / export reads or writes is meant to go
through here (or through ``epath.Path`` directly, which is what orbax uses), so that a work directory,
a stage cache, ArrayRecord shards, an image root or TensorBoard/metrics can live on ``gs://``.

* ``as_path(p)``: an ``epath.Path`` for a local path or a URL. Without TensorFlow, epath serves ``gs://``
  through fsspec + gcsfs (``gcsfs`` must be installed); with TensorFlow it uses ``tf.io.gfile``.
* ``is_remote(p)`` / ``resolve(p)``: URL or not; an absolute local path, a URL unchanged.
* ``local_copy(p, cache_dir)``: what C++ readers that only know POSIX files need (``array_record`` in
  the pip wheel opens files with ``open()``: a ``gs://`` writer fails, a ``gs://`` reader *hangs*). The
  object is downloaded once into ``cache_dir``, under a name keyed by (URL, size, generation), atomically
  (temp file + rename), so a changed object is fetched again and readers never see half a file.
* ``local_tree(url, cache_dir, key=None)``: a local mirror of a remote directory tree (a tokenizer directory,
  a finished stage), downloaded once into ``cache_dir/<key>-<name>`` (temp directory + rename); the key is
  sha256(URL, listing of (name, size, generation)) unless given (a stage fingerprint: immutable content).
* ``cache_root()``: where those local copies live: ``$UVJAX_CACHE``, else ``~/.cache/uvjax``.
* ``upload(local, remote)``: a file or a directory tree to a URL (or a local path, atomically).
* ``atomic_write_bytes/text/json(p, ...)``: temp + ``os.replace`` locally; one object put on a store
  (a GCS object appears whole when its upload is finalised, never half-written).
* ``append_text(p, text)``: ``open("a")`` locally; on ``gs://`` a generation-guarded read-modify-write
  (``epath``/gcsfs ``open("a")`` on gs:// silently *overwrites*: metrics.jsonl and logs must use this).
* ``ObjectStoreLock``: the work-directory lock on ``gs://``, where ``fcntl`` does not exist. It is a
  lease held in one object, taken and renewed with GCS generation preconditions (compare-and-swap):
  ``ifGenerationMatch=0`` creates it only if absent, ``ifGenerationMatch=<g>`` replaces exactly the
  version read, so of two concurrent writers exactly one wins. A heartbeat thread renews the lease;
  a holder whose heartbeat is older than ``ttl_s`` (killed, machine lost) is taken over, as is a holder on
  this host whose pid is dead. ``lock_for_workdir(workdir)`` picks it for URLs and
  ``uvjax.locks.WorkdirLock`` for local paths.

Emulator / test settings (see tests/test_remote_storage.py, which runs fake-gcs-server on 127.0.0.1):
``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` (gcsfs, google-cloud-storage, orbax's bucket look-ups),
``TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT`` (tensorstore, i.e. orbax's array data; read once per
process), ``GOOGLE_AUTH_TOKEN_FOR_TESTING=x`` (tensorstore: a fixed token instead of probing the GCE
metadata server), ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` before gcsfs is imported (otherwise gcsfs
2026.x asks a gRPC storage-control endpoint for the bucket type and waits 60 s per call on an emulator),
``NO_GCE_CHECK=true`` and fsspec's ``gcs`` ``token="anon"`` (in a subprocess: ``FSSPEC_GCS_TOKEN=anon``, which fsspec
reads at import; without it gcsfs tries the default credentials, the metadata server, then anonymous access).

gcsfs caches directory listings per process; with several writers (hosts, the lock's storage client, orbax's
tensorstore) a cached listing hides objects written since, so importing this module turns that cache off for
``gs``/``gcs`` unless fsspec's configuration sets ``use_listings_cache`` itself.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable

from etils import epath

log = logging.getLogger(__name__)

def _umask_mode() -> int:
    m = os.umask(0)
    os.umask(m)
    return 0o666 & ~m


_FILE_MODE = _umask_mode()
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_COPY_CHUNK = 8 << 20


def _no_stale_listings() -> None:
    """gcsfs without its listings cache (see the module docstring); fsspec's own config wins."""
    try:
        import fsspec.config  # noqa: PLC0415
    except ImportError:
        return
    for proto in ("gcs", "gs"):
        if "use_listings_cache" in fsspec.config.conf.get(proto, {}):
            return
    fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


_no_stale_listings()


def cache_root() -> str:
    """The local cache of remote files (shards, tokenizer directories, stage mirrors): ``$UVJAX_CACHE``,
    else ``~/.cache/uvjax``."""
    return resolve(os.environ.get("UVJAX_CACHE") or "~/.cache/uvjax")


def remote_cache_dir(kind: str = "remote") -> str:
    """``cache_root()/<kind>``: ``remote`` for single files, ``trees`` for directories, ``stages`` for stage
    mirrors."""
    return os.path.join(cache_root(), kind)


def makedirs(path: str | os.PathLike) -> None:
    """``os.makedirs(exist_ok=True)`` for a local path; nothing on an object store (no directories there)."""
    if not is_remote(path):
        os.makedirs(resolve(path), exist_ok=True)


def exists(path: str | os.PathLike) -> bool:
    return as_path(path).exists() if is_remote(path) else os.path.exists(resolve(path))


def isdir(path: str | os.PathLike) -> bool:
    return as_path(path).is_dir() if is_remote(path) else os.path.isdir(resolve(path))


def listdir(path: str | os.PathLike) -> list[str]:
    """Names in a directory (``os.listdir``), or directly under a prefix of an object store."""
    if not is_remote(path):
        return os.listdir(resolve(path))
    return [p.name for p in as_path(path).iterdir()]


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    if not is_remote(path):
        with open(resolve(path), encoding=encoding) as f:
            return f.read()
    return as_path(path).read_text(encoding=encoding)


def join(base: str | os.PathLike, *parts: str) -> str:
    """``os.path.join`` for local paths; '/'-joined for URLs."""
    if not is_remote(base):
        return os.path.join(os.fspath(base), *parts)
    return "/".join([str(base).rstrip("/"), *[str(p).strip("/") for p in parts]])


def parent(path: str | os.PathLike) -> str:
    """The directory above ``path``: ``gs://b/x/run`` → ``gs://b/x``; a bucket's root stays itself."""
    if not is_remote(path):
        return os.path.dirname(resolve(path))
    url = resolve(path)
    scheme, rest = url.split("://", 1)
    head = rest.rsplit("/", 1)[0] if "/" in rest else rest
    return f"{scheme}://{head}"


# ---------------------------------------------------------------------------------------------- paths
def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL such as ``gs://bucket/x`` (``file://`` counts as local)."""
    s = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
    return bool(_URL.match(s)) and not s.startswith("file://")


def _local(path: str | os.PathLike) -> str:
    s = os.fspath(path)
    return s[len("file://"):] if s.startswith("file://") else s


def as_path(path: str | os.PathLike) -> epath.Path:
    """``epath.Path`` for a local path or URL (``~`` expanded for local paths)."""
    if isinstance(path, epath.Path):
        return path
    s = str(path) if is_remote(path) else os.path.expanduser(_local(path))
    return epath.Path(s)


def resolve(path: str | os.PathLike) -> str:
    """An absolute local path (``~`` expanded), or the URL unchanged but for trailing slashes."""
    if is_remote(path):
        s = str(path)
        return s.rstrip("/") if not s.endswith("://") else s
    return os.path.abspath(os.path.expanduser(_local(path)))


def _fs(url: str):
    """(fsspec filesystem, path) for a URL; gcsfs for ``gs://``."""
    import fsspec  # noqa: PLC0415  (only remote paths need it)
    return fsspec.core.url_to_fs(url)


def remote_fingerprint(url: str) -> tuple[int, str]:
    """(size, version) of a remote object, fresh from the store: the GCS generation where there is one,
    else the ETag or modification time."""
    fs, p = _fs(url)
    try:
        fs.invalidate_cache(p)
    except Exception:  # noqa: BLE001  (not every filesystem caches)
        pass
    info = fs.info(p)
    if info.get("type") == "directory":
        raise IsADirectoryError(url)
    return int(info["size"]), _version(info)


# --------------------------------------------------------------------------------------- local cache
def local_copy(path: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """A local file with the content of ``path``: ``path`` itself when local, else a copy in ``cache_dir``
    named after sha256(URL, size, generation), downloaded once (temp file + atomic rename, so concurrent
    callers and readers never see a partial file). One metadata request per call to check the version."""
    if not is_remote(path):
        return resolve(path)
    url = str(path)
    size, version = remote_fingerprint(url)
    key = hashlib.sha256(f"{url}\0{size}\0{version}".encode()).hexdigest()[:24]
    base = os.path.basename(url.rstrip("/")) or "object"
    cache_dir = resolve(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    dst = os.path.join(cache_dir, f"{key}-{base}")
    try:
        if os.path.getsize(dst) == size:
            return dst
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, as_path(url).open("rb") as src:
            shutil.copyfileobj(src, out, _COPY_CHUNK)
            out.flush()
            os.fsync(out.fileno())
        got = os.path.getsize(tmp)
        if got != size:
            raise OSError(f"{url}: downloaded {got} bytes, expected {size} (changed during the download?)")
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return dst


def _version(info: dict) -> str:
    return str(next((info[k] for k in ("generation", "etag", "ETag", "mtime", "updated", "LastModified")
                     if info.get(k) not in (None, "")), ""))


def tree_mirror_path(url: str, cache_dir: str | os.PathLike, key: str) -> str:
    """Where ``local_tree(url, cache_dir, key=key)`` puts (or finds) its mirror."""
    url = resolve(url)
    base = os.path.basename(url.rstrip("/")) or "tree"
    h = hashlib.sha256(f"{url}\0{key}".encode()).hexdigest()[:24]
    return os.path.join(resolve(cache_dir), f"{h}-{base}")


def local_tree(path: str | os.PathLike, cache_dir: str | os.PathLike, *, key: str | None = None) -> str:
    """A local directory with the content of the directory ``path``: ``path`` itself when local, else a mirror
    in ``cache_dir`` named ``<key>-<name>``, downloaded once into a temporary directory that is renamed when
    complete (so an existing mirror is always whole). ``key`` defaults to a hash of the URL and the listing's
    (name, size, generation): a changed file gives a new mirror (one listing request per call). A caller
    whose content never changes under a URL (a finished stage) passes its own key: no request at all when
    the mirror exists."""
    if not is_remote(path):
        return resolve(path)
    url = resolve(path)
    cache_dir = resolve(cache_dir)
    if key is not None:
        dst = tree_mirror_path(url, cache_dir, key)
        if os.path.isdir(dst):
            return dst
        key = os.path.basename(dst).split("-", 1)[0]
    fs, root = _fs(url)
    try:
        fs.invalidate_cache(root)
    except Exception:  # noqa: BLE001
        pass
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    files = sorted((p, int(i.get("size") or 0), _version(i)) for p, i in found.items()
                   if i.get("type") != "directory" and not p.endswith("/") and p != root)
    if not files:
        raise FileNotFoundError(f"{url}: no such directory (or it is empty)")
    if key is None:
        listing = "\0".join(f"{p}\0{n}\0{v}" for p, n, v in files)
        dst = tree_mirror_path(url, cache_dir, listing)
        if os.path.isdir(dst):
            return dst
        key = os.path.basename(dst).split("-", 1)[0]
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}-", suffix=".part")
    try:
        for p, size, _ in files:
            rel = p[len(root):].lstrip("/")
            local = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with fs.open(p, "rb") as src, open(local, "wb") as out:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
            if os.path.getsize(local) != size:
                raise OSError(f"{url}/{rel}: downloaded {os.path.getsize(local)} bytes, expected {size}")
        try:
            os.rename(tmp, dst)
        except OSError:
            if not os.path.isdir(dst):  # else: a concurrent caller finished first; theirs is as good
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _copy_file(src: str, dst: str | os.PathLike) -> None:
    if is_remote(dst):  # one object, complete when the upload is finalised on close
        with open(src, "rb") as f, as_path(dst).open("wb") as out:
            shutil.copyfileobj(f, out, _COPY_CHUNK)
        return
    with open(src, "rb") as f:
        _atomic_local_write(resolve(dst), lambda out: shutil.copyfileobj(f, out, _COPY_CHUNK))


def _atomic_local_write(dst: str, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temp file beside ``dst``, fsync, rename over ``dst`` (readers never see half a
    file); mode as ``open()`` would give it (mkstemp makes 0600)."""
    d = os.path.dirname(dst) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(dst)}.", suffix=".tmp")
    os.fchmod(fd, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def upload(local: str | os.PathLike, remote: str | os.PathLike, *, exclude: tuple[str, ...] = ()) -> str:
    """Copy a local file, or a directory tree, to ``remote`` (a URL or a local path); returns ``remote``.
    Each file lands whole (one object put; locally temp + rename). Written locally first, then uploaded,
    is how ArrayRecord shards reach a bucket (the array_record writer only writes POSIX files).
    ``exclude``: paths relative to ``local`` ('/'-separated) left out, e.g. a completion marker that the
    caller uploads last."""
    src = resolve(local)
    dst = resolve(remote)
    if os.path.isdir(src):
        for root, _dirs, files in os.walk(src):
            rel = os.path.relpath(root, src)
            for name in sorted(files):
                if (name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}") in exclude:
                    continue
                target = dst if rel == "." else f"{dst}/{rel.replace(os.sep, '/')}"
                _copy_file(os.path.join(root, name), f"{target}/{name}")
        return dst
    _copy_file(src, dst)
    return dst


# ------------------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that readers see the old content or the new, never a mix."""
    if is_remote(path):
        as_path(path).write_bytes(data)  # a single object put
        return
    _atomic_local_write(resolve(path), lambda out: out.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    dump_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def append_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", *, client: Any = None) -> None:
    """Append ``text`` to a file. Objects cannot be appended to (gcsfs silently turns ``open("a")`` into an
    overwrite), so on ``gs://`` this rewrites the object with its old content + ``text``, guarded by the
    generation read (a concurrent append retries instead of being lost). O(size) per call: fine for
    metrics / logs written every few seconds, not for bulk data."""
    if not is_remote(path):
        dst = resolve(path)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        with open(dst, "a", encoding=encoding) as f:
            f.write(text)
        return
    url = resolve(path)
    if not url.startswith("gs://"):
        raise NotImplementedError(f"append to {url!r}: only local paths and gs://")
    from google.api_core import exceptions as gexc  # noqa: PLC0415
    if client is None:
        from google.cloud import storage  # noqa: PLC0415
        client = storage.Client()
    bucket_name, name = _split_gs(url)
    bucket = client.bucket(bucket_name)
    for _ in range(20):
        blob = bucket.get_blob(name)
        try:
            old, gen = (b"", 0) if blob is None else (blob.download_as_bytes(if_generation_match=blob.generation),
                                                      int(blob.generation))
            bucket.blob(name).upload_from_string(old + text.encode(encoding), if_generation_match=gen)
            return
        except (gexc.PreconditionFailed, gexc.NotFound):
            time.sleep(0.05)
    raise OSError(f"append to {url}: the object kept changing (20 tries)")


def _split_gs(url: str) -> tuple[str, str]:
    m = re.match(r"^gs://([^/]+)/(.+)$", url)
    if not m:
        raise ValueError(f"not a gs://bucket/object URL: {url!r}")
    return m.group(1), m.group(2)
