"""Standard FID (uvjax/evaluation/inception.py) against pytorch-fid 0.3.0 as the independent reference.

pytorch-fid's own ``InceptionV3(use_fid_inception=True)`` is built with *random* weights: its loader
(``load_state_dict_from_url``, which would download the release file) is replaced by one that reads a
random state dict in the release file's format, saved in tmp_path. Our converter reads the same file.
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uvjax.evaluation import inception as inc
from uvjax.evaluation import metrics

N_IMAGES = 2  # InceptionV3 at 299 px on a 2-core CPU: keep the batch small


def _pytorch_fid():
    """``pytorch_fid.inception`` and ``pytorch_fid.fid_score`` (torchvision made importable by
    ``benchmarks.torch_compat``, see there)."""
    from benchmarks.torch_compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    import pytorch_fid.fid_score as fs
    import pytorch_fid.inception as pfi
    return pfi, fs


def _random_fid_state_dict(pfi) -> dict:
    """A state dict in the release file's format (the full FID Inception, fc 1008 included) with
    random weights: He-normal convolutions and non-trivial BatchNorm statistics, so activations keep
    their scale through the ~95 layers and every leaf matters."""
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return net.state_dict()


def _images() -> np.ndarray:
    """A rendered Smart Watch face and uniform noise, 128 px uint8 (upsampled to 299 by both sides)."""
    from uvjax.data import smartwatch as sw
    rng = np.random.default_rng(0)
    watch = sw.render(sw.sample_attributes(rng), 128)
    noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    return np.stack([watch, noise])[:N_IMAGES]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's OpenMP pool spins next to XLA's threads on a busy 2-core machine
    try:
        yield _reference(tmp_path_factory)
    finally:
        torch.set_num_threads(n_threads)


def _reference(tmp_path_factory) -> dict:
    pfi, fs = _pytorch_fid()
    d = tmp_path_factory.mktemp("fid")
    pth = str(d / inc.FID_WEIGHTS_FILE)
    torch.save(_random_fid_state_dict(pfi), pth)
    urls = []

    def offline_loader(url, progress=True, **kw):  # instead of the download
        urls.append(url)
        return torch.load(pth, map_location="cpu", weights_only=True)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", offline_loader)
        net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True).eval()
    assert urls == [pfi.FID_WEIGHTS_URL] and pfi.FID_WEIGHTS_URL == inc.FID_WEIGHTS_URL
    images = _images()
    with torch.no_grad():  # what pytorch-fid's get_activations does with ToTensor'd images
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        feats = net(x)[0].squeeze(3).squeeze(2).numpy()
    extractor = inc.InceptionFID.load(pth, batch_size=N_IMAGES)
    return dict(pfi=pfi, fs=fs, pth=pth, dir=d, net=net, images=images, feats=feats, extractor=extractor)


def test_features_match_pytorch_fid(ref):
    ours = ref["extractor"].features(ref["images"])
    theirs = ref["feats"]
    assert ours.shape == theirs.shape == (N_IMAGES, 2048) and ours.dtype == np.float32
    scale = np.abs(theirs).max()
    assert scale > 0.1 and theirs.std() > 0.1  # random weights that still give live features
    err = np.abs(ours - theirs)
    print(f"\nmax abs diff {err.max():.3g}, max diff / max |feature| {err.max() / scale:.3g}, "
          f"relative L2 {np.linalg.norm(ours - theirs) / np.linalg.norm(theirs):.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)
    # the two images differ, so a swapped or collapsed batch would fail
    assert np.abs(theirs[0] - theirs[1]).max() > 1e3 * err.max()
    # floats in [0, 1] are the same input as uint8 / 255
    np.testing.assert_allclose(ref["extractor"].features(ref["images"] / 255.0), ours, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("hw", [(128, 128), (64, 200), (512, 400), (299, 299)])
def test_resize_matches_torch_interpolate(hw):
    x = np.random.default_rng(1).random((2, *hw, 3), dtype=np.float32)
    theirs = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1).numpy()  # shrinking too: no antialias
    ours = np.asarray(inc.resize_bilinear(x, 299, 299))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=3e-7)  # float32 rounding only


def test_wrapper_state_dict_converts_like_the_release_format(ref):
    release = inc.load_weights(ref["pth"])
    wrapper = inc.convert_state_dict(ref["net"].state_dict(), "wrapper")  # blocks.i.j.<...> keys
    assert sorted(release) == sorted(wrapper) == sorted(inc.param_shapes())
    for k in release:
        np.testing.assert_array_equal(release[k], wrapper[k])


def test_convert_cli_safetensors_and_npz_round_trip_without_torch(ref, tmp_path, monkeypatch, capsys):
    release = inc.load_weights(ref["pth"])
    st, npz = str(tmp_path / "inception_fid.safetensors"), str(tmp_path / "inception_fid.npz")
    inc.main(["--convert", ref["pth"], "--out", st])
    assert "wrote" in capsys.readouterr().out
    inc.main(["--convert", st, "--out", npz])
    from safetensors import safe_open
    with safe_open(st, framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == inc.FORMAT and meta["source"] == inc.FID_WEIGHTS_FILE
    assert meta["source_sha256"] == inc.file_sha256(ref["pth"])
    monkeypatch.setitem(sys.modules, "torch", None)  # torch is not needed for the converted files
    for path in (st, npz):
        got = inc.load_weights(path)
        assert sorted(got) == sorted(release)
        for k in release:
            np.testing.assert_array_equal(got[k], release[k])
    with pytest.raises(ImportError, match="--convert"):
        inc.load_weights(ref["pth"])
    # a .safetensors export of the torch state dict itself (torch keys) is read too
    monkeypatch.delitem(sys.modules, "torch")
    from safetensors.numpy import save_file
    sd = {k: v.numpy() for k, v in torch.load(ref["pth"], weights_only=True).items()}
    save_file(sd, str(tmp_path / "torch_keys.safetensors"))
    got = inc.load_weights(str(tmp_path / "torch_keys.safetensors"))
    np.testing.assert_array_equal(got["Mixed_7c/branch_pool/conv/kernel"], release["Mixed_7c/branch_pool/conv/kernel"])


def test_errors_name_the_file_and_the_key(ref, tmp_path):
    sd = {k: v.numpy() for k, v in torch.load(ref["pth"], weights_only=True).items()}
    key = "Mixed_6b.branch7x7_2.conv.weight"
    path = str(tmp_path / "broken.npz")
    np.savez(path, **{k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=rf"broken\.npz.*missing 1 of .*{key}"):
        inc.load_weights(path)
    bad = dict(sd, **{key: sd[key][:, :, :, :3]})
    with pytest.raises(ValueError, match=rf"<sd>: key '{key}' has shape \(128, 128, 1, 3\), expected \(128, 128, 1, 7\)"):
        inc.convert_state_dict(bad, "<sd>")
    with pytest.raises(ValueError, match="torchvision's ImageNet"):
        inc.convert_state_dict(dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)}), "<sd>")
    with pytest.raises(ValueError, match="does not have.*extra.weight"):
        inc.convert_state_dict(dict(sd, **{"extra.weight": np.zeros(3, np.float32)}), "<sd>")
    flat = inc.load_weights(ref["pth"])
    flat.pop("Conv2d_1a_3x3/bn/var")
    with pytest.raises(ValueError, match="Conv2d_1a_3x3/bn/var"):
        inc.save_weights(flat, str(tmp_path / "x.safetensors"))
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth.*docs/WEIGHTS.md"):
        inc.load_weights(missing)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a readable torch state dict"):
        inc.load_weights(str(tmp_path / "junk.pth"))
    with pytest.raises(SystemExit, match="nope.pth"):
        inc.main(["--convert", missing, "--out", str(tmp_path / "o.safetensors")])


def _scipy_fid(a, b):
    """The textbook float64 formula with scipy.linalg.sqrtm (real part)."""
    from scipy import linalg
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root).real)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # pytorch-fid's sqrtm call
@pytest.mark.parametrize("n,m,d", [(80, 60, 12),   # full-rank covariances: the D x D path
                                   (20, 15, 48)])  # N, M < D (as with 2048-d features): the sample-space path
def test_fid_matches_scipy_sqrtm_and_pytorch_fid(ref, n, m, d):
    rng = np.random.default_rng([n, d])
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    a = rng.normal(size=(n, d)) @ mix
    b = (rng.normal(size=(m, d)) * 1.5 + 0.3) @ mix
    want = _scipy_fid(a, b)
    fs = ref["fs"]
    theirs = fs.calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert want > 1.0
    assert metrics.frechet_distance(a, b) == pytest.approx(want, rel=1e-7)
    assert float(theirs) == pytest.approx(want, rel=1e-6)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * want)
    assert metrics.frechet_distance(b, a) == pytest.approx(want, rel=1e-7)


def test_fid_report_and_the_evaluation_report(ref):
    from uvjax.config import base_config
    from uvjax.evaluation.run import FID_OFF, inception_extractor
    from uvjax.evaluation.report import flat_metrics, format_table
    ex = ref["extractor"]
    real = np.concatenate([ref["images"], ref["images"][:, ::-1]])  # 4 images: two halves of 2
    gen = ref["images"][:, :, ::-1]
    rep = inc.fid_report(ex, gen, real)
    f_real, f_gen = ex.features(real), ex.features(gen)
    assert rep["n"] == 2 and rep["n_real"] == 4 and rep["n_half"] == 2 and rep["weights"] == os.path.abspath(ref["pth"])
    # the formula is checked against scipy above (sqrtm of 2048 x 2048 is minutes on 2 cores): here, the wiring
    assert rep["generated_vs_real"] == metrics.frechet_distance(f_gen, f_real) > 0
    assert rep["real_vs_real"] == metrics.frechet_distance(f_real[:2], f_real[2:]) > 0
    assert inc.fid_report(ex, real, real)["generated_vs_real"] == pytest.approx(0.0, abs=1e-6 * rep["generated_vs_real"])
    # the config key: "" (default) is off; a path loads (cached) weights
    cfg = base_config()
    assert cfg.stages.evaluate.inception_path == "" and inception_extractor(cfg) is None
    with cfg.unlocked():
        cfg.stages.evaluate.inception_path = ref["pth"]
    loaded = inception_extractor(cfg)
    assert loaded is inception_extractor(ref["pth"]) and loaded.source == os.path.abspath(ref["pth"])
    assert inception_extractor(ex) is ex
    # what evaluate_run puts in the report: JSON, table, flat metrics
    report = {"workdir": "w", "step": 3, "split": {"num_images": 4}, "timing": {},
              "generation": {"n": 2, "images_generated": 1.0, "fid_inception": rep}}
    table = format_table(report)
    assert f"generated-real {rep['generated_vs_real']:.2f}, real-real floor {rep['real_vs_real']:.2f}" in table
    flat = flat_metrics(report)
    assert flat["eval/gen/fid_inception"] == rep["generated_vs_real"]
    assert flat["eval/gen/fid_inception_floor"] == rep["real_vs_real"]
    report["generation"]["fid_inception"] = FID_OFF
    assert "--inception_weights" in format_table(report) and "eval/gen/fid_inception" not in flat_metrics(report)
