"""Tower preprocessing (uvjax/pretokenise.py ``tower_encoder`` + ``preprocess``, models/siglip.py ``preprocess``)
against transformers' image processors on random images of several shapes.

Tolerances: transformers' PIL-backend processors resize with the same PIL bicubic as uvjax, so their pixel
values must agree exactly (up to float32 rounding of the normalisation). Its default (torchvision) backend
resamples with its own bicubic: the two round to uint8 differently in a few values, so it is held to one
uint8 level (2/255 after SigLIP's (x − 0.5)/0.5; 1/(255·std) for CLIP) in under 2% of values."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from uvjax import pretokenise as pt  # noqa: E402
from uvjax.data import images as image_io
from uvjax.towers import encoders
from uvjax.models import siglip  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SIZE = 32
SHAPES = [(50, 70), (SIZE, SIZE), (20, 45), (100, 100), (64, 17), (33, 29)]


def _pil_processor(model: str, **kw):
    """transformers ≥ 5 splits the PIL backend into ``<Name>ImageProcessorPil``; before, the plain class
    was the PIL one."""
    import importlib
    try:
        mod = importlib.import_module(f"transformers.models.{model}.image_processing_pil_{model}")
        return getattr(mod, {"siglip": "SiglipImageProcessorPil", "clip": "CLIPImageProcessorPil"}[model])(**kw)
    except (ImportError, AttributeError):
        cls = transformers.SiglipImageProcessor if model == "siglip" else transformers.CLIPImageProcessor
        return cls(**kw)


def _hf_pixels(proc, img):
    out = proc(images=img, return_tensors="pt")["pixel_values"][0]
    return out.permute(1, 2, 0).numpy().astype(np.float64)


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SHAPES]


@pytest.fixture(scope="module")
def siglip_tower(tmp_path_factory):
    torch.manual_seed(0)
    m = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
        patch_size=8)).eval()
    d = tmp_path_factory.mktemp("siglip_hf")
    m.save_pretrained(str(d))
    return m, encoders.tower_encoder(str(d), kind="siglip")


def _uvjax_pixels(enc, img):
    """What the feature encoder feeds its tower: the pretokenise resize (the tower's mode), then the
    tower's own normalisation."""
    return siglip.preprocess(image_io.preprocess(img, enc.image_size, enc.resize)[None], enc.tower.cfg)[0].astype(np.float64)


def test_siglip_encoder_uses_squash_and_half_normalisation(siglip_tower):
    _, enc = siglip_tower
    assert (enc.kind, enc.image_size, enc.resize) == ("features", SIZE, "squash")
    assert tuple(enc.tower.cfg.mean) == tuple(enc.tower.cfg.std) == (0.5, 0.5, 0.5)


def test_siglip_pixels_match_hf_pil_processor_exactly(siglip_tower):
    _, enc = siglip_tower
    proc = _pil_processor("siglip", size={"height": SIZE, "width": SIZE})
    for img in _images():
        np.testing.assert_allclose(_uvjax_pixels(enc, img), _hf_pixels(proc, img), rtol=0, atol=1e-6,
                                   err_msg=str(img.shape))


def test_siglip_pixels_match_hf_default_processor_within_one_level(siglip_tower):
    _, enc = siglip_tower
    proc = transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE})
    for img in _images(1):
        d = np.abs(_uvjax_pixels(enc, img) - _hf_pixels(proc, img))
        assert d.max() <= 2 / 255 + 1e-6, (img.shape, d.max())
        assert (d > 1e-5).mean() < 0.02, (img.shape, (d > 1e-5).mean())


def test_siglip_features_match_hf_model_on_hf_pixels(siglip_tower):
    """End to end: uvjax's encoder on a raw image = transformers' model (layer −2 hidden states, every patch)
    on the HF processor's pixel values."""
    m, enc = siglip_tower
    proc = _pil_processor("siglip", size={"height": SIZE, "width": SIZE})
    imgs = _images(2)[:3]
    ours = np.stack([enc.encode(image_io.preprocess(img, enc.image_size, enc.resize)[None])[0] for img in imgs])
    with torch.no_grad():
        pix = torch.stack([proc(images=img, return_tensors="pt")["pixel_values"][0] for img in imgs])
        ref = m(pixel_values=pix, output_hidden_states=True).hidden_states[-2].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def clip_tower(tmp_path_factory):
    torch.manual_seed(0)
    m = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
        patch_size=7)).eval()
    d = tmp_path_factory.mktemp("clip_hf")
    m.save_pretrained(str(d))
    return encoders.tower_encoder(str(d), kind="clip")


@pytest.mark.parametrize("shape", SHAPES)  # (33, 29): the long side floor(size·long/short), not round (a fixed bug)
def test_clip_pixels_match_hf_pil_processor(clip_tower, shape):
    enc = clip_tower
    assert (enc.image_size, enc.resize) == (28, "resize_crop")
    assert tuple(enc.tower.cfg.mean) == pytest.approx(siglip.CLIP_MEAN)
    proc = _pil_processor("clip", size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
    np.testing.assert_allclose(_uvjax_pixels(enc, img), _hf_pixels(proc, img), rtol=0, atol=1e-5)
