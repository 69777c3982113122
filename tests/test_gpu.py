"""GPU-only checks (the cuDNN attention path); skipped on CPU-only machines such as CI.

Run on a GPU with ``JAX_PLATFORMS=cuda python -m pytest -q tests/test_gpu.py``. The CPU half of the
attention option (validation, fingerprint) is tested in test_config.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from uvjax.config import lora_preset, model_config
from uvjax.models.unified import UnifiedModel
from uvjax.training.step import dummy_batch

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (cuDNN attention)")


def _model(attention: str, dtype: str):
    # head dim 64 (cuDNN's fused kernels need a multiple of 8), GQA 4 query heads on 2 kv heads
    c = tiny_config(**{"model.hidden": 256, "model.heads": 4, "model.kv_heads": 2, "model.intermediate": 512,
                       "model.dtype": dtype, "model.attention": attention})
    lora_preset(c, 4, 8.0)
    return UnifiedModel(model_config(c).validate())


def test_cudnn_attention_matches_xla_and_float32_on_packed_segments():
    import flax.linen as nn
    fp32 = _model("xla", "float32")
    xla, cudnn = _model("xla", "bfloat16"), _model("cudnn", "bfloat16")
    v = nn.unbox(fp32.init({"params": jax.random.key(0)}, dummy_batch(0), method=UnifiedModel.init_all))
    batch = random_batch(np.random.default_rng(0), 4, 256, 24, 96)
    assert batch["segment_ids"].max() >= 3  # several packed segments per row: the mask matters
    b = {k: jnp.asarray(x) for k, x in batch.items()}
    ref = np.asarray(fp32.apply(v, b), np.float64)
    got_xla = np.asarray(xla.apply(v, b).astype(jnp.float32), np.float64)
    got_cudnn = np.asarray(cudnn.apply(v, b).astype(jnp.float32), np.float64)
    valid = batch["segment_ids"] > 0
    err_xla = np.abs(got_xla - ref)[valid].max()
    err_cudnn = np.abs(got_cudnn - ref)[valid].max()
    scale = np.abs(ref[valid]).max()
    # bf16 has 8 mantissa bits: both bf16 paths sit within a few bf16 ulps of the fp32 forward, and cuDNN
    # is no further from it than XLA's bf16 path (a wrong mask would be off by O(scale)).
    assert err_xla < 0.05 * scale, (err_xla, scale)
    assert err_cudnn < max(2.0 * err_xla, 0.02 * scale), (err_cudnn, err_xla, scale)

    def loss(params, model):
        h = model.apply({**v, "params": params}, b).astype(jnp.float32)
        return jnp.mean(jnp.where(b["segment_ids"][..., None] > 0, h, 0.0) ** 2)

    # gradients: each bf16 path against the fp32 gradient; cuDNN's backward kernel may not add more error
    # than XLA's bf16 backward does (a wrong mask or a dropped term in the backward would)
    def q_grad(model):
        g = jax.grad(loss)(v["params"], model)["decoder"]["layers"]["attn"]["q"]["kernel"]
        return np.asarray(g, np.float64)

    g32, g_xla, g_cudnn = q_grad(fp32), q_grad(xla), q_grad(cudnn)
    rel = lambda g: np.linalg.norm(g - g32) / np.linalg.norm(g32)
    print(f"forward max err / scale: xla {err_xla / scale:.2e}, cudnn {err_cudnn / scale:.2e}; "
          f"grad rel err: xla {rel(g_xla):.3f}, cudnn {rel(g_cudnn):.3f}")
    assert rel(g_xla) < 0.3, rel(g_xla)
    assert rel(g_cudnn) < max(2.0 * rel(g_xla), 0.05), (rel(g_cudnn), rel(g_xla))
