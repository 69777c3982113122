"""The attribute judge: a small CNN that reads Smart Watch attributes off pixels.

Generation accuracy needs an *independent* reader of generated images: this classifier is trained
only on freshly rendered watches (``smartwatch.render`` with attributes drawn from a seeded generator,
never the VQ tokenizer or the unified model), so a generated image is scored by what a renderer-
trained eye sees in it. Its penultimate layer (``feature_dim`` after ReLU) is the embedding for the
Fréchet distance between generated and real test images.

Heads (classes): ``weather`` 3, ``weather_pos`` 4, ``battery_pos`` 4, ``battery`` 10 deciles
(``min(b // 10, 9)``: 0-9 % ... 90-100 %, so 100 % joins the top bucket), ``hour`` 12 (1..12),
``minute_q`` 4 quarters (``m // 15``), ``minute_5`` 12 five-minute buckets (``m // 5``).

Training data: images are rendered at ``source_size`` and passed through :func:`prepare_images`, the
same resize every image gets before the judge (generated images included). Light augmentation
(random Gaussian blur, pixel noise) makes the judge tolerant of VQ reconstruction softness.
Held-out accuracy is measured on a separate seeded stream; the judge is cached as
``judge.safetensors`` + ``judge.json`` (config, accuracies, timings, the sha256 of ``judge.safetensors``,
and a digest of ``judge.json`` itself) in a directory. :meth:`Judge.load` verifies both and raises
:class:`JudgeCacheDamaged` naming the file; :func:`load_or_train` retrains a damaged cache with a warning
saying so (issue #33: a damaged file is detected, never used silently).

CLI: ``python -m uvjax.evaluation.judge --out=DIR [--preset=full] [--image_size=128]``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from uvjax import integrity_files as itg
from uvjax.data import smartwatch as sw
from uvjax.storage_paths import atomic_write_text
from uvjax.weights.llamagen_vq import load_params, save_params

HEADS = {"weather": 3, "weather_pos": 4, "battery_pos": 4, "battery": 10, "hour": 12, "minute_q": 4,
         "minute_5": 12}
PARAMS_FILE, REPORT_FILE = "judge.safetensors", "judge.json"
_log = logging.getLogger(__name__)


class JudgeCacheDamaged(ValueError):
    """A cached judge whose ``judge.json`` or ``judge.safetensors`` is unreadable or differs from its record."""


def attribute_labels(attrs: dict) -> dict[str, int]:
    """Class index of every head for one attribute dict (``smartwatch.sample_attributes`` keys)."""
    return {"weather": sw.WEATHERS.index(attrs["weather"]),
            "weather_pos": sw.CORNERS.index(attrs["weather_pos"]),
            "battery_pos": sw.CORNERS.index(attrs["battery_pos"]),
            "battery": min(int(attrs["battery"]) // 10, 9),
            "hour": (int(attrs["hour"]) - 1) % 12,
            "minute_q": int(attrs["minute"]) // 15,
            "minute_5": int(attrs["minute"]) // 5}


def labels_array(attrs_list: Sequence[dict]) -> dict[str, np.ndarray]:
    ls = [attribute_labels(a) for a in attrs_list]
    return {k: np.asarray([l[k] for l in ls], np.int32) for k in HEADS}


def prepare_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N,H,W,3] -> uint8 [N,size,size,3]: the one resize every judged image goes through
    (BOX when shrinking, like the renderer; bicubic when enlarging; identity at the same size)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"judge images must be uint8, got {images.dtype}")
    if images.shape[1:3] == (size, size):
        return images
    shrink = images.shape[1] > size
    method = Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), method)) for im in images])


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    image_size: int = 128
    source_size: int = 0  # size the training images are rendered at (0 = image_size)
    width: int = 16
    feature_dim: int = 256
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    eval_images: int = 1000
    augment: bool = True
    seed: int = 0
    time_budget_s: float = 0.0  # stop early after this many seconds (0 = run all steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # The cached artefact used by evaluation (a few CPU minutes on 2 cores).
    "full": JudgeConfig(steps=500, batch_size=32),  # 64 px: held-out accuracy >= 0.997 on every attribute in 16 s
    # For tests: seconds. Corners and weather are learned, hands are not.
    "test": JudgeConfig(image_size=32, width=8, feature_dim=64, steps=150, batch_size=32, lr=3e-3,
                        warmup_steps=10, eval_images=300, augment=False),
}


class JudgeNet(nn.Module):
    """Conv-GroupNorm-ReLU stack (stride 2 every other layer) -> flatten (keeps *where* things are,
    which corners need) -> Dense(feature_dim) ReLU (the Fréchet features) -> one linear head each."""
    width: int = 16
    feature_dim: int = 256

    @nn.compact
    def __call__(self, x):
        w = self.width
        for c, stride in ((w, 2), (w, 1), (2 * w, 2), (2 * w, 1), (4 * w, 2), (4 * w, 1), (8 * w, 2)):
            x = nn.Conv(c, (3, 3), strides=stride, padding="SAME")(x)
            x = nn.relu(nn.GroupNorm(num_groups=min(8, c))(x))
        x = x.reshape(x.shape[0], -1)
        feats = nn.relu(nn.Dense(self.feature_dim, name="features")(x))
        return {k: nn.Dense(n, name=f"head_{k}")(feats) for k, n in HEADS.items()}, feats


def _to_input(images_u8) -> jnp.ndarray:
    return jnp.asarray(images_u8, jnp.float32) / 127.5 - 1.0


def _augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half the images get a Gaussian blur of radius U(0.3, 1.0) px; all get N(0, U(0, 6)) noise."""
    out = images.copy()
    for i in range(len(out)):
        if rng.random() < 0.5:
            r = float(rng.uniform(0.3, 1.0))
            out[i] = np.asarray(Image.fromarray(out[i]).filter(ImageFilter.GaussianBlur(r)))
    sigma = rng.uniform(0, 6, size=(len(out), 1, 1, 1))
    noisy = out.astype(np.float32) + rng.normal(size=out.shape) * sigma
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def render_batch(rng: np.random.Generator, n: int, cfg: JudgeConfig) -> tuple[np.ndarray, list[dict]]:
    """``n`` fresh watches (random attributes from ``rng``) at the judge's input size."""
    src = cfg.source_size or cfg.image_size
    attrs = [sw.sample_attributes(rng) for _ in range(n)]
    imgs = np.stack([sw.render(a, src) for a in attrs])
    return prepare_images(imgs, cfg.image_size), attrs


class Judge:
    """A trained judge: ``predict``, ``features``, ``accuracy``; ``save``/``load`` a directory."""

    def __init__(self, cfg: JudgeConfig, params, report: dict | None = None):
        self.cfg, self.params, self.report = cfg, params, dict(report or {})
        self.net = JudgeNet(cfg.width, cfg.feature_dim)
        self._fwd = jax.jit(lambda p, x: self.net.apply({"params": p}, x))

    def _run(self, images_u8, batch: int = 128):
        imgs = prepare_images(images_u8, self.cfg.image_size)
        logits, feats = [], []
        for i in range(0, len(imgs), batch):
            chunk = imgs[i:i + batch]
            pad = batch - len(chunk) if len(imgs) > batch else 0  # one compiled shape for big sets
            x = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.uint8)]) if pad else chunk
            lg, f = jax.device_get(self._fwd(self.params, _to_input(x)))
            logits.append({k: v[:len(chunk)] for k, v in lg.items()})
            feats.append(f[:len(chunk)])
        return {k: np.concatenate([l[k] for l in logits]) for k in HEADS}, np.concatenate(feats)

    def predict(self, images_u8) -> dict[str, np.ndarray]:
        """Class index per head, int [N]."""
        logits, _ = self._run(images_u8)
        return {k: v.argmax(-1).astype(np.int32) for k, v in logits.items()}

    def features(self, images_u8) -> np.ndarray:
        """Penultimate-layer features [N, feature_dim] (for the Fréchet distance)."""
        return self._run(images_u8)[1]

    def accuracy(self, images_u8, attrs_list: Sequence[dict]) -> dict[str, float]:
        pred, labels = self.predict(images_u8), labels_array(attrs_list)
        return {k: float(np.mean(pred[k] == labels[k])) for k in HEADS}

    def save(self, directory: str) -> str:
        """``judge.safetensors``, then ``judge.json`` (last: it holds the sha256 of the params and its own
        digest, so a save killed in between leaves a cache that :meth:`load` refuses)."""
        os.makedirs(directory, exist_ok=True)
        params_path = os.path.join(directory, PARAMS_FILE)
        save_params(jax.device_get(self.params), params_path,
                    {"format": "uvjax-judge", "judge_config": json.dumps(self.cfg.to_dict())})
        rec = itg.seal({"config": self.cfg.to_dict(), **self.report, "params_sha256": itg.sha256_file(params_path)})
        atomic_write_text(os.path.join(directory, REPORT_FILE), json.dumps(rec, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str) -> "Judge":
        """The judge saved in ``directory``, verified: ``judge.json`` parses and matches its digest, and
        ``judge.safetensors`` matches the sha256 recorded there. Raises :class:`JudgeCacheDamaged` naming the
        file. A judge saved before these records (no ``params_sha256``) is loaded unverified, with a warning."""
        params_path, report_path = os.path.join(directory, PARAMS_FILE), os.path.join(directory, REPORT_FILE)
        todo = (f"The judge is a cache: delete {directory} (or move it aside) and it is trained again "
                "(`python -m uvjax.evaluate` without --quick does so itself)")
        if not os.path.exists(report_path):
            raise JudgeCacheDamaged(f"{report_path}: missing (the judge's record: config, accuracies, the sha256 of "
                                    f"{PARAMS_FILE}), so {params_path} cannot be verified. {todo}")
        try:
            rec = itg.read_json(report_path, "judge record", todo)
            if not isinstance(rec, dict):
                raise itg.DamagedFile(f"{report_path}: damaged judge record: a JSON object expected. {todo}")
            if "digest" in rec and itg.seal(rec)["digest"] != rec["digest"]:
                raise itg.DamagedFile(f"{report_path}: damaged judge record: its content does not match its "
                                      f"digest. {todo}")
        except itg.DamagedFile as e:
            raise JudgeCacheDamaged(str(e)) from e
        want = rec.get("params_sha256")
        if want is None:
            _log.warning("%s: saved before judge checksums: %s is loaded UNVERIFIED (delete %s to retrain it "
                         "with one)", report_path, params_path, directory)
        else:
            got = itg.sha256_file(params_path)
            if got != want:
                raise JudgeCacheDamaged(f"{params_path}: damaged: sha256 {got[:16]}... differs from the "
                                        f"{want[:16]}... recorded in {report_path}. {todo}")
        try:
            params, meta = load_params(params_path)
            cfg = JudgeConfig(**itg.parse_json(meta["judge_config"], params_path, "judge config metadata", todo))
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001  (safetensors' own error types; a bad header, missing metadata)
            raise JudgeCacheDamaged(f"{params_path}: unreadable judge parameters ({type(e).__name__}: {e}). "
                                    f"{todo}") from e
        report = {k: v for k, v in rec.items() if k not in ("config", "params_sha256", "digest")}
        return cls(cfg, jax.tree_util.tree_map(jnp.asarray, params), report)


def train_judge(cfg: JudgeConfig, out_dir: str | None = None, progress: bool = False) -> Judge:
    """Trains on a fresh rendered batch every step (no image is seen twice), then measures held-out
    accuracy on ``eval_images`` watches from a separate seeded stream."""
    net = JudgeNet(cfg.width, cfg.feature_dim)
    params = net.init(jax.random.key(cfg.seed), jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))["params"]
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, cfg.warmup_steps),
                                               max(cfg.steps, cfg.warmup_steps + 1),
                                               cfg.lr * 0.02)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=cfg.weight_decay))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss_fn(p):
            logits, _ = net.apply({"params": p}, x)
            losses = {k: optax.softmax_cross_entropy_with_integer_labels(logits[k], y[k]).mean() for k in HEADS}
            return sum(losses.values()), losses
        (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    rng = np.random.default_rng([cfg.seed, 1])
    bar = None
    if progress:
        bar = tqdm(total=cfg.steps, desc="judge", unit="step", dynamic_ncols=True)
    t0, cpu0 = time.time(), time.process_time()
    history = []
    done = 0
    for i in range(cfg.steps):
        imgs, attrs = render_batch(rng, cfg.batch_size, cfg)
        if cfg.augment:
            imgs = _augment(imgs, rng)
        y = {k: jnp.asarray(v) for k, v in labels_array(attrs).items()}
        params, opt, loss = step(params, opt, _to_input(imgs), y)
        done = i + 1
        if done % 50 == 0 or done == cfg.steps:
            history.append({"step": done, "loss": float(loss), "time_s": round(time.time() - t0, 1)})
            if bar is not None:
                bar.set_postfix(loss=f"{float(loss):.3f}")
        if bar is not None:
            bar.update(1)
        if cfg.time_budget_s and time.time() - t0 > cfg.time_budget_s:
            break
    jax.block_until_ready(params)
    train_s, cpu_s = time.time() - t0, time.process_time() - cpu0
    if bar is not None:
        bar.close()
    judge = Judge(cfg, params)
    eval_imgs, eval_attrs = render_batch(np.random.default_rng([cfg.seed, 2]), cfg.eval_images, cfg)
    acc = judge.accuracy(eval_imgs, eval_attrs)
    judge.report = {"heldout_accuracy": acc, "heldout_images": cfg.eval_images, "steps": done,
                    "images_seen": done * cfg.batch_size, "train_time_s": round(train_s, 1),
                    "train_cpu_s": round(cpu_s, 1), "history": history,
                    "backend": jax.default_backend()}
    if out_dir:
        judge.save(out_dir)
    return judge


def load_or_train(directory: str, cfg: JudgeConfig | None = None, progress: bool = False) -> Judge:
    """The judge cached in ``directory``; trained there when absent (or when its config differs from
    an explicitly given ``cfg``). A damaged cache (:class:`JudgeCacheDamaged`) is retrained, with a warning
    naming the damaged file (the config recorded in it is used when no ``cfg`` is given and it is readable)."""
    if os.path.exists(os.path.join(directory, PARAMS_FILE)) or os.path.exists(os.path.join(directory, REPORT_FILE)):
        try:
            judge = Judge.load(directory)
        except JudgeCacheDamaged as e:
            _log.warning("judge cache %s is damaged, so it is trained again: %s", directory, e)
            cfg = cfg or _recorded_config(directory)
        except FileNotFoundError as e:  # judge.safetensors deleted: nothing to verify, retrained
            _log.warning("judge cache %s is damaged (%s), so it is trained again", directory, e)
            cfg = cfg or _recorded_config(directory)
        else:
            if cfg is None or judge.cfg == cfg:
                return judge
    return train_judge(cfg or PRESETS["full"], directory, progress)


def _recorded_config(directory: str) -> JudgeConfig | None:
    """The config in a (possibly damaged) cache's ``judge.json``, when it is still readable and sealed."""
    try:
        rec = itg.read_json(os.path.join(directory, REPORT_FILE))
        if isinstance(rec, dict) and "digest" in rec and itg.seal(rec)["digest"] == rec["digest"]:
            return JudgeConfig(**rec["config"])
    except (OSError, itg.DamagedFile, KeyError, TypeError):
        pass
    return None


def main(argv):
    F = flags.FLAGS
    cfg = dataclasses.replace(PRESETS[F.preset], **({"image_size": F.image_size} if F.image_size else {}),
                              **({"steps": F.steps} if F.steps else {}))
    judge = train_judge(cfg, F.out, progress=True)
    acc = judge.report["heldout_accuracy"]
    print(f"judge trained in {judge.report['train_time_s']} s ({judge.report['steps']} steps); held-out accuracy:")
    for k, v in acc.items():
        print(f"  {k:12s} {v:.3f}" + ("" if v >= 0.95 else "   (< 0.95)"))
    print(f"saved to {F.out}")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("out", None, "directory for judge.safetensors + judge.json", required=True)
    flags.DEFINE_enum("preset", "full", sorted(PRESETS), "judge preset")
    flags.DEFINE_integer("image_size", 0, "judge input size (default: the preset's)")
    flags.DEFINE_integer("steps", 0, "training steps (default: the preset's)")
    app.run(main)
