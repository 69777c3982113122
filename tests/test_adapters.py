"""models/adapters.py and the adapter wiring of models/unified.py against float64 NumPy: LLaVA's
``mlp2x_gelu`` projector (fc1 → exact-erf GELU → fc2), ``linear`` (fc1 only), and ``share_adapters`` (one
adapter embeds understanding inputs and generated outputs: no generation_adapter in the tree, the same
weights on both paths)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from helpers import tiny_config
from uvjax.config import model_config
from uvjax.data.arrays import IMAGE_IN, IMAGE_OUT, TEXT
from uvjax.models.adapters import Adapter
from uvjax.models.unified import UnifiedModel
from uvjax.training.step import dummy_batch


def gelu_erf(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _random_params(shapes, rng, scale=0.7):
    return jax.tree_util.tree_map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def test_mlp2x_gelu_matches_float64_exact_erf_gelu():
    rng = np.random.default_rng(0)
    ad = Adapter("mlp2x_gelu", 24, "code_dim")
    x = (2.0 * rng.standard_normal((5, 7, 8))).astype(np.float32)
    p = _random_params(nn.unbox(ad.init(jax.random.PRNGKey(0), x))["params"], rng)  # biases non-zero too
    assert set(p) == {"fc1", "fc2"} and p["fc1"]["kernel"].shape == (8, 24) and p["fc2"]["kernel"].shape == (24, 24)
    got = np.asarray(ad.apply({"params": p}, x), np.float64)
    f = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in p.items()}
    h = x.astype(np.float64) @ f["fc1"]["kernel"] + f["fc1"]["bias"]
    want = gelu_erf(h) @ f["fc2"]["kernel"] + f["fc2"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    # the tolerance tells the GELU variants apart: the tanh approximation is far outside it
    tanh_version = gelu_tanh(h) @ f["fc2"]["kernel"] + f["fc2"]["bias"]
    assert np.abs(tanh_version - want).max() > 50 * 2e-5


def test_mlp2x_gelu_matches_llava_torch_projector():
    """LLaVA builds it as nn.Sequential(Linear, GELU(), Linear); torch's GELU default is the erf form."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    ad = Adapter("mlp2x_gelu", 16, "features")
    x = rng.standard_normal((3, 12)).astype(np.float32)
    p = _random_params(nn.unbox(ad.init(jax.random.PRNGKey(0), x))["params"], rng)
    seq = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 16)).double()
    with torch.no_grad():
        for i, name in ((0, "fc1"), (2, "fc2")):
            seq[i].weight.copy_(torch.tensor(np.asarray(p[name]["kernel"], np.float64).T))
            seq[i].bias.copy_(torch.tensor(np.asarray(p[name]["bias"], np.float64)))
        want = seq(torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(np.asarray(ad.apply({"params": p}, x), np.float64), want, rtol=1e-5, atol=2e-5)


def test_linear_adapter_is_one_affine_map():
    rng = np.random.default_rng(2)
    ad = Adapter("linear", 16, "code_dim")
    x = rng.standard_normal((4, 8)).astype(np.float32)
    p = _random_params(nn.unbox(ad.init(jax.random.PRNGKey(0), x))["params"], rng)
    assert set(p) == {"fc1"}
    want = x.astype(np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    np.testing.assert_allclose(np.asarray(ad.apply({"params": p}, x)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="adapter kind"):
        Adapter("mlp3x", 16, "code_dim").init(jax.random.PRNGKey(0), x)


# ------------------------------------------------------------------------------------ share_adapters
@functools.cache
def _model(share):
    """The input side only (embed_inputs creates the embedding, codebook and adapters; the decoder is not
    needed here and its init costs seconds)."""
    c = tiny_config(**{"model.image.share_adapters": share, "model.image.und_adapter": "mlp2x_gelu",
                       "model.image.gen_adapter": "mlp2x_gelu"})
    m = UnifiedModel(model_config(c).validate())
    variables = nn.unbox(m.init({"params": jax.random.key(0)}, _batch([1], [2]), method=UnifiedModel.embed_inputs))
    rng = np.random.default_rng(3)
    p = dict(variables["params"])
    for name in ("understanding_adapter", "generation_adapter"):
        if name in p:  # random weights and biases so that two adapters cannot agree by accident
            p[name] = _random_params(p[name], rng, 0.5)
    return m, {**variables, "params": p}


def _np_adapter(p, v):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    h = gelu_erf(v @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _batch(codes_in, codes_out):
    """One row: text, the image input codes, text, the image output codes."""
    toks = [5] + list(codes_in) + [7] + list(codes_out)
    mod = [TEXT] + [IMAGE_IN] * len(codes_in) + [TEXT] + [IMAGE_OUT] * len(codes_out)
    n = len(toks)
    b = dummy_batch(seq=n)
    b["tokens"] = jnp.asarray([toks], jnp.int32)
    b["modality"] = jnp.asarray([mod], jnp.int32)
    b["segment_ids"] = jnp.ones((1, n), jnp.int32)
    b["positions"] = jnp.arange(n, dtype=jnp.int32)[None]
    return b


def test_share_adapters_one_adapter_in_the_tree():
    _, shared = _model(True)
    _, separate = _model(False)
    assert "understanding_adapter" in shared["params"] and "generation_adapter" not in shared["params"]
    assert {"understanding_adapter", "generation_adapter"} <= set(separate["params"])


def test_share_adapters_both_paths_use_the_understanding_weights():
    codes = [3, 11, 0, 23]
    for share in (True, False):
        m, v = _model(share)
        x = np.asarray(m.apply(v, _batch(codes, codes), method=UnifiedModel.embed_inputs), np.float64)[0]
        cb = np.asarray(v["params"]["image_codebook"], np.float64)[codes]
        und = _np_adapter(v["params"]["understanding_adapter"], cb)
        np.testing.assert_allclose(x[1:5], und, rtol=1e-5, atol=1e-5)  # image inputs: understanding adapter
        gen_p = v["params"]["understanding_adapter" if share else "generation_adapter"]
        np.testing.assert_allclose(x[6:10], _np_adapter(gen_p, cb), rtol=1e-5, atol=1e-5)
        # decoding embeds sampled codes through the same adapter as teacher forcing
        e = np.asarray(m.apply(v, jnp.asarray(codes), method=UnifiedModel.embed_generated), np.float64)
        np.testing.assert_allclose(e, _np_adapter(gen_p, cb), rtol=1e-5, atol=1e-5)
        assert np.allclose(x[1:5], x[6:10], atol=1e-5) == share  # the same codes in and out: equal iff shared


def test_share_adapters_gradient_reaches_the_one_adapter_from_outputs():
    """An image *output* position alone trains the shared adapter (it is the generation adapter too)."""
    m, v = _model(True)
    b = _batch([1, 2], [4, 5])
    out_mask = (np.asarray(b["modality"]) == IMAGE_OUT)[..., None]

    def f(p):
        x = m.apply({**v, "params": p}, b, method=UnifiedModel.embed_inputs)
        return jnp.sum(jnp.where(out_mask, x, 0.0) ** 2)

    g = jax.grad(f)(v["params"])["understanding_adapter"]
    assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree_util.tree_leaves(g))


def test_share_adapters_needs_matching_kinds():
    c = tiny_config(**{"model.image.share_adapters": True, "model.image.input_kind": "features",
                       "model.image.feature_dim": 8})
    with pytest.raises(ValueError, match="share_adapters"):
        model_config(c).validate()
