"""Untrusted inputs (docs/RELIABILITY.md §5): data, images, checkpoints, weights and configs that
other people made must not run code, escape their folders or exhaust memory.

Path escapes and oversized JSON in the LLaVA importer are tested in ``tests/test_formats.py``;
malformed records and image paths are fuzzed in ``tests/test_fuzz.py``.
"""
import ast
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from uvjax.data.importers import common as importer_common, llava as importer_llava, paths as importer_paths
from uvjax.data import records, storage
from uvjax.data.records import Record, Segment, record_to_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("uvjax", "configs", "benchmarks", "launch")

# ------------------------------------------------------------------------------------- code scan
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _name(node) -> str:
    """Dotted name of a call target (``torch.load``, ``eval``), '' when not a plain name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_uses(source: str, filename: str = "<src>") -> list[str]:
    """Every construct that could run code from data: pickle-family imports and loads, ``eval`` /
    ``exec``, ``torch.load`` without ``weights_only=True``, ``trust_remote_code=True``,
    ``allow_pickle=True``, ``yaml.load`` without a safe loader, ``pandas.read_pickle``."""
    out = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in UNSAFE_MODULES:
                out.append(f"{where}: from {node.module} import ...")
            if mod == "torch" and any(a.name == "load" for a in node.names):
                out.append(f"{where}: from torch import load (use torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Call):
            fn = _name(node.func)
            last = fn.rsplit(".", 1)[-1]
            if fn in ("eval", "exec", "builtins.eval", "builtins.exec"):
                out.append(f"{where}: {fn}(...)")
            if fn.endswith("torch.load") or fn == "torch.load":
                if not _is_true(_kw(node, "weights_only")):
                    out.append(f"{where}: torch.load without weights_only=True")
            if last in ("read_pickle", "unsafe_load", "full_load"):
                out.append(f"{where}: {fn}(...)")
            if fn in ("yaml.load",) and "Safe" not in ast.unparse(_kw(node, "Loader") or ast.Constant(None)):
                out.append(f"{where}: yaml.load without SafeLoader")
            for k in ("trust_remote_code", "allow_pickle"):
                if _is_true(_kw(node, k)):
                    out.append(f"{where}: {k}=True")
        elif isinstance(node, ast.keyword) and node.arg in ("trust_remote_code", "allow_pickle") and _is_true(node.value):
            pass  # counted with its call above
    return sorted(set(out))


def test_scanner_finds_every_unsafe_construct():
    bad = """
import pickle
from dill import loads
import torch, yaml, numpy as np, pandas as pd
from torch import load
eval("1")
exec("x = 1")
torch.load("f.pt")
torch.load("f.pt", weights_only=False)
np.load("x.npy", allow_pickle=True)
AutoModel.from_pretrained("m", trust_remote_code=True)
yaml.load(open("c.yaml"))
pd.read_pickle("x")
"""
    found = unsafe_uses(bad)
    assert len(found) == 11, found
    ok = """
import torch, yaml, json, numpy as np, re
torch.load("f.pt", map_location="cpu", weights_only=True)
np.load("x.npy")
yaml.load(open("c.yaml"), Loader=yaml.SafeLoader)
re.compile("x").match("x")
model.eval()
"""
    assert unsafe_uses(ok) == []


def test_code_never_unpickles_evals_or_trusts_remote_code():
    found = []
    for top in SCANNED:
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(root, f)
                    with open(path, encoding="utf-8") as fh:
                        found += unsafe_uses(fh.read(), os.path.relpath(path, REPO))
    assert found == [], "\n".join(found)


# ------------------------------------------------------------------------------------- configs
def test_config_overrides_are_parsed_never_evaluated(tmp_path):
    """Overrides go through ``ast.literal_eval`` (ml_collections): code in them is a string or a parse
    error, never run. (Config *files* are Python by design; only the repo's configs/ are loaded.)"""
    mark = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {mark}')"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "uvjax.train", "--config=configs/vqvq.py:smoke",
                        f"--workdir={tmp_path / 'wd'}",
                        f"--config.data.streams.understanding.paths=({payload},)",  # kept as a string
                        f"--config.model.rope_scaling=({payload}, 1)",
                        f"--config.train.steps={payload}"],                        # a parse error
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "config.train.steps" in p.stderr, p.stderr[-2000:]
    assert not mark.exists() and not os.path.exists(tmp_path / "wd")  # stopped before any work


# ------------------------------------------------------------------------------------- images
@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 3), 5, np.uint8)).save(root / "a.png")
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "out.png")      # points outside
    os.symlink(root / "a.png", root / "sub" / "in.png")          # points inside
    return root


@pytest.mark.parametrize("bad", ["../secret.png", "sub/../../secret.png", "out.png", "ABS"])
def test_load_image_refuses_paths_leaving_the_image_folder(image_tree, bad):
    rel = str(image_tree.parent / "secret.png") if bad == "ABS" else bad
    with pytest.raises(ValueError, match="leaves the image folder.*refused"):
        storage.load_image(rel, str(image_tree), where="d.json record 2")
    assert storage.load_image("sub/in.png", str(image_tree)).shape == (4, 4, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression-bomb stand-in)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h", [(9000, 9000), (40000, 40000)])  # above our limit; above PIL's
def test_decompression_bombs_are_refused_before_decoding(tmp_path, w, h):
    (tmp_path / "bomb.png").write_bytes(_png_header_only(w, h))
    with pytest.raises(ValueError, match=r"bomb"):
        storage.load_image("bomb.png", str(tmp_path), where="d.json record 0")
    with pytest.raises(ValueError, match="exceeds max_image_pixels|bomb"):
        importer_paths.decode_image_bytes(_png_header_only(w, h), "u.parquet row 3")
    # through the importer: one bad record, skipped and counted, the rest imported
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok.png")
    item = lambda img: {"id": img, "image": img, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                   {"from": "gpt", "value": "a"}]}
    import json
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(item(x)) for x in ("ok.png", "bomb.png", "ok.png")))
    stats = importer_common.ImportStats()
    recs = list(importer_llava.iter_llava(str(path), str(tmp_path), load_pixels=True, on_error="skip", stats=stats))
    assert len(recs) == 2 and stats.skipped == {"bad_image": 1}


# ------------------------------------------------------------------------------------- records
def test_oversized_record_bytes_are_refused(monkeypatch, tmp_path):
    rec = Record("big", "text", [Segment("user", "text", text="q"), Segment("assistant", "text", text="x" * 5000)])
    storage.write_records([rec], str(tmp_path), "s")
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1000)
    with pytest.raises(ValueError, match=r"s-00000.array_record record 0: \d+ bytes exceeds the 1000-byte record limit"):
        storage.RecordReader(storage.expand_paths(str(tmp_path))).read(0)
    with pytest.raises(ValueError, match="record limit"):
        records.record_from_bytes(record_to_bytes(rec))


def test_unsafe_array_dtypes_are_refused():
    import msgpack
    for dtype in ("object", "O", "V16", "complex128", "<U4"):
        raw = msgpack.packb({"id": "x", "task": "t", "segments": [
            {"role": "user", "kind": "image", "codes": {"__nd__": True, "dtype": dtype, "shape": [1], "data": b"\0" * 16}}]})
        with pytest.raises(ValueError, match="not allowed|malformed"):
            records.record_from_bytes(raw)


# ------------------------------------------------------------------------------------- weights
def test_torch_checkpoints_cannot_run_code(tmp_path):
    torch = pytest.importorskip("torch")
    from uvjax.weights.llamagen_vq import load_torch_state_dict
    mark = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {mark}",))

    import pickle  # the test builds the malicious file; uvjax itself never imports pickle
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "x": Payload()}, evil, pickle_module=pickle)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        load_torch_state_dict(str(evil))
    assert not mark.exists()
    good = tmp_path / "good.pt"
    torch.save({"ema": {"w": torch.ones(3)}}, good)
    np.testing.assert_array_equal(load_torch_state_dict(str(good))["w"], np.ones(3, np.float32))


def test_hf_weights_are_read_from_safetensors_only(tmp_path):
    from uvjax.weights.hf_llama import checkpoint_files
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        checkpoint_files(str(tmp_path))
