"""A self-contained export (issue #32): ``python -m uvjax.weights.export`` writes the decoder, the image side
and the VQ tokenizer; after the run directory, its tokenizer and its VQ stage are moved away, ``load_trained``
and ``find_vq`` load the export alone and ``uvjax.generate`` draws from it. References: a float64 NumPy merge
of the run's LoRA factors (W + alpha/r · A B), the run's own logits and VQ codec computed before the move,
hand-written byte counts for ``--max_shard_size`` (and transformers' ``convert_file_size_to_int``)."""
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import random_batch
from uvjax.models.unified import UnifiedModel

PROMPT = "a watch at three o'clock"
HF_SAME = ("5GB", "5GiB", "200MB", "64KiB", "64KB", "2MiB", "5gib", 4096)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _images(n, size, seed):
    """Flat-colour discs on white."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.full((n, size, size, 3), 255, np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(size * 0.3, size * 0.7, 2).tolist() + [rng.uniform(size * 0.2, size * 0.35)]
        out[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    return out


def _lora_merged_f64(params, lora, scale):
    """Independent reference: every LoRA-targeted kernel + scale · A @ B in float64 (stacked layers)."""
    flat_p = {jax.tree_util.keystr(k): np.asarray(v, np.float64)
              for k, v in jax.tree_util.tree_leaves_with_path(params)}
    pairs = {}
    for k, v in jax.tree_util.tree_leaves_with_path(lora):
        ks = jax.tree_util.keystr(k)
        pairs.setdefault(ks[:ks.rindex("[")], {})[ks[ks.rindex("[") + 2:-2]] = np.asarray(v, np.float64)
    assert pairs
    for prefix, ab in pairs.items():
        key = prefix + "['kernel']"
        flat_p[key] = flat_p[key] + scale * np.einsum("...ir,...ro->...io", ab["a"], ab["b"])
    return flat_p


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-step LoRA run of the smoke preset whose tokenizer and VQ live outside the run (as the stage cache
    puts them), exported, then everything the run used moved away."""
    from configs.vq_tokenizer import get_config as vq_config
    from datasets import make_code_dataset
    from uvjax.config import load_config_file, lora_preset
    from uvjax.towers.vq_codec import VQCodec
    from uvjax.inference.decode import find_vq
    from uvjax.inference.loading import load_trained
    from uvjax.models import vq
    from uvjax.stage_log import StageLog
    from uvjax.train import run
    from uvjax.training import vq_train
    from uvjax.export import export_run
    from uvjax.weights.llamagen_vq import save_vq
    root = tmp_path_factory.mktemp("train")
    vc = vq_config("smoke")
    vc.model.ch_mult = (1, 2, 2, 2)  # downsample 8: 4x4 = 16 codes per 32 px image, as configs/vqvq.py:smoke
    vq_dir = str(root / "cache" / "vq-abc")
    os.makedirs(vq_dir)
    # the files train_vq writes (weights + the config it trained with); untrained weights do for this test
    vcfg = vq_train.vq_config_from(vc)
    save_vq(vq.init_params(vcfg, jax.random.key(0), 32), vcfg, os.path.join(vq_dir, vq_train.PARAMS_FILE))
    open(os.path.join(vq_dir, vq_train.CONFIG_FILE), "w").write(vc.to_json_best_effort(indent=1))
    ds = make_code_dataset(str(root / "data"), num_images=8, image_tokens=16, num_codes=64)
    c = load_config_file("vqvq", "smoke")
    c.data.tokenizer = ds["tokenizer"]
    c.data.streams.understanding.paths = (ds["paths"]["understanding"],)
    c.data.streams.generation.paths = (ds["paths"]["generation"],)
    c.model.image.codebook_from = vq_dir  # what the stages set: code vectors start from the VQ's
    c.stages.build = False
    c.stages.cache_dir = str(root / "cache")
    c.train.steps, c.train.checkpoint_every, c.train.progress, c.train.async_checkpoint = 2, 2, False, False
    c.mesh.shape = (1, -1, 1)
    lora_preset(c, 4, 8.0)
    c.optim.lr_rules = ((c.optim.lr_rules[0][0], 1e-2),)
    c.optim.lr = 5e-2  # the 2 steps move LoRA B away from zero: the merge has something to fold
    work = str(root / "run")
    run(c, work, progress=False)
    StageLog(work).write(stage="vq", fingerprint="abc", reused=True, seconds=0.0, path=vq_dir)  # as stage runs log it

    r = load_trained(work)
    lora = r.variables["lora"]
    assert max(float(np.abs(np.asarray(x)).max()) for p, x in jax.tree_util.tree_leaves_with_path(lora)
               if jax.tree_util.keystr(p).endswith("['b']")) > 0
    want_params = _lora_merged_f64(r.variables["params"], lora, 8.0 / 4)
    batch = {k: jnp.asarray(x) for k, x in random_batch(np.random.default_rng(1), 2, 24, 64, ds["vocab_size"]).items()}
    h = r.model.apply(r.variables, batch)
    logits = {m: np.asarray(r.model.apply(r.variables, h, method=getattr(UnifiedModel, m)))
              for m in ("text_logits", "image_logits")}
    vq_path, _ = find_vq(work, r.cfg)
    assert vq_path == os.path.join(vq_dir, "vq.safetensors")
    codec = VQCodec(vq_path)
    codes = np.random.default_rng(2).integers(0, 64, (3, 16)).astype(np.int32)
    imgs = _images(3, 32, 5)
    ref = {"decoded": codec.decode(codes), "encoded": codec.encode(imgs),
           "vq_sha": _sha(vq_path), "vq_cfg_sha": _sha(os.path.join(vq_dir, "vq_config.json"))}

    out = str(tmp_path_factory.mktemp("export") / "x")
    summary = export_run(work, out)
    moved = str(root) + "-moved"
    shutil.move(str(root), moved)  # no absolute path of the training machine can be used from here on
    assert not os.path.exists(work) and not os.path.exists(vq_dir) and not os.path.exists(ds["tokenizer"])
    return dict(out=out, summary=summary, root=str(root), work=work, vq_dir=vq_dir, tok_dir=ds["tokenizer"],
                want_params=want_params, batch=batch, logits=logits, codes=codes, imgs=imgs, ref=ref,
                tok_ids=dict(r.tokenizer.ids), step=r.step)


def test_export_layout_and_a_config_without_machine_paths(exported):
    out, root = exported["out"], exported["root"]
    s = exported["summary"]
    assert s["step"] == 2 and s["vq"] == "vq/vq.safetensors" and "warnings" not in s
    for f in ("config.json", "model.safetensors", "tokenizer.json", "uvjax_tokenizer.json", "tokenizer_config.json",
              "uvjax_image_modules.safetensors", "uvjax_config.json", "vq/vq.safetensors", "vq/vq_config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert _sha(os.path.join(out, "vq/vq.safetensors")) == exported["ref"]["vq_sha"]  # the run's VQ, byte for byte
    assert _sha(os.path.join(out, "vq/vq_config.json")) == exported["ref"]["vq_cfg_sha"]
    d = json.load(open(os.path.join(out, "uvjax_config.json")))
    provenance = d.pop("exported_from")

    def strings(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    found = [x for x in strings(d) if os.path.isabs(x) or x.startswith("~") or "://" in x or root in x]
    assert not found, found
    e = d["export"]
    assert e["format"] == "uvjax-export" and e["step"] == 2 and e["dtype"] == "float32"
    assert e["vq"] == "vq/vq.safetensors" and e["vq_config"] == "vq/vq_config.json"
    assert e["image_size"] == 32 and e["image_tokens"] == 16  # the VQ's training size; 4x4 codes
    assert {n: t["id"] for n, t in e["special_tokens"].items()} == exported["tok_ids"]
    assert e["special_tokens"]["boi"]["token"] == "<boi>" and e["special_tokens"]["eoi"]["token"] == "<eoi>"
    assert e["lora_merged"] == {"rank": 4, "alpha": 8.0, "targets": list(d["model"]["lora"]["targets"])}
    assert d["data"]["tokenizer"] == "." and d["model"]["image"]["codebook_from"] == "vq"
    assert set(e["relative_paths"]) == {"data.tokenizer", "model.image.codebook_from"}
    assert d["data"]["streams"]["understanding"]["paths"] == [] and d["stages"]["cache_dir"] == ""
    # the originals, at their own key paths
    assert provenance["workdir"] == exported["work"] and provenance["step"] == 2
    pc = provenance["config"]
    assert pc["data"]["tokenizer"] == exported["tok_dir"]
    assert pc["model"]["image"]["codebook_from"] == exported["vq_dir"]
    assert pc["stages"]["cache_dir"] == os.path.join(root, "cache")
    assert pc["data"]["streams"]["generation"]["paths"] == [os.path.join(root, "data", "generation")]


def test_load_trained_from_the_export_alone(exported):
    from uvjax.inference.loading import load_trained
    out = exported["out"]
    r = load_trained(out)
    assert r.step == 2 and r.workdir == out and r.variables["lora"] == {}
    assert r.model.cfg.decoder.lora.rank == 0 and r.cfg.model.lora.rank == 0  # merged
    assert r.tokenizer.ids == exported["tok_ids"]
    assert r.cfg.data.tokenizer == out and r.cfg.model.image.codebook_from == os.path.join(out, "vq")
    got = {jax.tree_util.keystr(k): np.asarray(v)
           for k, v in jax.tree_util.tree_leaves_with_path(r.variables["params"])}
    want = exported["want_params"]
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == np.float32, k
        np.testing.assert_allclose(got[k], w, atol=2e-6, rtol=1e-6, err_msg=k)
    h = r.model.apply(r.variables, exported["batch"])
    for m, w in exported["logits"].items():
        np.testing.assert_allclose(np.asarray(r.model.apply(r.variables, h, method=getattr(UnifiedModel, m))), w,
                                   atol=1e-4, rtol=0, err_msg=m)
    with pytest.raises(ValueError, match="export of step 2; step=1"):
        load_trained(out, step=1)


def test_find_vq_gives_the_exports_codec(exported):
    from uvjax.towers.vq_codec import VQCodec
    from uvjax.inference.decode import find_vq
    from uvjax.inference.loading import export_config
    out = exported["out"]
    path, looked = find_vq(out, export_config(out))
    assert path == os.path.join(out, "vq", "vq.safetensors") and looked == [path]
    codec = VQCodec(path)
    np.testing.assert_array_equal(codec.decode(exported["codes"]), exported["ref"]["decoded"])
    np.testing.assert_array_equal(codec.encode(exported["imgs"]), exported["ref"]["encoded"])


def _generate(**flag_values):
    from absl import flags

    from uvjax import generate
    F = flags.FLAGS
    F(["generate"] + [f"--{k}={v}" for k, v in flag_values.items()])
    try:
        generate.main(["generate"])
    finally:
        F.unparse_flags()


def test_generate_runs_from_the_export_alone(exported, tmp_path):
    out = exported["out"]
    png = str(tmp_path / "gen.png")
    _generate(workdir=out, prompt=PROMPT, out=png, max_new_tokens=56, seed=1)
    img = Image.open(png)
    assert img.size == (32, 32) and img.mode == "RGB"
    meta = json.load(open(str(tmp_path / "gen.json")))
    assert meta["workdir"] == out and meta["vq"] == os.path.join(out, "vq", "vq.safetensors") and meta["step"] == 2
    assert meta["image_tokens"] == 16 and len(meta["results"][0]["codes"][0]) == 16
    # image question: an input PNG of another size is resized to the VQ's 32 px and encoded by the export's VQ
    q = str(tmp_path / "in.png")
    Image.fromarray(_images(1, 48, 3)[0]).save(q)
    _generate(workdir=out, image=q, question="what time is it?", out=str(tmp_path / "vqa"), max_new_tokens=8)
    res = json.load(open(str(tmp_path / "vqa" / "generations.json")))["results"][0]
    assert isinstance(res["text"], str) and res["images"] == [] and res["question"] == "what time is it?"


def test_tower_is_copied_and_referenced_relative(tmp_path):
    """A feature run's tower (here a uvjax tower file, as the siglip stage writes) goes into ``tower/`` and the
    config's ``towers.siglip.path`` points there; the copy loads as the original's encoder."""
    import ml_collections as mlc

    from uvjax import pretokenise as pt
    from uvjax.towers import encoders
    from uvjax.models.siglip import ViT, ViTConfig
    from uvjax.weights.export import copy_tower, portable_config
    from uvjax.weights.hf_siglip import save_vit
    vcfg = ViTConfig(image_size=32, patch_size=16, width=16, depth=2, heads=2, mlp=32)
    params = ViT(vcfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    src = tmp_path / "stage"
    src.mkdir()
    save_vit(params, vcfg, str(src / "siglip.safetensors"))
    out = tmp_path / "export"
    rel = copy_tower(str(src), str(out))
    assert rel == "tower/siglip.safetensors"
    cfg = mlc.ConfigDict({"towers": {"siglip": {"path": str(src), "select_layer": -2}},
                          "data": {"tokenizer": "/abs/tok"}, "model": {"pretrained": {"path": "rel/llm"}}})
    d, originals, relative = portable_config(cfg, tower={"kind": "siglip", "path": rel})
    assert d["towers"]["siglip"]["path"] == rel and originals["towers"]["siglip"]["path"] == str(src)
    assert d["model"]["pretrained"]["path"] == "" and originals["model"]["pretrained"]["path"] == "rel/llm"
    assert set(relative) == {"towers.siglip.path", "data.tokenizer"}
    imgs = _images(2, 32, 1)
    a = encoders.tower_encoder(str(src / "siglip.safetensors")).encode(imgs)
    b = encoders.tower_encoder(str(out / rel)).encode(imgs)
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


@pytest.mark.parametrize("text,want", [
    ("5GB", 5 * 10 ** 9), ("5GiB", 5 * 2 ** 30), ("200MB", 200_000_000), ("64KiB", 65_536), ("64KB", 64_000),
    ("1TB", 10 ** 12), ("2MiB", 2_097_152), ("12345", 12_345), (4096, 4096), ("1.5GB", 1_500_000_000),
    ("5gib", 5 * 2 ** 30), (" 10 MB ", 10_000_000)])
def test_max_shard_size_reads_units_as_hugging_face(text, want):
    from uvjax.weights.export import parse_size
    assert parse_size(text) == want
    if text in HF_SAME:  # the same reading as transformers' own parser (which takes no decimals, TB or spaces)
        transformers_hub = pytest.importorskip("transformers.utils.hub")
        assert transformers_hub.convert_file_size_to_int(text) == want


@pytest.mark.parametrize("bad", ["5XB", "five GB", "5Gb", "-1MB", "0", ""])
def test_bad_max_shard_size_names_the_flag(bad, tmp_path, capsys):
    from uvjax.export import main
    from uvjax.weights.export import parse_size
    with pytest.raises(ValueError, match="max_shard_size="):
        parse_size(bad)
    with pytest.raises(SystemExit):
        main([f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}", f"--max_shard_size={bad}"])
    assert "argument --max_shard_size: --max_shard_size=" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_an_export_without_its_config_is_refused_clearly(tmp_path):
    from uvjax.inference.loading import load_trained
    (tmp_path / "uvjax_image_modules.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="export without uvjax_config.json"):
        load_trained(str(tmp_path))
    (tmp_path / "uvjax_config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(ValueError, match="no 'export' section"):
        load_trained(str(tmp_path))
