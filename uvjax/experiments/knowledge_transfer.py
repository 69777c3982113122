"""Knowledge transfer (2505.23043): can weather knowledge learned from *generation* data reach
*understanding*?

The train understanding records are biased against weather (``stages.data.understanding_keep``: a VQA
turn about weather, or a caption fragment naming it, survives with rate ``ec.weather_keep``; records left
without turns are dropped), while generation records stay complete (their prompts name the weather half of
the time) and the test split is untouched. Arms:

- ``unified``: biased understanding + complete generation;
- ``understanding``: biased understanding only, as many understanding examples as the unified arm.

Metrics: VQA weather accuracy (the transfer), VQA accuracy on all attributes, generation weather accuracy
of the unified arm, and **linear probes** of weather on the trained model's own image representations:
logistic regression (``probe_*``: fit on ``ec.probe.train_images`` rendered images, scored on
``ec.probe.test_images`` test images) on (a) the mean-pooled understanding-adapter inputs (the VQ code
vectors the adapter reads), (b) the same per position, flattened (keeps where the icon is), and (c) the
decoder's last hidden states over the image positions (mean-pooled), i.e. whether weather is linearly
present in the input features and inside the LLM, whatever the text head makes of it.

``python -m uvjax.experiments.knowledge_transfer --config=configs/experiments/knowledge_transfer.py[:quick]``
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from uvjax.data import smartwatch as sw
from uvjax.data.arrays import IMAGE_IN
from uvjax.experiments.arms import Arm, Experiment, Panel, only
from uvjax.experiments.common import main
from uvjax.experiments.runs import load_run_and_vq
from uvjax.models import alignment

PROBE_FEATURES = ("adapter_in_mean", "adapter_in_flat", "llm_hidden_mean")


def arms(ec) -> list[Arm]:
    biased = (("stages.data.understanding_keep", (("weather", float(ec.weather_keep)),)),)
    return [Arm("unified", biased, group="unified", x="unified"),
            Arm("understanding", biased + only("understanding"), group="understanding only",
                x="understanding only", match=("understanding", "unified"), eval_tasks=("vqa",))]


def panels(ec) -> list[Panel]:
    return [Panel("vqa/weather/strict", "VQA weather accuracy (biased attribute)"),
            Panel("vqa/all/strict", "VQA accuracy (all)"),
            Panel("gen/weather/accuracy", "generation weather accuracy (judge)"),
            *[Panel(f"probe/weather/{k}", f"weather probe: {k}") for k in PROBE_FEATURES]]


# ------------------------------------------------------------------------------------------ probe
def logistic_probe(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, *,
                   classes: int, l2: float = 1e-2) -> dict:
    """Multinomial logistic regression (standardised features, L2 penalty, L-BFGS); test accuracy and
    the majority-class baseline."""
    from scipy.optimize import minimize  # slow to import (≈ 0.5 s); only the probe fits anything
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a = np.concatenate([(x_tr - mu) / sd, np.ones((len(x_tr), 1))], 1).astype(np.float64)
    b = np.concatenate([(x_te - mu) / sd, np.ones((len(x_te), 1))], 1).astype(np.float64)
    onehot = np.eye(classes)[y_tr]
    d = a.shape[1]

    def loss(w):
        w = w.reshape(d, classes)
        z = a @ w
        z -= z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        p = np.exp(logp)
        reg = 0.5 * l2 * (w[:-1] ** 2).sum()
        grad = a.T @ (p - onehot) / len(a)
        grad[:-1] += l2 * w[:-1]
        return -(onehot * logp).sum() / len(a) + reg, grad.ravel()

    res = minimize(loss, np.zeros(d * classes), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    w = res.x.reshape(d, classes)
    acc = float(((b @ w).argmax(1) == y_te).mean())
    major = float((y_te == np.bincount(y_tr, minlength=classes).argmax()).mean())
    return {"accuracy": acc, "majority": major, "train_accuracy": float(((a @ w).argmax(1) == y_tr).mean())}


def probe_features(run, codes: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """The three representations of images given as VQ codes [B, N] (see the module doc)."""
    im = run.model.cfg.image
    if im.input_kind != "codes":
        raise ValueError("the knowledge-transfer probe reads VQ code vectors (model.image.input_kind='codes')")
    if run.model.cfg.shared_vocab:  # what enters the model for a code: its row of the text embedding
        emb = np.asarray(run.variables["params"]["embed"]["embedding"], np.float32)
        book = emb[np.asarray(im.code_token_ids)]
    else:
        book = np.asarray(run.variables["params"]["image_codebook"], np.float32)
    vec = book[codes]
    if im.align_strength:
        a, b = alignment.affine(vec.shape[-1], im.align_strength, im.align_seed, im.align_translation)
        vec = vec @ a + b
    apply = jax.jit(lambda v, bt: run.model.apply(v, bt))
    hidden = []
    B = batch  # train and test images share the compiled shape
    for i in range(0, len(codes), B):
        c = codes[i:i + B]
        n, N = c.shape
        c = np.concatenate([c, np.repeat(c[-1:], B - n, 0)]) if n < B else c  # one shape: one compile
        bt = {"tokens": jnp.asarray(c, jnp.int32), "modality": jnp.full((B, N), IMAGE_IN, jnp.int32),
              "segment_ids": jnp.ones((B, N), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(N), (B, N))}
        hidden.append(np.asarray(apply(run.variables, bt), np.float32)[:n].mean(1))
    return {"adapter_in_mean": vec.mean(1), "adapter_in_flat": vec.reshape(len(vec), -1),
            "llm_hidden_mean": np.concatenate(hidden)}


def probe(ec, arm: Arm, run_dir: str, cfg) -> dict:
    run, codec = load_run_and_vq(run_dir, "probe")
    size = int(cfg.stages.data.image_size)
    seed = int(cfg.stages.data.seed)

    def images(start: int, n: int):
        attrs = [sw.records_for_image(start + i, sw.SmartWatchSpec("probe", seed, n, start, 16))[0] for i in range(n)]
        pix = np.stack([sw.render(a, size) for a in attrs])
        codes = np.concatenate([np.asarray(codec.encode(pix[i:i + 64])) for i in range(0, n, 64)])
        return codes.reshape(n, -1), np.array([sw.WEATHERS.index(a["weather"]) for a in attrs])

    # probe training images: a range of indices used by neither the train nor the test split
    c_tr, y_tr = images(2 * 10 ** 9, int(ec.probe.train_images))
    c_te, y_te = images(10 ** 9, int(ec.probe.test_images))  # the test split's images
    f_tr, f_te = probe_features(run, c_tr), probe_features(run, c_te)
    out = {}
    for k in PROBE_FEATURES:
        r = logistic_probe(f_tr[k], y_tr, f_te[k], y_te, classes=len(sw.WEATHERS), l2=float(ec.probe.l2))
        out[f"probe/weather/{k}"] = r["accuracy"]
        out[f"probe/weather/{k}/train"] = r["train_accuracy"]
    out["probe/weather/majority"] = r["majority"]
    return out


EXPERIMENT = Experiment("knowledge_transfer", arms, panels, "training data", extra=probe,
                        description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    main(EXPERIMENT)
