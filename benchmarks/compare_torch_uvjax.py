"""The uvjax side of benchmarks/compare_torch.py: the shared weights (benchmarks/compare_torch_common.py) in
uvjax's layout and config, its per-token text loss, its train step, and the timed units its worker runs
(``UNITS``). Only the uvjax workers (and tests/test_compare_torch.py) import it.
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import matmul_peak_gflops
from benchmarks.compare_torch_common import PROJ_HF, decode_prompts, model_dict, source_mask, text_batch, timed
from uvjax.config import base_config, lora_preset, model_config
from uvjax.data.arrays import TEXT
from uvjax.inference.decode import DecodeSettings, Generator, SpecialIds
from uvjax.models import llama
from uvjax.models.unified import UnifiedModel
from uvjax.training.loss import target_masks
from uvjax.training.optimizer import flatten, unflatten
from uvjax.training.sharding import global_batch_from_local, make_mesh
from uvjax.training.step import create_trainer, dummy_batch, make_train_step
from uvjax.weights.hf_llama import StackedParams, role_of_hf_name


def uvjax_weights(s: dict, w: dict) -> tuple[dict, dict]:
    """(params, lora) nested numpy dicts in uvjax layout for the decoder/embedding/LM head."""
    acc = StackedParams(model_dict(s), "float32", source="compare_torch")
    for name, arr in w.items():
        if not name.startswith("lora."):
            role, layer = role_of_hf_name(name)
            acc.put(role, layer, arr, name)
    params = acc.finish()
    lora: dict = {"decoder": {"layers": {"attn": {}, "mlp": {}}}}
    for proj in PROJ_HF:
        group = "attn" if proj in ("q", "k", "v", "o") else "mlp"
        a = np.stack([w[f"lora.{i}.{proj}.A"].T for i in range(s["layers"])])  # [L, in, r]
        b = np.stack([w[f"lora.{i}.{proj}.B"].T for i in range(s["layers"])])  # [L, r, out]
        lora["decoder"]["layers"][group][proj] = {"a": a, "b": b}
    return params, lora


def uvjax_config(s: dict, lr: float = 2e-4, scan_unroll: int = 1):
    """The uvjax ml_collections config for a spec: LoRA on the 7 projections, only LoRA trains,
    AdamW with a constant lr (no warmup, decay or clipping: what torch.optim.AdamW does by default)."""
    c = base_config()
    c.name = "compare-torch"
    m = c.model
    m.vocab_size, m.hidden, m.layers, m.heads, m.kv_heads = s["vocab"], s["hidden"], s["layers"], s["heads"], s["kv_heads"]
    m.intermediate, m.image.num_codes, m.dtype = s["intermediate"], s.get("codes", 16), "float32"
    m.scan_unroll = scan_unroll  # layers per loop iteration of the layer stack (0: no loop)
    lora_preset(c, s["rank"], s["alpha"], lr=lr)
    c.train.trainable = ("lora/.*",)
    c.optim.lr_rules = ()
    c.optim.schedule, c.optim.warmup_steps, c.optim.clip_norm, c.optim.weight_decay = "constant", 0, 0.0, 0.0
    c.train.batch_size, c.train.seq_len = s["batch"], s["seq"]
    c.loss.w_text = 1.0
    return c


def uvjax_variables(model, s: dict, w: dict, seed: int = 0) -> dict:
    """Initialised uvjax variables (image adapters/heads as initialised) with the shared weights put in."""
    v = nn.unbox(model.init({"params": jax.random.key(seed)}, dummy_batch(0), method=UnifiedModel.init_all))
    params, lora = uvjax_weights(s, w)
    flat = flatten(v)
    new = {**{"params/" + k: x for k, x in flatten(params).items()},
           **{"lora/" + k: x for k, x in flatten(lora).items()}}
    for k, x in new.items():
        if k not in flat or tuple(flat[k].shape) != tuple(x.shape):
            raise ValueError(f"uvjax variable {k}: {None if k not in flat else flat[k].shape} vs {x.shape}")
    flat.update({k: jax.numpy.asarray(x) for k, x in new.items()})
    return unflatten(flat)


def uvjax_token_losses(model, variables: dict, batch: dict):
    """Per-source-position text CE [B, T-1] from uvjax's hidden states and LM head (0 off target)."""
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    h = model.apply(variables, b)
    logits = model.apply(variables, h[:, :-1], method=UnifiedModel.text_logits)
    labels = b["tokens"][:, 1:]
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    mask, _ = target_masks(b)
    return jnp.where(mask, ce, 0.0), mask


def uvjax_trainer(s: dict, w: dict, batch: dict, lr: float = 2e-4, devices=None, scan_unroll: int = 1):
    """(step, state, global batch): the uvjax train step (uvjax/training/step.py) for ``batch`` with the
    shared weights in its state; text-logit capacity just above the batch's target count."""
    cfg = uvjax_config(s, lr, scan_unroll)
    n = s["batch"] * (s["seq"] - 1)
    cfg.loss.text_target_capacity = min(1.0, (int(source_mask(batch).sum()) + 1) / n)
    cfg.loss.image_target_capacity = 1.0 / n  # no image targets in these batches: one gathered slot
    model = UnifiedModel(model_config(cfg).validate())
    mesh = make_mesh([1, -1, 1], devices)
    trainer, state = create_trainer(model, cfg, mesh, cfg.sharding.rules)
    params, lora = uvjax_weights(s, w)
    new = {**{"params/" + k: x for k, x in flatten(params).items()},
           **{"lora/" + k: x for k, x in flatten(lora).items()}}
    del params, lora

    def put(tree):
        flat = flatten(tree)
        for k in flat:
            if k in new:
                if tuple(flat[k].shape) != new[k].shape:
                    raise ValueError(f"{k}: {flat[k].shape} vs {new[k].shape}")
                flat[k] = jax.device_put(new.pop(k), flat[k].sharding)
        return unflatten(flat)

    state = state.replace(trainable=put(state.trainable), frozen=put(state.frozen))
    if new:
        raise ValueError(f"weights not placed: {sorted(new)[:5]}")
    return make_train_step(trainer, batch), state, global_batch_from_local(batch, mesh)


# ============================================================================ the uvjax worker's timed units
class JaxTrain:
    def __init__(self, s, w, args):
        self.peak = matmul_peak_gflops(reps=5)
        batch = text_batch(s, args.seed + 1)
        self.step, state, self.gb = uvjax_trainer(s, w, batch, args.lr, scan_unroll=args.scan_unroll)
        t = time.perf_counter()
        self.step.lower(state, self.gb).compile()
        self.compile_s = time.perf_counter() - t
        self.state = state
        self.info = {"compile_s": self.compile_s, "matmul_peak_gflops": self.peak,
                     "text_targets_per_row": int(source_mask(batch).sum()) / s["batch"]}

    def run(self, n):
        times, losses, cpu = [], [], []
        for _ in range(n):
            (self.state, m), dt, c = timed(lambda: jax.block_until_ready(self.step(self.state, self.gb)))
            times.append(dt)
            cpu.append(c)
            losses.append(float(m["loss/text"]))
            if float(m["tokens/dropped_targets"]):
                raise RuntimeError("uvjax dropped targets: capacity too small")
        # the matmul peak again, under the same machine load as these steps (the machine is shared)
        return {"times": times, "losses": losses, "cpu": cpu, "matmul_peak_gflops": matmul_peak_gflops(reps=3)}


class JaxDecode:
    def __init__(self, s, w, args):
        model = UnifiedModel(model_config(uvjax_config(s, scan_unroll=args.decode_scan_unroll)).validate())
        v = uvjax_variables(model, s, w, args.seed)
        # boi/eoi are masked out of text sampling; 0/1 are never the argmax of these random weights' rows
        self.gen = Generator(model, v, SpecialIds(boi=0, eoi=1, stop=()), bucket=16)
        self.settings = DecodeSettings(max_new_tokens=args.new_tokens, image_tokens=0)
        self.s, self.args, self.info = s, args, {}

    def run(self, batch):
        toks = decode_prompts(self.s, batch, self.args.prompt, self.args.seed + 2)
        prompts = [{"tokens": t, "modality": np.full(len(t), TEXT, np.int32)} for t in toks]
        t = time.perf_counter()
        out = self.gen.generate(prompts, self.settings)
        dt = time.perf_counter() - t
        if out.steps != self.args.new_tokens:
            raise RuntimeError(f"uvjax decoded {out.steps} steps")
        return {"times": [dt], "tokens": out.tokens[:, :16].tolist()}


UNITS = {"train": JaxTrain, "decode": JaxDecode}


def worker_setup(args):
    """A uvjax worker, before it builds its unit: the ablation's query-block size of uvjax's causal
    attention (``--attn_block``; 0 = one block, -1 = unchanged)."""
    if args.attn_block >= 0:
        llama.ATTN_BLOCK = args.attn_block or 1 << 30
