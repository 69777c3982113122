"""SigLIP/CLIP towers: parity with transformers (random init), strict converters, the pretraining
smoke preset, and resumable pre-tokenisation of features (SigLIP-VQ: user -> features, assistant -> codes)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from uvjax.models.siglip import FeatureExtractor, ViT, ViTConfig, clip_l14_336, param_shapes, siglip_b16  # noqa: E402
from uvjax.weights import hf_siglip  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _randomise_norms(model):
    with torch.no_grad():  # HF inits norms to 1/0: randomise so a swapped or skipped norm shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5) if n.endswith("weight") else p.uniform_(-0.5, 0.5)
    return model


def _siglip(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.SiglipVisionConfig(**SMALL, image_size=32, patch_size=8)
    return _randomise_norms(transformers.SiglipVisionModel(cfg).eval())


def _clip(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(**SMALL, image_size=28, patch_size=7)
    return _randomise_norms(transformers.CLIPVisionModel(cfg).eval())


def _compare(hf_model, cfg, params, has_cls):
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(pixel_values=x, output_hidden_states=True)
    xn = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    out = ViT(cfg).apply({"params": params}, xn)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == cfg.depth + 1
    for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, rtol=0, err_msg=f"hidden_states[{i}]")
    feats = np.asarray(ViT(cfg).apply({"params": params}, xn, method=ViT.features))
    want = ref.hidden_states[-2].numpy()[:, 1:] if has_cls else ref.hidden_states[-2].numpy()
    assert feats.shape == (2, cfg.num_patches, cfg.width)  # SigLIP keeps every patch; CLIP drops CLS only
    np.testing.assert_allclose(feats, want, atol=1e-4, rtol=0)
    return out, ref


def test_siglip_parity_with_transformers(tmp_path):
    m = _siglip()
    cfg, params = hf_siglip.convert_hf_vision(m)  # in-memory torch module
    assert (cfg.act, cfg.class_token, cfg.pre_norm, cfg.norm_eps) == ("gelu_tanh", False, False, 1e-6)
    out, ref = _compare(m, cfg, params, has_cls=False)
    np.testing.assert_allclose(np.asarray(out["last"]), ref.last_hidden_state.numpy(), atol=1e-4)
    # the same through the files users have: save_pretrained dir -> config.json + safetensors
    m.save_pretrained(str(tmp_path / "hf"))
    cfg2, params2 = hf_siglip.load_hf_vision(str(tmp_path / "hf"))
    assert cfg2 == cfg
    _compare(m, cfg2, params2, has_cls=False)
    # post-norm option: the LLaVA-OneVision reading (last layer deleted, last_hidden_state read)
    import dataclasses
    pn = dataclasses.replace(cfg, feature_post_norm=True)
    x = jnp.zeros((1, 32, 32, 3)) + 0.3
    f = ViT(pn).apply({"params": params}, x, method=ViT.features)
    h = ViT(cfg).apply({"params": params}, x)["hidden_states"][-2]
    assert not np.allclose(np.asarray(f), np.asarray(h))


def test_full_siglip_model_checkpoint_skips_text_tower_and_head():
    torch.manual_seed(0)
    full = transformers.SiglipModel(transformers.SiglipConfig(
        vision_config=dict(SMALL, image_size=32, patch_size=8),
        text_config=dict(SMALL, vocab_size=50, max_position_embeddings=16))).eval()
    sd = full.state_dict()
    assert any(k.startswith("text_model.") for k in sd) and any(".head." in k for k in sd)
    cfg = hf_siglip.vit_config_from_hf(full.config.to_dict())
    cfg, params = hf_siglip.convert_hf_vision(sd, cfg)
    _compare(full.vision_model, cfg, params, has_cls=False)


def test_clip_parity_with_transformers():
    m = _clip()
    cfg, params = hf_siglip.convert_hf_vision(m)
    assert (cfg.act, cfg.class_token, cfg.pre_norm, cfg.patch_bias) == ("quick_gelu", True, True, False)
    _compare(m, cfg, params, has_cls=True)


def test_converter_reports_missing_unexpected_and_misshaped_keys():
    m = _siglip()
    cfg = hf_siglip.vit_config_from_hf(m.config.to_dict())
    sd = {k: v for k, v in m.state_dict().items()}
    missing = dict(sd)
    del missing["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"target params not filled 1: \['block_1/fc2/bias'\]"):
        hf_siglip.convert_hf_vision(missing, cfg)
    extra = dict(sd, **{"encoder.layers.0.self_attn.rotary.weight": sd["post_layernorm.weight"]})
    with pytest.raises(ValueError, match="unconsumed source keys 1: .*rotary"):
        hf_siglip.convert_hf_vision(extra, cfg)
    deeper = dict(sd, **{"encoder.layers.3.layer_norm1.weight": sd["post_layernorm.weight"]})
    with pytest.raises(ValueError, match="not in this architecture"):
        hf_siglip.convert_hf_vision(deeper, cfg)
    bad = dict(sd, **{"post_layernorm.weight": sd["post_layernorm.weight"][:-1]})
    with pytest.raises(ValueError, match="shape mismatches"):
        hf_siglip.convert_hf_vision(bad, cfg)
    with pytest.raises(ValueError, match="CLIP|clip|unconsumed|not filled"):  # a CLIP dict on a SigLIP config
        hf_siglip.convert_hf_vision(_clip().state_dict(), cfg)
    with pytest.raises(ValueError, match="needs cfg"):
        hf_siglip.convert_hf_vision(sd)


def test_hub_configs_read_with_class_defaults():
    # google/siglip-base-patch16-224's config.json names only the model types (reference §C.1)
    cfg = hf_siglip.vit_config_from_hf({"model_type": "siglip", "vision_config": {}, "text_config": {}})
    assert cfg == siglip_b16() and cfg.feature_tokens == 196
    clip = hf_siglip.vit_config_from_hf({"model_type": "clip_vision_model", "hidden_size": 1024,
                                         "intermediate_size": 4096, "num_hidden_layers": 24,
                                         "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                                         "projection_dim": 768})
    assert clip == clip_l14_336() and clip.feature_tokens == 576
    shapes = param_shapes(siglip_b16())  # B/16 without the MAP head: 85,797,120 params (reference §C.1)
    import jax
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == 85_797_120


def test_pretraining_smoke_writes_a_loadable_tower(tmp_path):
    from uvjax.config import load_config_file
    from uvjax.training.siglip_pretrain import METRICS_FILE, PARAMS_FILE, TWO_TOWER_FILE, train_siglip
    cfg = load_config_file("siglip_pretrain", "smoke")
    _, metrics = train_siglip(cfg, str(tmp_path), progress=False)
    for f in (PARAMS_FILE, TWO_TOWER_FILE, METRICS_FILE):
        assert os.path.exists(tmp_path / f)
    hist = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert np.isfinite(hist).all() and hist[-1] < hist[0]
    ev = json.load(open(tmp_path / METRICS_FILE))["eval"]
    assert ev["n"] == 16 and 0.0 <= ev["i2t_top1"] <= 1.0
    vcfg, params = hf_siglip.load_vit(str(tmp_path / PARAMS_FILE))
    assert vcfg.width == 32 and vcfg.feature_tokens == 16
    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    f = FeatureExtractor(vcfg, params)(imgs)
    assert f.shape == (3, 16, 32) and f.dtype == np.float32 and np.isfinite(f).all()


class _Encoder:
    """Stands in for a tower: a deterministic function of the pixels; counts encoded images."""

    def __init__(self, kind):
        self.kind, self.encoded = kind, 0

    def encode(self, images):
        self.encoded += len(images)
        flat = images.reshape(len(images), 4, -1).astype(np.float32).mean(-1)
        if self.kind == "codes":
            return (flat.astype(np.int64) % 50).astype(np.int32)
        return np.repeat(flat[..., None] / 255.0, 6, -1)  # [B, 4, 6]


def test_feature_pretokenisation_resumes_and_routes_roles(tmp_path):
    from uvjax.data import smartwatch as sw
    from uvjax.data.records import record_from_bytes
    from uvjax.data.storage import RecordReader, expand_paths
    from uvjax.stages.features import pretokenise_split_features
    spec = sw.SmartWatchSpec(name="train", seed=3, num_images=12, image_size=16)
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir(), part.mkdir()

    def run(d):
        enc = {"user": _Encoder("features"), "assistant": _Encoder("codes")}
        counts = pretokenise_split_features(spec, enc, str(d), chunk=5, batch=4)
        return enc, counts
    enc, counts = run(full)
    assert enc["user"].encoded == 12 and enc["assistant"].encoded == 12  # once per image and tower
    run(part)
    os.remove(part / ".train-chunk00001.done")  # a kill during chunk 1: marker and one shard gone
    for f in os.listdir(part):
        if "-c00001" in f and "understanding" in f:
            os.remove(part / f)
    enc2, again = run(part)
    assert again == counts and enc2["user"].encoded == 5 and enc2["assistant"].encoded == 5

    def records(d):
        out = []
        for stream in ("understanding", "generation"):
            r = RecordReader(expand_paths(str(d / f"train-{stream}-*.array_record")))
            out += [record_from_bytes(r.read_bytes(i)) for i in range(len(r))]
        return out
    a, b = records(full), records(part)
    assert [r.id for r in a] == [r.id for r in b]
    for x, y in zip(a, b):
        for sx, sy in zip(x.segments, y.segments):
            if sx.kind != "image":
                continue
            assert sx.pixels is None
            if sx.role == "user":  # understanding input: SigLIP features, stored as float16
                assert sx.codes is None and sx.features.dtype == np.float16 and sx.features.shape == (4, 6)
                np.testing.assert_array_equal(sx.features, sy.features)
            else:  # generation target: VQ codes
                assert sx.features is None and sx.codes.dtype == np.int32
                np.testing.assert_array_equal(sx.codes, sy.codes)
