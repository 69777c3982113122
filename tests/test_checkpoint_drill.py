"""The checkpoint fault drill (issue #33, docs/RELIABILITY.md "Fault drill"): every kind of file a checkpoint
step holds is truncated, bit-flipped or deleted, and the restore must either fall back to the previous step
(moving the damaged one aside) or restore values *equal* to those saved — never different ones.

In process (``Checkpointer`` on a small state), so the whole matrix runs in seconds; the real train command
over the same fault is ``test_reliability.py::test_bit_flips_in_every_array_file_fall_back_with_exact_losses``.
The outcomes must equal the table in docs/RELIABILITY.md, so the documentation cannot drift from the code.
"""
import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvjax.training.checkpoint import Checkpointer, CheckpointIntegrityError
from uvjax.training.integrity import digest_numpy, tree_digests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# file kind (as in the doc table) -> glob inside a step directory
FILE_KINDS = {
    "array chunks `state/ocdbt.process_*/d/*`": "state/ocdbt.process_*/d/*",
    "array index: OCDBT b-tree `state/d/*`": "state/d/*",
    "OCDBT manifests `state/**/manifest.ocdbt`": "state/**/manifest.ocdbt",
    "tree metadata `state/_METADATA`": "state/_METADATA",
    "array metadata `state/array_metadatas/*`": "state/array_metadatas/*",
    "shardings `state/_sharding`": "state/_sharding",
    "step metadata `_CHECKPOINT_METADATA`": "_CHECKPOINT_METADATA",
    "data-iterator state, grain `data/process_*.json`": "data/process_*.json",
    "data-iterator state, row-sharded `data_json/metadata`": "data_json/metadata",
    "run metadata `meta/metadata`": "meta/metadata",
    "integrity record `integrity/metadata`": "integrity/metadata",
    "verified mark `uvjax_verified.json`": "uvjax_verified.json",
}
FAULTS = ("truncated", "one bit flipped", "deleted")


class GrainLikeIterator:
    """What grain's checkpoint handler needs: get_state() -> JSON bytes, set_state, start_prefetch."""

    def __init__(self, pos=0):
        self.pos = pos

    def get_state(self):
        return json.dumps({"next_index": self.pos, "seed": 7}).encode()

    def set_state(self, state):
        self.pos = json.loads(state)["next_index"]

    def start_prefetch(self):
        pass


class RowIterator(GrainLikeIterator):
    state_is_global = True

    def get_state(self):
        return {"next_index": self.pos, "seed": 7}

    def set_state(self, state):
        self.pos = state["next_index"]


def _state(step):
    rng = np.random.default_rng(step)
    return {"params": {"w": jnp.asarray(rng.standard_normal((96, 80)), jnp.float32),
                       "e": jnp.asarray(rng.standard_normal((40, 24)), jnp.bfloat16)},
            "opt": {"mu": jnp.asarray(rng.standard_normal((96, 80)), jnp.float32), "count": jnp.int32(step)},
            "rng": jax.random.key(step)}


def _template():
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))


def _equal(a, b):
    fa, fb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    for x, y in zip(fa, fb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            return False
    return len(fa) == len(fb)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two verified steps (1, 2) per iterator kind, written once and copied per case."""
    out = {}
    for kind, cls in (("grain", GrainLikeIterator), ("rows", RowIterator)):
        d = str(tmp_path_factory.mktemp(f"ck_{kind}") / "checkpoints")
        ck = Checkpointer(d, keep=2, async_save=False)
        for step in (1, 2):
            ck.save(step, _state(step), cls(pos=10 * step), meta={"guard": {"history": [[step, 1.5]]}})
            ck.set_probe(step, {"loss": 1.5 + step})
        ck.close()
        assert sorted(Checkpointer(d).verified_steps()) == [1, 2]
        out[kind] = (d, cls)
    return out


def _damage(path, fault):
    if fault == "deleted":
        os.remove(path)
    elif fault == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            if not data:
                return
            data[len(data) // 2] ^= 0x10
            f.seek(0)
            f.write(data)


def _outcome(src, cls, pattern, fault, tmp):
    d = os.path.join(tmp, "checkpoints")
    shutil.copytree(src, d)
    files = [f for f in glob.glob(os.path.join(d, "2", pattern), recursive=True) if os.path.isfile(f)]
    assert files, (pattern, os.listdir(os.path.join(d, "2")))
    for f in files:
        _damage(f, fault)
    it = cls()
    ck = Checkpointer(d, keep=2, async_save=False)
    try:
        step, out, skipped = ck.restore_latest(_template(), it, with_meta=True)
    finally:
        ck.close()
    if "data_json" in out:  # the row-sharded state comes back as JSON; the trainer sets it (train.py)
        it.set_state(out["data_json"])
    # whatever happened, the restored step holds exactly what was saved as that step
    assert step in (1, 2)
    assert _equal(out["state"], _state(step)), f"{pattern} {fault}: step {step} restored with other values"
    assert it.pos == 10 * step, (pattern, fault, it.pos)
    assert out["meta"] == {"guard": {"history": [[step, 1.5]]}}
    names = os.listdir(d)
    if step == 1:
        assert [s["step"] for s in skipped] == [2]
        assert any(n.startswith("unreadable-2-") for n in names), names  # moved aside, not deleted
        return "fell back"
    assert not skipped and "2" in names
    return "harmless"


def _doc_table() -> dict:
    text = open(os.path.join(REPO, "docs", "RELIABILITY.md")).read()
    section = text.split("### Checkpoint files", 1)[1].split("\n### ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in FILE_KINDS:
            table[cells[0]] = [re.sub(r"\s*\(.*\)$", "", c).strip("* ") for c in cells[1:4]]
    return table


def test_every_checkpoint_file_fault_falls_back_or_is_harmless(saved, tmp_path):
    results = {}
    for kind, pattern in FILE_KINDS.items():
        if "grain" in kind or "row-sharded" in kind:
            src, cls = saved["grain" if "grain" in kind else "rows"]
        else:
            src, cls = saved["grain"]
        results[kind] = [_outcome(src, cls, pattern, fault, str(tmp_path / f"{len(results)}-{i}"))
                         for i, fault in enumerate(FAULTS)]
    # nothing is used with values other than those saved (asserted per case above); the array data and
    # every record that decides what is trained must be detected
    for kind in ("array chunks `state/ocdbt.process_*/d/*`", "data-iterator state, grain `data/process_*.json`",
                 "data-iterator state, row-sharded `data_json/metadata`", "run metadata `meta/metadata`"):
        assert results[kind] == ["fell back"] * 3, (kind, results[kind])
    doc = _doc_table()
    assert doc == results, f"docs/RELIABILITY.md's checkpoint drill table differs from what happens: {results}"


def test_digest_matches_the_python_integer_reference_and_sees_every_single_bit():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((7, 5)).astype(np.float32), rng.integers(-9, 9, (3, 4, 2)).astype(np.int32),
              rng.standard_normal((6,)).astype(jnp.bfloat16), np.array([True, False, True]),
              rng.integers(0, 255, (4, 3)).astype(np.uint8), np.float32(3.25)]
    got = tree_digests(arrays)
    for i, x in enumerate(arrays):
        a, b = digest_numpy(np.asarray(x))
        assert got[f"[{i}]"].split(":")[1] == f"{a:08x}{b:08x}"
    # every single-bit flip of a small float array changes the digest; so does swapping two elements
    x = rng.standard_normal((3, 4)).astype(np.float32)
    base = digest_numpy(x)
    raw = x.view(np.uint32).ravel()
    for i in range(raw.size):
        for bit in range(32):
            y = raw.copy()
            y[i] ^= np.uint32(1 << bit)
            assert digest_numpy(y.view(np.float32).reshape(x.shape)) != base, (i, bit)
    swapped = x.copy().ravel()
    swapped[[0, 5]] = swapped[[5, 0]]
    assert digest_numpy(swapped.reshape(x.shape)) != base


def test_digest_does_not_depend_on_the_sharding():
    """The same array, whole on one device and sharded over a 2x2 mesh of CPU devices, has one digest."""
    devs = jax.devices()
    assert len(devs) >= 4, "tests/conftest.py gives the suite 8 CPU devices"
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(devs[:4]).reshape(2, 2), ("a", "b"))
    x = np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32)
    whole = tree_digests({"x": jnp.asarray(x)})
    sharded = tree_digests({"x": jax.device_put(x, NamedSharding(mesh, P("a", "b")))})
    assert whole == sharded
    a, b = digest_numpy(x)
    assert whole["['x']"].endswith(f"{a:08x}{b:08x}")


def test_a_checkpoint_that_reads_back_wrong_is_moved_aside_and_never_counted(tmp_path, monkeypatch):
    """Rotation counts verified steps only: a step whose read-back differs from what was saved is moved aside,
    and the older verified steps it would have replaced stay."""
    d = str(tmp_path / "checkpoints")
    ck = Checkpointer(d, keep=1, async_save=False)
    ck.save(1, _state(1), RowIterator(10))
    import uvjax.training.checkpoint as C
    real = C.tree_digests
    calls = {"n": 0}

    def lying_digests(tree):  # the read-back of step 2 sees one changed value
        calls["n"] += 1
        d = real(tree)
        if calls["n"] == 3:  # 1: save 1; 2: read-back of 1 at save 2; 3: save 2 -> corrupt the recorded value
            return {k: ("0" * 16 if i == 0 else v) for i, (k, v) in enumerate(d.items())}
        return d

    monkeypatch.setattr(C, "tree_digests", lying_digests)
    ck.save(2, _state(2), RowIterator(20))
    ck.close()
    names = sorted(os.listdir(d))
    assert "1" in names and "2" not in names and any(n.startswith("unverified-2-") for n in names), names
    assert ck.failed_verification and ck.failed_verification[0]["step"] == 2
    assert "digests" in ck.failed_verification[0]["error"]
    ck = Checkpointer(d)
    step, out, _ = ck.restore_latest(_template(), RowIterator())
    assert step == 1 and _equal(out["state"], _state(1))


def test_rotation_keeps_the_last_verified_steps_and_deletes_only_older_ones(tmp_path):
    d = str(tmp_path / "checkpoints")
    ck = Checkpointer(d, keep=2, async_save=True)
    for step in (1, 2, 3, 4):
        ck.save(step, _state(step), RowIterator(step))
        # step-1 is verified once step is saved (the read-back waits for the save); step stays unverified
        kept = sorted(int(n) for n in os.listdir(d) if n.isdigit())
        assert len([s for s in kept if s < step]) == min(2, step - 1), (step, kept)
    ck.close()
    assert sorted(int(n) for n in os.listdir(d) if n.isdigit()) == [3, 4]
    assert Checkpointer(d).verified_steps() == [3, 4]


def test_a_damaged_integrity_record_is_an_error_naming_the_step(tmp_path):
    d = str(tmp_path / "checkpoints")
    ck = Checkpointer(d, keep=2, async_save=False)
    ck.save(5, _state(5), RowIterator(5))
    ck.close()
    path = os.path.join(d, "5", "integrity", "metadata")
    rec = json.load(open(path))
    rec["arrays"][next(iter(rec["arrays"]))] = "float32[96, 80]:0000000000000000"
    json.dump(rec, open(path, "w"))
    with pytest.raises(CheckpointIntegrityError, match="checkpoint step 5 .* does not match the digests"):
        Checkpointer(d).restore(5, _template(), RowIterator())
