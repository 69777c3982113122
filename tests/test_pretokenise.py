"""Pre-tokenisation of imported data (uvjax/pretokenise.py) and the imported-data stage graph, on a
LLaVA-format dataset written from the format's spec (tests/llava_fixture.py), not through uvjax."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llava_fixture import COLORS, write_llava
from uvjax import pretokenise as pt
from uvjax.data import images as image_io
from uvjax.towers import encoders
from uvjax.data.importers import common as importer_common, convert as importer_convert
from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT, PAD, TEXT
from uvjax.data.storage import RecordReader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CODES = 4


class ColourTower:
    """A stand-in frozen tower whose codes are known by construction: every code is the index of the
    fixture colour nearest to the image's centre pixel (the drawn shape's colour). Counts its images."""

    def __init__(self):
        self.calls, self.images = 0, 0

    def encode(self, x):
        self.calls += 1
        self.images += len(x)
        c = x[:, x.shape[1] // 2, x.shape[2] // 2].astype(np.int64)
        ref = np.asarray(list(COLORS.values()), np.int64)
        idx = np.argmin(((c[:, None] - ref[None]) ** 2).sum(-1), axis=1)
        return np.repeat(idx[:, None], N_CODES, axis=1).astype(np.int32)


def _enc(tower=None, size=32, resize="center_crop"):
    e = encoders.Encoder(tower or ColourTower(), "codes", size, resize)
    return {"user": e, "assistant": e}


@pytest.fixture
def llava(tmp_path):
    data = write_llava(str(tmp_path / "src"), n_images=6)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # import with relative paths from one directory ...
    try:
        res = importer_convert.convert("src/data.json", "shards", format="llava", image_dir="src/images")
    finally:
        os.chdir(cwd)
    return {**data, "shards": str(tmp_path / "shards"), "res": res}


def _records(d, pattern="*"):
    return [r for r in RecordReader(sorted(glob.glob(os.path.join(d, f"{pattern}.array_record"))))]


def test_roundtrip_json_to_batch_arrays(llava, tmp_path, monkeypatch):
    """JSON -> shards -> pre-tokenised -> sequence arrays, checked position by position against what the
    format says: user images are understanding inputs (no target), the gpt image is the generation target
    with its <boi>/<eoi> as text targets, and only gpt text is a text target."""
    from uvjax.data import sequence as sq
    from uvjax.data.tokenizer import get_template, train_bpe
    out = str(tmp_path / "pre")
    monkeypatch.chdir("/")  # ... and pre-tokenise from another: the manifest's absolute image folder is used
    rep = pt.pretokenise_shards(os.path.join(llava["shards"], "*.array_record"), _enc(), out, split="train")
    assert rep["records_read"] == 19 and rep["skipped_total"] == 0
    assert rep["records_written"] == {"understanding": 13, "generation": 6}
    items = {it["id"]: it for it in llava["items"]}
    recs = {r.id: r for r in _records(out)}
    tok = train_bpe(["What color is the shape? Draw a red square. A blue circle."] * 4, vocab_size=300)
    template = get_template("vicuna_v1", "")
    cfg = sq.SequenceConfig(seq_len=96, codebook_size=len(COLORS))
    for i in range(6):
        color = items[f"vqa-{i}"]["conversations"][1]["value"]
        cidx = list(COLORS).index(color)
        # VQA: the 4 codes after the user's <boi> are IMAGE_IN, never targets; answers are targets
        a = sq.encode_record(recs[f"vqa-{i}"], tok, template, cfg).arrays
        boi = int(np.flatnonzero(a["tokens"] == tok.boi_id)[0])
        assert list(a["modality"][boi:boi + N_CODES + 2]) == [TEXT] + [IMAGE_IN] * N_CODES + [TEXT]
        assert list(a["tokens"][boi + 1:boi + 1 + N_CODES]) == [cidx] * N_CODES
        assert not a["image_target"].any() and not a["text_target"][:boi + N_CODES + 2].any()
        tgt = tok.decode([int(t) for t, m in zip(a["tokens"], a["text_target"]) if m])
        assert color in tgt and items[f"vqa-{i}"]["conversations"][3]["value"] in tgt
        # generation: the gpt image is IMAGE_OUT + image targets, its <boi>/<eoi> text targets
        g = sq.encode_record(recs[f"gen-{i}"], tok, template, cfg).arrays
        boi = int(np.flatnonzero(g["tokens"] == tok.boi_id)[0])
        span = slice(boi + 1, boi + 1 + N_CODES)
        assert list(g["modality"][span]) == [IMAGE_OUT] * N_CODES and g["image_target"][span].all()
        assert g["image_target"].sum() == N_CODES and list(g["tokens"][span]) == [cidx] * N_CODES
        assert g["text_target"][boi] == 1 and g["text_target"][boi + N_CODES + 1] == 1
        pre = [int(t) for t, m in zip(g["tokens"][:boi], g["text_target"][:boi]) if m]
        assert tok.decode(pre) == " "  # only the answer's opening space: the prompt is never a target
        assert g["modality"][-1] == PAD
    assert recs["text-0"].images() == []


def test_each_distinct_image_is_encoded_once(llava, tmp_path):
    tower = ColourTower()
    rep = pt.pretokenise_shards(llava["shards"], _enc(tower), str(tmp_path / "pre"), chunk=5, batch=4)
    # 6 images, each used by a VQA, a caption and a generation record, spread over 4 chunks
    assert tower.images == 6 and rep["images_encoded"] == 6 and rep["image_refs"] == 18


def test_killed_pass_resumes_and_hosts_split_the_work(llava, tmp_path):
    class Dies(ColourTower):
        def encode(self, x):
            if self.calls >= 1:
                raise KeyboardInterrupt("killed")
            return super().encode(x)

    full = str(tmp_path / "full")
    pt.pretokenise_shards(llava["shards"], _enc(), full, chunk=5)
    part = str(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        pt.pretokenise_shards(llava["shards"], _enc(Dies()), part, chunk=5)
    done = glob.glob(os.path.join(part, ".train-chunk*.done"))
    assert len(done) == 1
    first = os.stat(done[0]).st_mtime_ns, os.stat(glob.glob(os.path.join(part, "train-generation-c00000-*"))[0]).st_mtime_ns
    pt.pretokenise_shards(llava["shards"], _enc(), part, chunk=5)
    assert (os.stat(done[0]).st_mtime_ns,  # the finished chunk was not redone
            os.stat(glob.glob(os.path.join(part, "train-generation-c00000-*"))[0]).st_mtime_ns) == first
    assert len(glob.glob(os.path.join(part, ".train-chunk*.done"))) == 4
    key = lambda rs: sorted((r.id, tuple(np.asarray(s.codes).tolist() for s in r.images())) for r in rs)
    assert key(_records(part)) == key(_records(full))
    hosts = str(tmp_path / "hosts")
    reps = [pt.pretokenise_shards(llava["shards"], _enc(), hosts, chunk=5, process_index=p, process_count=2)
            for p in range(2)]
    assert sum(r["records_read"] for r in reps) == 19 and reps[0]["records_read"] != 19
    assert key(_records(hosts)) == key(_records(full))
    assert pt.merge_reports(hosts, "train")["records_read"] == 19


def _bad_images(root):
    """Each kind of bad or unusual image file, as another program might leave them."""
    img = os.path.join(root, "images")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(os.path.join(img, "ok.png"))
    good = open(os.path.join(img, "ok.png"), "rb").read()
    open(os.path.join(img, "truncated.png"), "wb").write(good[:len(good) // 2])
    open(os.path.join(img, "notimage.jpg"), "wb").write(b"this is not a jpeg")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(os.path.join(img, "tiny.png"))
    Image.new("RGB", (400, 300), (9, 9, 9)).save(os.path.join(img, "huge.png"))
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(os.path.join(img, "cmyk.jpg"))
    Image.new("LA", (40, 40), (128, 0)).save(os.path.join(img, "la.png"))  # fully transparent grey
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(os.path.join(img, "grey16.png"))
    names = ["ok.png", "truncated.png", "notimage.jpg", "tiny.png", "huge.png", "missing.png", "cmyk.jpg",
             "la.png", "grey16.png"]
    items = [{"id": f"r{i}", "image": n, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                          {"from": "gpt", "value": "a picture"}]}
             for i, n in enumerate(names)]
    with open(os.path.join(root, "bad.json"), "w") as f:
        json.dump(items, f)
    return names


def test_bad_images_are_named_or_skipped_and_counted(tmp_path):
    root = str(tmp_path / "src")
    os.makedirs(os.path.join(root, "images"))
    _bad_images(root)
    # the importer keeps path records (files are checked for existence only): missing.png is its to report
    res = importer_convert.convert(os.path.join(root, "bad.json"), str(tmp_path / "shards"), format="llava",
                          image_dir=os.path.join(root, "images"), on_error="skip")
    assert res["counts"]["skipped"] == {"missing_image": 1}
    policy = image_io.ImagePolicy(max_pixels=100_000)
    with pytest.raises(importer_common.FormatError) as e:
        pt.pretokenise_shards(str(tmp_path / "shards"), _enc(), str(tmp_path / "raise"), policy=policy)
    msg = str(e.value)
    assert "record 1" in msg and "id 'r1'" in msg and "truncated.png" in msg and e.value.reason == "corrupt_image"
    rep = pt.pretokenise_shards(str(tmp_path / "shards"), _enc(), str(tmp_path / "skip"), policy=policy,
                                on_error="skip")
    assert rep["skipped"] == {"corrupt_image": 2, "too_small": 1, "oversized": 1}
    assert rep["converted"] == {"CMYK": 1, "LA": 1, "I;16": 1}
    assert rep["records_written"] == {"understanding": 4}
    kept = {r.id for r in _records(str(tmp_path / "skip"))}
    assert kept == {"r0", "r6", "r7", "r8"}
    report = json.load(open(os.path.join(tmp_path, "skip", "report-train.json")))
    assert report["skipped_total"] == 4 and any("tiny.png" in m for m in report["messages"])


def test_mode_conversions_are_exact():
    """Alpha composites over white, 16-bit grey scales (not clips) to 8 bits, CMYK converts as PIL does."""
    la = Image.new("LA", (8, 8), (100, 0))
    assert (image_io._to_rgb(la)[0] == 255).all()  # fully transparent -> white
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert (image_io._to_rgb(half)[0] == 127).all()  # 255 * (1 - 128/255) = 127
    g16 = Image.fromarray(np.full((8, 8), 32896, np.uint16))  # 32896 / 65535 * 255 = 128.0
    assert (image_io._to_rgb(g16)[0] == 128).all()


def test_preprocess_matches_llamagen_and_llava_rules():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 50:150] = 255  # a white square in the middle of a 2:1 image
    c = image_io.preprocess(img, 50)  # short side -> 50, centre crop: the white square fills it
    assert c.shape == (50, 50, 3) and c[5:-5, 5:-5].min() == 255
    p = image_io.preprocess(img, 50, "pad")  # padded to 200x200 with the CLIP mean, then resized
    assert p.shape == (50, 50, 3) and tuple(p[2, 25]) == image_io.CLIP_MEAN_RGB and p[25, 25].min() == 255


def _readme_recipe() -> list[str]:
    """The first code block under docs/USAGE.md's '## Train on your own data' (the README links to it), one
    command per entry."""
    text = open(os.path.join(REPO, "docs", "USAGE.md")).read()
    block = text.split("## Train on your own data", 1)[1].split("```", 2)[1]
    return [c.strip() for c in block.replace("\\\n", " ").strip().splitlines() if c.strip()]


def test_readme_recipe_trains_and_evaluates_on_llava_json(tmp_path):
    """The 'Train on your own data' block of docs/USAGE.md, verbatim but for the smoke preset and 6 steps: LLaVA JSON
    + images written by another program -> import -> tokenizer -> VQ -> pre-tokenise -> train -> held-out
    evaluation -> generate, run from an unrelated directory; a rerun reuses every stage; user stream paths
    with build=True are refused."""
    tr = write_llava(str(tmp_path / "train"), n_images=8, seed=0)
    te = write_llava(str(tmp_path / "test"), n_images=3, seed=1)
    run = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JSON=tr["json"], IMAGES="train/images", TEST_JSON="test/data.json", TEST_IMAGES=te["images"], RUN=run)
    env.pop("XLA_FLAGS", None)
    cmds = _readme_recipe()
    assert len(cmds) <= 4 and cmds[0].startswith("python -m uvjax.train --config=configs/own_data.py ")
    cmds[0] = cmds[0].replace("configs/own_data.py", "configs/own_data.py:smoke").replace(
        "--config.train.steps=300", "--config.train.steps=6 --config.train.progress=False")
    outs = []
    for c in cmds:
        p = subprocess.run(["bash", "-c", c], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, c + "\n" + p.stdout[-3000:] + p.stderr[-3000:]
        outs.append(p.stdout)
    assert "import-train: 25 records read, 25 kept" in outs[0]
    assert "held-out evaluation" in outs[0] and "answers (" in outs[0] and "held-out loss" in outs[1]
    rep = json.load(open(os.path.join(run, "eval", "step_6", "report.json")))
    hl = rep["heldout_loss"]
    assert hl["records"] == 10 and hl["tokens/image_targets"] == 3 * 16 and hl["tokens/text_targets"] > 0
    assert rep["answers"]["n"] == 7 and rep["generation"]["n"] == 3
    assert os.path.exists(os.path.join(run, "eval", "step_6", "generations.png"))
    assert os.path.exists(os.path.join(run, "red.png")) and Image.open(os.path.join(run, "red.png")).size == (32, 32)
    cfg = json.load(open(os.path.join(run, "config.json")))
    for s in ("understanding", "generation"):  # trained on the user's data, nothing else
        assert cfg["data"]["streams"][s]["paths"] and all("dataset-" in q for q in cfg["data"]["streams"][s]["paths"])
    p2 = subprocess.run(["bash", "-c", cmds[0] + " --config.stages.evaluate.enabled=False"], cwd=str(tmp_path),
                        env=env, capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stderr[-3000:]
    log = [json.loads(l) for l in open(os.path.join(run, "stages.jsonl"))]
    last = {r["stage"]: r for r in log}
    assert all(last[k]["reused"] for k in ("import-train", "import-test", "tokenizer", "vq", "dataset"))
    p3 = subprocess.run(["bash", "-c", cmds[0] + f" --config.data.streams.understanding.paths=\"('{tr['json']}',)\""],
                        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert p3.returncode != 0 and "would replace them" in p3.stderr


def test_sigterm_during_the_stages_exits_cleanly_and_the_rerun_resumes(tmp_path):
    """SIGTERM while the VQ stage trains: exit 0 with a message, the finished import and tokenizer stages are
    kept and reused by the rerun, which completes."""
    import signal
    import time
    tr = write_llava(str(tmp_path / "train"), n_images=6, seed=0)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "uvjax.train", "--config=configs/own_data.py:smoke", f"--workdir={tmp_path}/run",
           f"--config.stages.source.train={tr['json']}", f"--config.stages.source.image_dir={tr['images']}",
           "--config.train.steps=2", "--config.train.progress=False", "--config.stages.vq.train.steps=60"]
    p = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "vq: building" in line:
            time.sleep(3)
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + p.stdout.read()
    assert p.wait(timeout=120) == 0, out[-3000:]
    assert "stopped by signal 15 during the stages" in out
    assert glob.glob(str(tmp_path / "cache" / "vq-*.partial")) and not glob.glob(str(tmp_path / "cache" / "vq-*[0-9a-f]"))
    q = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stdout[-2000:] + q.stderr[-2000:]
    assert "import-train: reused" in q.stdout and "tokenizer: reused" in q.stdout and "vq: building" in q.stdout


def _png(color, size=(48, 40)) -> bytes:
    import io
    from llava_fixture import draw
    b = io.BytesIO()
    draw(color, "circle", size).save(b, format="PNG")
    return b.getvalue()


def test_hf_datasets_parquet_export_pretokenises(tmp_path):
    """A parquet file laid out as ``datasets.Dataset.to_parquet`` writes an Image + conversation dataset
    (``image``: struct<bytes, path>, ``conversations``: list<struct<from, value>>), written with pyarrow from
    that schema: imported, pre-tokenised, each embedded image encoded once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    colors = ["red", "blue", "red", "green"]
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn_t = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    rows = {"id": [f"hf-{i}" for i in range(4)],
            "image": [{"bytes": _png(c), "path": None} for c in colors],
            "conversations": [[{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": c}]
                              for c in colors]}
    pq.write_table(pa.table(rows, schema=pa.schema([("id", pa.string()), ("image", img_t),
                                                    ("conversations", turn_t)])), tmp_path / "train.parquet")
    importer_convert.convert(str(tmp_path / "train.parquet"), str(tmp_path / "shards"), format="unifiedvisual")
    tower = ColourTower()
    rep = pt.pretokenise_shards(str(tmp_path / "shards"), _enc(tower), str(tmp_path / "pre"))
    assert rep["records_written"] == {"understanding": 4} and tower.images == 3  # red twice: encoded once
    for r in _records(str(tmp_path / "pre")):
        c = colors[int(r.id.split("-")[1])]
        assert list(r.images("user")[0].codes) == [list(COLORS).index(c)] * N_CODES


def test_unifiedvisual_parquet_through_the_stage_graph(tmp_path):
    """A UnifiedVisual-style parquet (prompt/response with <image> placeholders, input images as paths under
    an image folder, output images embedded; a task column) through ``stages.prepare``: the interleaved
    records reach the interleaved stream and are trained on (own_data weights), VQ codes of the right size."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from uvjax.config import load_config_file
    from uvjax.stages.prepare import prepare
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    from llava_fixture import draw
    for i, c in enumerate(("red", "blue", "yellow", "green")):
        draw(c, "square", (64, 64)).save(img_dir / f"in{i}.png")
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = {"id": [f"uv-{i}" for i in range(8)],
            "task": ["gen_reasoning"] * 4 + ["vqa"] * 4,
            "prompt": [f"Draw the {c} thing after thinking." for c in ("red", "blue", "yellow", "green")]
                      + ["<image>\nWhat color is it?"] * 4,
            "response": ["It should be round. <image>"] * 4 + ["red", "blue", "yellow", "green"],
            "input_images": [[] for _ in range(4)] + [[f"in{i}.png"] for i in range(4)],
            "output_images": [[{"bytes": _png(c, (64, 64)), "path": None}] for c in ("red", "blue", "yellow", "green")]
                             + [[] for _ in range(4)]}
    schema = pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
                        ("response", pa.string()), ("input_images", pa.list_(pa.string())),
                        ("output_images", pa.list_(img_t))])
    pq.write_table(pa.table(rows, schema=schema), tmp_path / "uv.parquet")
    c = load_config_file("own_data", "smoke")
    with c.unlocked():
        c.stages.source.format = "unifiedvisual"
        c.stages.source.train = str(tmp_path / "uv.parquet")
        c.stages.source.image_dir = str(img_dir)
        c.stages.vq.train.steps = 2
    cfg, paths = prepare(c, str(tmp_path / "run"), progress=False)
    assert cfg.data.streams.interleaved.paths and cfg.data.streams.interleaved.weight == 1.0
    assert cfg.data.streams.understanding.paths and not cfg.data.streams.generation.paths
    inter = _records(os.path.join(paths["dataset"], "train"), "train-interleaved-*")
    assert sorted(r.id for r in inter) == [f"uv-{i}" for i in range(4)]
    assert all(len(r.images("assistant")[0].codes) == 16 and r.task == "gen_reasoning" for r in inter)
    assert paths["lengths"]["train"]["interleaved"]["records"] == 4


def test_llava_plus_caption_mix_in_one_folder(tmp_path):
    """The paper's mix as docs/USAGE.md builds it: LLaVA conversations and captions turned into generation
    records, imported into one folder with two prefixes, pre-tokenised together (format=shards)."""
    data = write_llava(str(tmp_path / "src"), n_images=4)
    caps = [it for it in data["items"] if it["id"].startswith("cap-")]
    with open(tmp_path / "src" / "caps.json", "w") as f:
        json.dump(caps, f)
    mix = str(tmp_path / "mix")
    for src, fmt, prefix in ((data["json"], "llava", "llava"), (str(tmp_path / "src" / "caps.json"),
                                                               "caption_generation", "sharegpt4v")):
        p = subprocess.run([sys.executable, "-m", "uvjax.data.formats", "convert", src, f"--format={fmt}",
                            f"--image_dir={data['images']}", f"--out_dir={mix}", f"--prefix={prefix}"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
    rep = pt.pretokenise_shards(mix, _enc(), str(tmp_path / "pre"))
    # 13 LLaVA records (4 generation among them) + 4 captions turned into generation records
    assert rep["records_written"] == {"understanding": 9, "generation": 8} and rep["images_encoded"] == 4
    gens = [r for r in _records(str(tmp_path / "pre"), "train-generation-*") if r.id.endswith("/generation")]
    assert len(gens) == 4 and all(r.images("assistant") and not r.images("user") for r in gens)
    # the graph on format=shards takes exactly the shards named (here: the LLaVA part of the folder)
    from uvjax.config import load_config_file
    from uvjax.stages.prepare import prepare
    c = load_config_file("own_data", "smoke")
    with c.unlocked():
        c.stages.source.format, c.stages.source.train = "shards", os.path.join(mix, "llava-*.array_record")
        c.stages.vq.train.steps = 2
    cfg, paths = prepare(c, str(tmp_path / "run"), progress=False)
    counts = {k: v["records"] for k, v in paths["lengths"]["train"].items()}
    assert counts == {"understanding": 9, "generation": 4}


def test_command_with_a_siglip_tower(llava, tmp_path):
    """``python -m uvjax.pretokenise`` with a SigLIP tower file for both roles: features [N, F] in float16,
    the tower's own preprocessing (squash to its size), a report printed."""
    from uvjax.models.siglip import ViTConfig, init_params
    from uvjax.weights.hf_siglip import save_vit
    vit = ViTConfig(image_size=32, patch_size=8, width=16, depth=1, heads=2, mlp=32)
    save_vit(init_params(vit), vit, str(tmp_path / "tower.safetensors"))
    p = subprocess.run([sys.executable, "-m", "uvjax.pretokenise", f"--shards={llava['shards']}",
                        f"--out={tmp_path / 'pre'}", f"--tower={tmp_path / 'tower.safetensors'}"],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "pre-tokenised train: read 19 records" in p.stdout and "6 distinct images encoded" in p.stdout
    recs = _records(str(tmp_path / "pre"))
    f = recs[0].images()[0].features if recs[0].images() else recs[1].images()[0].features
    assert f.shape == (16, 16) and f.dtype == np.float16
