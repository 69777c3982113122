"""The notebook API (``uvjax.load``): answers equal a greedy full-forward reference, images are the VQ's decoding of
the generator's codes, inputs of every kind agree, the CLI goes through the same path, and bad input is named."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = 16  # pixels; the VQ below downsamples by 4: a 4x4 grid = the dataset's 16 codes per image


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """A 4-step smoke run on code records + a randomly initialised VQ of the same codebook in ``<run>/vq``."""
    from configs.vqvq import get_config
    from datasets import make_code_dataset
    from uvjax.models.vq import VQConfig, VQModel
    from uvjax.train import run
    from uvjax.weights.llamagen_vq import save_vq
    root = tmp_path_factory.mktemp("apirun")
    ds = make_code_dataset(str(root / "data"), num_images=24, image_tokens=16, num_codes=64)
    cfg = get_config("smoke")
    with cfg.unlocked():
        if "stages" in cfg:
            cfg.stages.build = False
            cfg.stages.data.image_size = IMAGE
        cfg.data.tokenizer = ds["tokenizer"]
        cfg.data.streams.understanding.paths = (ds["paths"]["understanding"],)
        cfg.data.streams.generation.paths = (ds["paths"]["generation"],)
        cfg.train.steps, cfg.train.progress, cfg.train.async_checkpoint = 4, False, False
    wd = str(root / "run")
    run(cfg, wd)
    vcfg = VQConfig(ch=8, ch_mult=(1, 1, 2), enc_res_blocks=1, dec_res_blocks=1, z_channels=8, codebook_size=64,
                    code_dim=8, attn_last_level=False, mid_attn=False, norm_groups=4)
    params = VQModel(vcfg).init(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
    os.makedirs(os.path.join(wd, "vq"))
    save_vq(jax.device_get(params), vcfg, os.path.join(wd, "vq", "vq.safetensors"))
    with open(os.path.join(wd, "vq", "vq_config.json"), "w") as f:
        json.dump({"data": {"image_size": IMAGE}}, f)
    return wd


@pytest.fixture(scope="module")
def model(api_run):
    import uvjax
    return uvjax.load(api_run)


def _watch(i: int, size: int = 40) -> tuple[np.ndarray, dict]:
    from uvjax.data import smartwatch as sw
    attrs, _ = sw.records_for_image(i, sw.SmartWatchSpec("test", 0, 8, 10**9, size))
    return sw.render(attrs, size), attrs


def _greedy_reference(m, record, max_new: int) -> str:
    """Greedy text by a full re-forward of the growing sequence (no KV cache, no padding): the rules of a
    text-only answer — ``<boi>``/``<eoi>`` never sampled (no image budget), stop at eos / ``<|im_end|>``."""
    from uvjax.data.arrays import TEXT
    from uvjax.inference.decode import encode_prompt
    from uvjax.models.unified import UnifiedModel
    p = encode_prompt(record, m.tokenizer, m._p.template)
    toks, mod = list(p["tokens"]), list(p["modality"])
    tok = m.tokenizer
    v, net = m.loaded.variables, m.loaded.model
    out = []
    for _ in range(max_new):
        n = len(toks)
        b = {"tokens": jnp.asarray([toks], jnp.int32), "modality": jnp.asarray([mod], jnp.int32),
             "segment_ids": jnp.ones((1, n), jnp.int32), "positions": jnp.arange(n)[None]}
        h = net.apply(v, b)[0, n - 1]
        logits = np.array(net.apply(v, h, method=UnifiedModel.text_logits), np.float64)
        logits[[tok.boi_id, tok.eoi_id]] = -np.inf
        t = int(np.argmax(logits))
        if t in (tok.eos_id, tok.im_end_id):
            break
        out.append(t)
        toks.append(t)
        mod.append(TEXT)
    return tok.decode(out).strip()


def test_answers_equal_a_greedy_full_forward_reference(model):
    from uvjax.data.records import Record, Segment
    assert model.image_size == IMAGE and model.image_tokens == 16 and model.can_generate
    images = [_watch(i)[0] for i in range(3)]
    questions = ["What is the weather?", "Which icon is in the top-left corner?", "What is the battery level?"]
    got = model.answer_batch(images, questions, max_new_tokens=12)
    for img, q, a in zip(images, questions, got):
        rec = Record("r", "vqa", [model._image_segment(img), Segment("user", "text", text=q)])
        assert a == _greedy_reference(model, rec, 12), q
    assert model.answer(images[1], questions[1], max_new_tokens=12) == got[1]  # batch-independent


def test_a_path_a_pil_image_and_an_array_are_the_same_input(model, tmp_path):
    img, _ = _watch(5, size=48)
    p = tmp_path / "w.png"
    Image.fromarray(img).save(p)
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], -1)
    codes = [model._image_segment(x).codes for x in (str(p), Image.fromarray(img), img, rgba)]
    for c in codes[1:]:
        np.testing.assert_array_equal(c, codes[0])
    # the codes are the VQ's encoding of the run's resize rule applied to the pixels (uvjax.pretokenise)
    from uvjax import pretokenise as pt
    from uvjax.data import images as image_io
    np.testing.assert_array_equal(codes[0], model.codec.encode(image_io.preprocess(img, IMAGE, "center_crop")[None])[0])
    with pytest.raises(ValueError, match=r"expected uint8 \[H, W, 3\]"):
        model.answer(img.astype(np.float32), "What is the weather?")
    with pytest.raises(ValueError, match="nope.png"):
        model.answer(str(tmp_path / "nope.png"), "What is the weather?")


def test_generated_images_are_the_vq_decoding_of_the_generators_codes(model):
    from uvjax import api
    from uvjax.data.records import Record, Segment
    from uvjax.inference.decode import DecodeSettings, encode_prompt
    prompt = "A watch with a sunny icon in the top-left corner."
    a = model.generate(prompt, n=2, seed=3)
    assert len(a) == 2 and all(im.size == (IMAGE, IMAGE) and im.mode == "RGB" for im in a)
    b = model.generate(prompt, n=2, seed=3)
    assert all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(a, b))  # same seed, same images
    # the reference: the generator called directly with the evaluation's settings, decoded by the VQ
    s = DecodeSettings(max_new_tokens=api.T2I_TEXT_BUDGET + 18, image_tokens=16, max_images=1,
                       force_image_within=api.T2I_FORCE_WITHIN)
    rec = Record("p", "generation", [Segment("user", "text", text=prompt)])
    p = encode_prompt(rec, model.tokenizer, model._p.template)
    out = model._p.generator.generate([p, p], s, seed=3)
    codes = np.stack([out.images(r, model._p.ids)[0] for r in range(2)])
    want = model.codec.decode(codes)
    for im, w in zip(a, want):
        np.testing.assert_array_equal(np.asarray(im), w)
    c = model.generate(prompt, n=2, seed=4)
    assert any((np.asarray(x) != np.asarray(y)).any() for x, y in zip(a, c))
    g = model.generate(prompt, n=2, seed=3, cfg_scale=3.0)  # guidance's numbers: tests/test_decode.py
    assert [im.size for im in g] == [(IMAGE, IMAGE)] * 2
    assert [[np.asarray(i).tolist() for i in row] for row in model.generate_batch([prompt, "rain"], n=2, seed=3)][0] \
        == [np.asarray(i).tolist() for i in a]


def test_chat_returns_the_generators_parts_in_order(model):
    """chat = the generator's row split into text and image parts (text decoded, codes through the VQ), with a
    budget of ``max_new_tokens`` text tokens plus room for ``max_images`` images."""
    from PIL import Image as PILImage
    from uvjax.data.records import Record, Segment
    from uvjax.inference.decode import DecodeSettings, encode_prompt
    prompt = "Draw a watch with a cloudy icon."
    parts = model.chat(prompt, max_new_tokens=8, max_images=1, seed=1, image_temperature=0.0)
    s = DecodeSettings(max_new_tokens=8 + 18, image_tokens=16, image_temperature=0.0, max_images=1)
    p = encode_prompt(Record("c", "interleaved", [Segment("user", "text", text=prompt)]), model.tokenizer,
                      model._p.template)
    out = model._p.generator.generate([p], s, seed=1)
    want = []
    for part in out.parts(0, model._p.ids):
        if part["kind"] == "text" and model.tokenizer.decode(part["ids"]).strip():
            want.append(model.tokenizer.decode(part["ids"]).strip())
        elif part["kind"] == "image" and len(part["codes"]) == 16:
            want.append(model.codec.decode(part["codes"][None])[0])
    assert len(parts) == len(want)
    for got, w in zip(parts, want):
        if isinstance(w, str):
            assert got == w
        else:
            assert isinstance(got, PILImage.Image) and got.size == (IMAGE, IMAGE)
            np.testing.assert_array_equal(np.asarray(got), w)
    img, _ = _watch(2)
    assert all(isinstance(x, str) for x in model.chat("What is the weather?", image=img, max_new_tokens=8,
                                                       max_images=0))


def test_uvjax_load_is_lazy_and_a_run_without_vq_is_named(api_run, tmp_path):
    code = "import sys, uvjax; assert 'jax' not in sys.modules; from uvjax import api; assert uvjax.load is api.load"
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(tmp_path))
    import shutil
    import uvjax
    bare = str(tmp_path / "bare")
    shutil.copytree(api_run, bare, ignore=shutil.ignore_patterns("vq"))
    m = uvjax.load(bare)
    assert m.codec is None and not m.can_generate and m.image_size == 0
    with pytest.raises(ValueError, match="no VQ tokenizer"):
        m.generate("a watch")
    with pytest.raises(ValueError, match="no VQ tokenizer"):
        m.answer(np.zeros((8, 8, 3), np.uint8), "What is the weather?")


def test_the_generate_command_goes_through_the_api(api_run, model, tmp_path):
    img, _ = _watch(1)
    Image.fromarray(img).save(tmp_path / "w.png")
    env = {**os.environ, "PYTHONPATH": REPO}
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "uvjax.generate", f"--workdir={api_run}", f"--image={tmp_path / 'w.png'}",
                    "--question=What is the weather?", f"--out={out}", "--max_new_tokens=12"],
                   check=True, env=env, cwd=str(tmp_path), capture_output=True)
    res = json.loads((out / "generations.json").read_text())["results"][0]
    assert res["text"] == model.answer(str(tmp_path / "w.png"), "What is the weather?", max_new_tokens=12)
    subprocess.run([sys.executable, "-m", "uvjax.generate", f"--workdir={api_run}", "--prompt=a watch",
                    f"--out={tmp_path / 'g.png'}"], check=True, env=env, cwd=str(tmp_path), capture_output=True)
    assert Image.open(tmp_path / "g.png").size == (IMAGE, IMAGE)


def test_an_export_directory_answers_and_draws_as_its_run(api_run, model, tmp_path):
    """``uvjax.load(EXPORT)`` — the run moved away — gives the run's answers and images (same seed)."""
    import shutil
    import uvjax
    from uvjax.export import export_run
    out = str(tmp_path / "export")
    export_run(api_run, out)
    img, _ = _watch(3)
    want_answer = model.answer(img, "What is the weather?", max_new_tokens=12)
    want_images = model.generate("a watch", n=2, seed=5)
    moved = str(tmp_path / "moved")
    shutil.copytree(api_run, moved)
    shutil.rmtree(api_run)
    try:
        exp = uvjax.load(out)
        assert exp.step == model.step and exp.image_size == IMAGE and exp.can_generate
        assert exp.answer(img, "What is the weather?", max_new_tokens=12) == want_answer
        for a, b in zip(exp.generate("a watch", n=2, seed=5), want_images):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        shutil.copytree(moved, api_run)
