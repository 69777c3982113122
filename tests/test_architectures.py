"""The four architectures (VQ-VQ, SigLIP-VQ, SigLIP-SigLIP, VQ-SigLIP) train from pre-tokenised records:
each config's image kinds/adapters/loss, the real pipeline (ArrayRecord -> grain -> packed batch) over tiny
synthetic records whose user/assistant images are codes or features as the architecture wants, then 5
steps on one fixed batch with both loss terms finite and decreasing."""
import os

import jax
import numpy as np
import pytest

from uvjax.config import load_config_file, model_config, validate
from uvjax.data import smartwatch as sw
from uvjax.data import storage
from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT
from uvjax.data.records import Record, Segment
from uvjax.data.tokenizer import template_texts, train_bpe

ARCHS = {"vqvq": ("codes", "codes"), "siglipvq": ("features", "codes"),
         "siglipsiglip": ("features", "features"), "vqsiglip": ("codes", "features")}
N_TOKENS, NUM_CODES, FEATURE_DIM = 8, 24, 16


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    spec = sw.SmartWatchSpec(name="t", seed=0, num_images=40, image_size=16)
    tok = train_bpe(list(sw.corpus_texts(spec, num_images=100)) + template_texts(), vocab_size=400)
    d = str(tmp_path_factory.mktemp("tok"))
    tok.save(d)
    return d, tok.vocab_size


def _image(kind: str, role: str, attrs: dict):
    """Deterministic in the attributes (so there is something to learn), no tower needed."""
    rng = np.random.default_rng([attrs["hour"], attrs["minute"], attrs["battery"], role == "user"])
    if kind == "codes":
        return {"codes": rng.integers(0, NUM_CODES, N_TOKENS).astype(np.int32)}
    return {"features": rng.normal(size=(N_TOKENS, FEATURE_DIM)).astype(np.float16)}


def _write_dataset(root: str, kinds: tuple[str, str], num_images: int = 12) -> dict:
    spec = sw.SmartWatchSpec(name="train", seed=1, num_images=num_images, image_size=16)
    streams = {"understanding": [], "generation": []}
    for i in range(num_images):
        attrs, recs = sw.records_for_image(i, spec)
        for r in recs:
            segs = [Segment(s.role, s.kind, text=s.text) if s.kind == "text" else
                    Segment(s.role, "image", **_image(kinds[s.role == "assistant"], s.role, attrs))
                    for s in r.segments]
            streams[sw.stream_of(r)].append(Record(r.id, r.task, segs, r.attributes))
    paths = {}
    for name, recs in streams.items():
        d = os.path.join(root, name)
        os.makedirs(d)
        storage.write_records(recs, d, "part", records_per_shard=100)
        paths[name] = d
    return paths


def _config(arch: str, tok_dir: str, vocab: int, paths: dict):
    c = load_config_file(arch, "smoke")
    m = c.model
    m.vocab_size, m.hidden, m.layers, m.heads, m.kv_heads, m.intermediate = vocab, 32, 1, 4, 2, 64
    m.image.num_codes, m.image.code_dim = NUM_CODES, 8
    if "features" in (m.image.input_kind, m.image.output_kind):
        m.image.feature_dim = FEATURE_DIM
    c.data.tokenizer = tok_dir
    c.data.image_tokens = N_TOKENS
    for s in ("understanding", "generation"):
        c.data.streams[s].paths = (paths[s],)
    c.train.batch_size, c.train.seq_len, c.train.steps = 4, 160, 5
    c.optim.lr, c.optim.warmup_steps = 3e-3, 1
    c.stages.build = False
    validate(c)
    return c


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_trains_from_pretokenised_records(arch, tokenizer_dir, tmp_path):
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.data_feed import build_data_iterator
    from uvjax.training.sharding import global_batch_from_local, make_mesh
    from uvjax.training.step import create_trainer, make_train_step
    kin, kout = ARCHS[arch]
    tok_dir, vocab = tokenizer_dir
    cfg = _config(arch, tok_dir, vocab, _write_dataset(str(tmp_path), (kin, kout)))
    im = cfg.model.image
    assert (im.input_kind, im.output_kind) == (kin, kout)
    assert not im.share_adapters  # separate adapters unless asked
    assert im.und_adapter == ("mlp2x_gelu" if kin == "features" else "linear")
    assert im.gen_adapter == ("mlp2x_gelu" if kout == "features" else "linear")
    assert (cfg.loss.image_loss, cfg.loss.w_image) == (("cosine", 1.0) if kout == "features" else ("ce", 0.2))

    it = build_data_iterator(cfg, str(tmp_path), int(cfg.train.batch_size))
    batch = next(it)
    it.close()
    assert (batch["modality"] == IMAGE_IN).any() and (batch["modality"] == IMAGE_OUT).any()
    assert ("features" in batch) == ("features" in (kin, kout))
    if "features" in batch:  # feature rows exactly where the continuous images are
        cont = [IMAGE_IN] * (kin == "features") + [IMAGE_OUT] * (kout == "features")
        has = np.abs(batch["features"]).sum(-1) > 0
        np.testing.assert_array_equal(has, np.isin(batch["modality"], cont))

    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    trainer, state = create_trainer(UnifiedModel(model_config(cfg).validate()), cfg, mesh, cfg.sharding.rules)
    step = make_train_step(trainer, batch)
    gb = global_batch_from_local(batch, mesh)
    text, image = [], []
    for _ in range(5):
        state, m = step(state, gb)
        text.append(float(m["loss/text"]))
        image.append(float(m["loss/image"]))
    assert np.isfinite(text).all() and np.isfinite(image).all(), (text, image)
    assert text[-1] < text[0] and image[-1] < image[0], (arch, text, image)
