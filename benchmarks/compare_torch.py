"""uvjax vs HF transformers + peft on the same model, the same weights and the same batch (issue 9).

    python benchmarks/compare_torch.py                       # S and M training, decode on S, all reps
    python benchmarks/compare_torch.py --configs=S --steps=2 --decode_batches=1 --new_tokens=16   # quick

Needs the torch extra (torch, transformers, peft). One config spec (benchmarks/train_step.py S / M) builds
both models: HF ``LlamaForCausalLM`` (fp32, ``attn_implementation="sdpa"``) wrapped by peft LoRA on all
seven projections (q,k,v,o,gate,up,down; same rank, alpha = 2·rank), and the uvjax ``UnifiedModel`` whose
decoder is the same Llama. One set of numpy weights (base, LoRA A *and a non-zero B*) is written once and
loaded by both sides, so their losses must agree.

Each side runs in its own subprocess (a "worker"), so peak RSS is per side; the parent tells them, in
turn, to run one timed unit (A B A B …, the idle one blocks on its pipe and uses no CPU) and takes a CPU
snapshot (psutil busy % + load average) before every unit. Reported: medians, ratios uvjax / HF.

- **train**: a text-only LM batch laid out like benchmarks/train_step.py (first 25% of each sequence a
  prompt without targets, the rest text targets). AdamW (constant lr, no weight decay, no clipping) on
  the LoRA factors only, on both sides. uvjax computes LM-head logits only at target positions (its
  design); HF is given the tightest logits it supports, ``logits_to_keep`` = the suffix that holds every
  target (``--hf_full_logits`` for all positions). The torch loss is computed from its logits with the
  same target masks as uvjax's text loss; both sides report the loss of every step (they start equal and
  must stay equal, which also checks the optimizers match).
- **decode**: greedy, KV cache, prompt 64, exactly ``--new_tokens`` new tokens (no stop id): HF
  ``generate`` vs uvjax ``Generator.generate`` (prefill + compiled while loop), wall time end to end.
- useful-FLOP rate (uvjax/training/flops.py, text targets only) vs a JAX fp32 matmul peak measured by the
  uvjax worker in the same run; peak RSS per side; uvjax train-step compile time (lower + compile).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import peak_rss_mb  # noqa: E402
from benchmarks.train_step import CONFIGS  # noqa: E402

PROJ_HF = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
TARGETS = {"S": dict(train=2.0, decode_b1=5.0, decode_b8=2.0), "M": dict(train=1.5, flop_fraction=0.5)}


# ============================================================================ shared model / weights
def spec_of(name: str, **over) -> dict:
    """A config spec: benchmarks/train_step.py's S/M plus kv_heads, alpha and the prompt fraction."""
    s = dict(CONFIGS[name]) if name in CONFIGS else {}
    s.update(over)
    s.setdefault("kv_heads", s["heads"])
    s.setdefault("alpha", 2.0 * s["rank"])
    return s


def model_dict(s: dict) -> dict:
    """uvjax ``config.model`` keys (the form uvjax.weights.hf_llama uses) for a spec."""
    return dict(vocab_size=s["vocab"], hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
                kv_heads=s["kv_heads"], head_dim=s["hidden"] // s["heads"], intermediate=s["intermediate"],
                tie_embeddings=False)


def make_weights(s: dict, seed: int = 0, lora_b_std: float = 0.02) -> dict:
    """HF-named fp32 numpy weights: the Llama base (norms randomised around 1 so a swapped norm would
    show) and peft-layout LoRA factors ``lora.<layer>.<proj>.A`` [r, in] / ``.B`` [out, r] (B non-zero)."""
    import numpy as np
    from uvjax.weights.hf_llama import GLOBAL_ROLES, LAYER_ROLES, hf_shapes
    rng = np.random.default_rng(seed)
    m = model_dict(s)
    shapes = hf_shapes(m)
    w = {}
    for role, shp in shapes.items():
        per_layer = role in LAYER_ROLES
        for i in range(s["layers"] if per_layer else 1):
            name = f"model.layers.{i}.{LAYER_ROLES[role][1]}" if per_layer else GLOBAL_ROLES[role][1]
            if len(shp) == 1:
                w[name] = (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float32)
            else:
                w[name] = (0.02 * rng.standard_normal(shp)).astype(np.float32)
    r = s["rank"]
    for i in range(s["layers"]):
        for proj in PROJ_HF:
            out_f, in_f = shapes[proj]
            bound = 1.0 / np.sqrt(in_f)  # peft's default A init: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(in))
            w[f"lora.{i}.{proj}.A"] = rng.uniform(-bound, bound, (r, in_f)).astype(np.float32)
            w[f"lora.{i}.{proj}.B"] = (lora_b_std * rng.standard_normal((out_f, r))).astype(np.float32)
    return w


def uvjax_weights(s: dict, w: dict) -> tuple[dict, dict]:
    """(params, lora) nested numpy dicts in uvjax layout for the decoder/embedding/LM head."""
    import numpy as np
    from uvjax.weights.hf_llama import StackedParams, role_of_hf_name
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
    from uvjax.config import base_config, lora_preset
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


def text_batch(s: dict, seed: int = 1, prompt_fraction: float = 0.25) -> dict:
    """Text-only LM batch: every row one segment, the first ``prompt_fraction`` without targets."""
    import numpy as np
    from uvjax.data.arrays import TEXT
    B, T = s["batch"], s["seq"]
    n_prompt = int(T * prompt_fraction)
    rng = np.random.default_rng(seed)
    tt = np.zeros((B, T), np.int32)
    tt[:, n_prompt:] = 1
    return dict(tokens=rng.integers(2, s["vocab"], (B, T)).astype(np.int32),
                modality=np.full((B, T), TEXT, np.int32), text_target=tt,
                image_target=np.zeros((B, T), np.int32), segment_ids=np.ones((B, T), np.int32),
                positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))


def source_mask(batch: dict):
    """[B, T-1] bool: position t's logits predict a text target at t+1 (uvjax.training.loss.target_masks
    semantics: the next token is a target and in the same, non-padding segment)."""
    import numpy as np
    seg = np.asarray(batch["segment_ids"])
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (np.asarray(batch["text_target"])[:, 1:] > 0) & same


def logits_to_keep(batch: dict) -> int:
    """Smallest suffix of positions whose logits cover every text target (HF's ``logits_to_keep``)."""
    import numpy as np
    src = source_mask(batch).any(0)
    return int(batch["tokens"].shape[1] - np.argmax(src)) if src.any() else 1


# ============================================================================ the HF + peft side
def import_hf():
    """transformers + peft (the registry's torchvision made importable first: benchmarks/torch_compat.py)."""
    from benchmarks.torch_compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    import peft
    import transformers
    return transformers, peft


def hf_model(s: dict, w: dict):
    """HF LlamaForCausalLM (fp32, sdpa) + peft LoRA on the 7 projections, loaded with ``w``."""
    import torch
    transformers, peft = import_hf()
    conf = transformers.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max(2048, s["seq"]), rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    conf._attn_implementation = "sdpa"
    base = transformers.LlamaForCausalLM(conf).float()
    sd = {k: torch.from_numpy(v) for k, v in w.items() if not k.startswith("lora.")}
    missing, unexpected = base.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise ValueError(f"HF state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    lcfg = peft.LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0, bias="none",
                           target_modules=[v.split(".")[-1] for v in PROJ_HF.values()])
    model = peft.get_peft_model(base, lcfg)
    layers = model.base_model.model.model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for proj, path in PROJ_HF.items():
                mod = layer.get_submodule(path)
                mod.lora_A["default"].weight.copy_(torch.from_numpy(w[f"lora.{i}.{proj}.A"]))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(w[f"lora.{i}.{proj}.B"]))
    if model.base_model.model.config._attn_implementation != "sdpa":
        raise RuntimeError("HF model is not using sdpa attention")
    return model


def hf_token_losses(model, batch: dict, keep: int = 0):
    """(per-source-position CE [B, T-1] (0 where no target), mask [B, T-1]) from HF logits, with the
    uvjax text-target masks. ``keep`` > 0: logits only for the last ``keep`` positions (``logits_to_keep``),
    which must cover every target."""
    import torch
    ids = torch.from_numpy(batch["tokens"].astype("int64"))
    att = torch.from_numpy((batch["segment_ids"] > 0).astype("int64"))
    pos = torch.from_numpy(batch["positions"].astype("int64"))
    mask = torch.from_numpy(source_mask(batch))
    T = ids.shape[1]
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=keep, use_cache=False)
    logits = out.logits  # [B, k, V] for positions T-k..T-1
    k = logits.shape[1]
    src = logits[:, :-1] if k == T else logits[:, :k - 1]  # positions T-k..T-2 predict T-k+1..T-1
    labels = ids[:, T - k + 1:] if k < T else ids[:, 1:]
    m = mask[:, T - src.shape[1] - 1:] if k < T else mask
    if k < T and bool(mask[:, :T - k].any()):
        raise ValueError("logits_to_keep does not cover every target")
    ce = torch.nn.functional.cross_entropy(src.reshape(-1, src.shape[-1]).float(), labels.reshape(-1),
                                           reduction="none").reshape(labels.shape)
    ce = torch.where(m, ce, torch.zeros_like(ce))
    if k < T:
        ce = torch.cat([torch.zeros(ce.shape[0], T - 1 - ce.shape[1]), ce], 1)
        m = mask
    return ce, m


def hf_loss(model, batch: dict, keep: int = 0):
    ce, m = hf_token_losses(model, batch, keep)
    return ce.sum() / m.sum().clamp(min=1)


# ============================================================================ the uvjax side
def uvjax_variables(model, s: dict, w: dict, seed: int = 0) -> dict:
    """Initialised uvjax variables (image adapters/heads as initialised) with the shared weights put in."""
    import flax.linen as nn
    import jax
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.optimizer import flatten, unflatten
    from uvjax.training.step import dummy_batch
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
    import jax
    import jax.numpy as jnp
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.loss import target_masks
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    h = model.apply(variables, b)
    logits = model.apply(variables, h[:, :-1], method=UnifiedModel.text_logits)
    labels = b["tokens"][:, 1:]
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    mask, _ = target_masks(b)
    return jnp.where(mask, ce, 0.0), mask


# ============================================================================ workers
def _send(out, obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _timed(fn):
    """(fn(), wall seconds, (user, system) CPU seconds of this worker process, all threads): one timed unit,
    measured the same way on both sides. System time is where page faults and the kernel's page zeroing
    show (PERFORMANCE.md, change 22)."""
    c0, t0 = os.times(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), os.times()
    return out, t1 - t0, (c1.user - c0.user, c1.system - c0.system)


def uvjax_trainer(s: dict, w: dict, batch: dict, lr: float = 2e-4, devices=None, scan_unroll: int = 1):
    """(step, state, global batch): the uvjax train step (uvjax/training/step.py) for ``batch`` with the
    shared weights in its state; text-logit capacity just above the batch's target count."""
    import jax
    from uvjax.config import model_config
    from uvjax.models.unified import UnifiedModel
    from uvjax.training.optimizer import flatten, unflatten
    from uvjax.training.sharding import global_batch_from_local, make_mesh
    from uvjax.training.step import create_trainer, make_train_step
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


def matmul_peak_gflops(reps: int = 5) -> float:
    from benchmarks.common import matmul_peak_gflops as peak
    return peak(reps=reps)


class JaxTrain:
    def __init__(self, s, w, args):
        self.peak = matmul_peak_gflops()
        batch = text_batch(s, args.seed + 1)
        self.step, state, self.gb = uvjax_trainer(s, w, batch, args.lr, scan_unroll=args.scan_unroll)
        t = time.perf_counter()
        self.step.lower(state, self.gb).compile()
        self.compile_s = time.perf_counter() - t
        self.state = state
        self.info = {"compile_s": self.compile_s, "matmul_peak_gflops": self.peak,
                     "text_targets_per_row": int(source_mask(batch).sum()) / s["batch"]}

    def run(self, n):
        import jax
        times, losses, cpu = [], [], []
        for _ in range(n):
            (self.state, m), dt, c = _timed(lambda: jax.block_until_ready(self.step(self.state, self.gb)))
            times.append(dt)
            cpu.append(c)
            losses.append(float(m["loss/text"]))
            if float(m["tokens/dropped_targets"]):
                raise RuntimeError("uvjax dropped targets: capacity too small")
        # the matmul peak again, under the same machine load as these steps (the machine is shared)
        return {"times": times, "losses": losses, "cpu": cpu, "matmul_peak_gflops": matmul_peak_gflops(reps=3)}


def torch_optimizer(model, lr: float = 2e-4):
    """torch AdamW over the trainable (LoRA) parameters, matching uvjax_config's optimizer."""
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def torch_train_step(model, opt, batch: dict, keep: int = 0) -> float:
    """One HF+peft step: loss (uvjax text-target masks) → backward → AdamW. Returns the pre-update loss."""
    opt.zero_grad(set_to_none=True)
    loss = hf_loss(model, batch, keep)
    loss.backward()
    opt.step()
    return float(loss.detach())


class TorchTrain:
    def __init__(self, s, w, args):
        import torch
        self.model = hf_model(s, w)
        self.model.train()
        self.batch = text_batch(s, args.seed + 1)
        self.keep = 0 if args.hf_full_logits else logits_to_keep(self.batch)
        self.opt = torch_optimizer(self.model, args.lr)
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.info = {"trainable_params": int(n), "logits_to_keep": self.keep,
                     "threads": torch.get_num_threads(), "compile_s": 0.0}

    def run(self, n):
        times, losses, cpu = [], [], []
        for _ in range(n):
            loss, dt, c = _timed(lambda: torch_train_step(self.model, self.opt, self.batch, self.keep))
            losses.append(loss)
            times.append(dt)
            cpu.append(c)
        return {"times": times, "losses": losses, "cpu": cpu}


def decode_prompts(s, batch, prompt, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    return rng.integers(2, s["vocab"], (batch, prompt)).astype(np.int32)


class JaxDecode:
    def __init__(self, s, w, args):
        import jax.numpy as jnp  # noqa: F401
        from uvjax.config import model_config
        from uvjax.inference.decode import DecodeSettings, Generator, SpecialIds
        from uvjax.models.unified import UnifiedModel
        model = UnifiedModel(model_config(uvjax_config(s, scan_unroll=args.decode_scan_unroll)).validate())
        v = uvjax_variables(model, s, w, args.seed)
        # boi/eoi are masked out of text sampling; 0/1 are never the argmax of these random weights' rows
        self.gen = Generator(model, v, SpecialIds(boi=0, eoi=1, stop=()), bucket=16)
        self.settings = DecodeSettings(max_new_tokens=args.new_tokens, image_tokens=0)
        self.s, self.args, self.info = s, args, {}

    def run(self, batch):
        from uvjax.data.arrays import TEXT
        import numpy as np
        toks = decode_prompts(self.s, batch, self.args.prompt, self.args.seed + 2)
        prompts = [{"tokens": t, "modality": np.full(len(t), TEXT, np.int32)} for t in toks]
        t = time.perf_counter()
        out = self.gen.generate(prompts, self.settings)
        dt = time.perf_counter() - t
        if out.steps != self.args.new_tokens:
            raise RuntimeError(f"uvjax decoded {out.steps} steps")
        return {"times": [dt], "tokens": out.tokens[:, :16].tolist()}


class TorchDecode:
    def __init__(self, s, w, args):
        self.model = hf_model(s, w)
        self.model.eval()
        self.s, self.args, self.info = s, args, {}

    def run(self, batch):
        import torch
        toks = torch.from_numpy(decode_prompts(self.s, batch, self.args.prompt, self.args.seed + 2).astype("int64"))
        n = self.args.new_tokens
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=toks, attention_mask=torch.ones_like(toks), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, use_cache=True, num_beams=1,
                                      eos_token_id=None, pad_token_id=0)
        dt = time.perf_counter() - t
        if out.shape[1] != toks.shape[1] + n:
            raise RuntimeError(f"HF generated {out.shape[1] - toks.shape[1]} tokens")
        return {"times": [dt], "tokens": out[:, toks.shape[1]:toks.shape[1] + 16].tolist()}


WORKERS = {("jax", "train"): JaxTrain, ("torch", "train"): TorchTrain,
           ("jax", "decode"): JaxDecode, ("torch", "decode"): TorchDecode}


def parse_cpus(text: str) -> tuple[int, ...]:
    """``--cpus`` ("0" or "0,1"): CPU ids this process may run on, checked against its own affinity."""
    try:
        cpus = tuple(sorted({int(c) for c in text.split(",") if c.strip()}))
    except ValueError:
        raise ValueError(f"--cpus={text!r}: expected comma-separated CPU ids, e.g. 0 or 0,1") from None
    allowed = os.sched_getaffinity(0)
    bad = [c for c in cpus if c not in allowed]
    if not cpus or bad:
        raise ValueError(f"--cpus={text!r}: CPU ids {bad or '(none)'} not available; this process may use "
                         f"{sorted(allowed)}")
    return cpus


def pin_cpus(text: str) -> tuple[int, ...]:
    """Pin this process (and the threads it starts later: XLA's and torch's pools) to ``--cpus``."""
    cpus = parse_cpus(text)
    os.sched_setaffinity(0, cpus)
    return tuple(sorted(os.sched_getaffinity(0)))


def worker_main(args):
    """A worker: builds one side, then answers JSON-line commands on stdin ({"run": n} / {"quit": 1})."""
    proto = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    if args.cpus:  # before jax / torch start their thread pools, which size themselves to the affinity
        pin_cpus(args.cpus)
    import numpy as np
    if args.side == "torch":
        import torch
        torch.set_num_threads(args.torch_threads)
        import_hf()
    if args.attn_block >= 0:  # ablation: query-block size of uvjax's causal attention (0 = one block)
        from uvjax.models import llama
        llama.ATTN_BLOCK = args.attn_block or 1 << 30
    s = spec_of(args.config)
    with np.load(args.weights) as f:
        w = {k: f[k] for k in f.files}
    t = time.perf_counter()
    obj = WORKERS[(args.side, args.task)](s, w, args)
    del w
    _send(proto, {"ready": True, "setup_s": time.perf_counter() - t, "info": obj.info, "rss_mb": peak_rss_mb(),
                  "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "cpus": sorted(os.sched_getaffinity(0))})
    for line in sys.stdin:
        cmd = json.loads(line)
        if "quit" in cmd:
            break
        res = obj.run(cmd["run"])
        res["rss_mb"] = peak_rss_mb()
        _send(proto, res)
    _send(proto, {"bye": True, "rss_mb": peak_rss_mb()})


# ============================================================================ the parent
class Worker:
    def __init__(self, side, task, config, weights, args, attn_block=-1, malloc="uvjax"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--side", side, "--task", task,
               "--config", config, "--weights", weights, "--lr", str(args.lr), "--seed", str(args.seed),
               "--new_tokens", str(args.new_tokens), "--prompt", str(args.prompt),
               "--torch_threads", str(args.torch_threads), "--attn_block", str(attn_block), "--cpus", args.cpus,
               "--scan_unroll", str(args.scan_unroll), "--decode_scan_unroll", str(args.decode_scan_unroll)] + (
                   ["--hf_full_logits"] if args.hf_full_logits else [])
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", "cpu")
        if malloc == "uvjax":
            # the glibc malloc settings `python -m uvjax.train` sets for itself (uvjax/runtime_env.py); HF's
            # steps are faster with them too on the benchmark machine, so both sides get them by default
            from uvjax.runtime_env import tuned_env
            env = tuned_env(env) or env
        self.side = side
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._recv()

    def _recv(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker died (exit {self.p.wait()})")
        return json.loads(line)

    def run(self, n):
        self.p.stdin.write(json.dumps({"run": n}) + "\n")
        self.p.stdin.flush()
        return self._recv()

    def close(self):
        self.p.stdin.write(json.dumps({"quit": 1}) + "\n")
        self.p.stdin.flush()
        bye = self._recv()
        self.p.wait()
        return bye


def hf_malloc(args) -> str:
    return "default" if args.hf_malloc == "default" else "uvjax"


TUNABLES: dict = {}  # side → the GLIBC_TUNABLES its workers ran with (reported in the payload)


def alternate(workers: dict, arg, rounds: int, snap_s: float):
    """Timed units A B A B …, a CPU snapshot before each; returns per side: results and snapshots."""
    from benchmarks.common import cpu_snapshot
    out = {k: {"runs": [], "snapshots": []} for k in workers}
    for _ in range(rounds):
        for k, w in workers.items():
            out[k]["snapshots"].append(cpu_snapshot(snap_s))
            out[k]["runs"].append(w.run(arg))
    return out


def _snap_summary(snaps):
    return {"cpu_busy_percent_median": statistics.median(s["cpu_busy_percent"] for s in snaps),
            "cpu_busy_percent_max": max(s["cpu_busy_percent"] for s in snaps),
            "loadavg_1m_max": max(s["loadavg_1m"] for s in snaps)}


def matmul_floor(flops_per_step: float, peak_gflops: float, hf_step_s: float) -> tuple[float, float]:
    """(floor seconds, ratio at the floor): the step's useful FLOPs at the in-run 2048² matmul rate — a
    uvjax step made of nothing but GEMMs at that rate — and HF's step time over it, the largest training
    ratio the machine's state allows (other GEMM shapes run a little faster or slower than the square one)."""
    floor = flops_per_step / (peak_gflops * 1e9)
    return floor, hf_step_s / floor


def train_compare(name, weights, args):
    from uvjax.training.flops import train_flops_per_step
    s = spec_of(name)
    ws = {"jax": Worker("jax", "train", name, weights, args),
          "torch": Worker("torch", "train", name, weights, args, malloc=hf_malloc(args))}
    if args.hf_malloc == "both":  # a third worker: HF in glibc's default malloc (its own defaults)
        ws["torch_default_malloc"] = Worker("torch", "train", name, weights, args, malloc="default")
    TUNABLES.update({k: w.ready["glibc_tunables"] for k, w in ws.items()})
    if args.ablate_attn_block:  # the same uvjax step with the attention as one T×T block (before issue 9)
        ws["jax_one_block"] = Worker("jax", "train", name, weights, args, attn_block=0)
    # warm-up (first steps: compile on the JAX side, allocator warm-up on both) — losses kept for the check
    warm = {k: w.run(args.warmup) for k, w in ws.items()}
    res = alternate(ws, 1, args.steps, args.snapshot_s)
    bye = {k: w.close() for k, w in ws.items()}
    row = {"config": name, "spec": s, "tokens_per_step": s["batch"] * s["seq"]}
    for k in ws:
        times = [t for r in res[k]["runs"] for t in r["times"]]
        losses = warm[k]["losses"] + [l for r in res[k]["runs"] for l in r["losses"]]
        cpu = [c for r in res[k]["runs"] for c in r["cpu"]]
        med = statistics.median(times)
        row[k] = {"step_s_median": med, "step_s_all": times, "tokens_per_s": row["tokens_per_step"] / med,
                  "cpu_user_s_all": [u for u, _ in cpu], "cpu_sys_s_all": [y for _, y in cpu],
                  "losses": losses, "peak_rss_mb": bye[k]["rss_mb"], "setup": ws[k].ready,
                  "idle": _snap_summary(res[k]["snapshots"]), "warmup_s": warm[k]["times"]}
    row["ratio_tokens_per_s"] = row["jax"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
    lj, lt = row["jax"]["losses"], row["torch"]["losses"]
    row["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(lj, lt))
    row["loss_first_step"] = {"jax": lj[0], "torch": lt[0]}
    info = ws["jax"].ready["info"]
    fl = train_flops_per_step(batch=s["batch"], seq=s["seq"], hidden=s["hidden"], layers=s["layers"],
                              heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["hidden"] // s["heads"],
                              intermediate=s["intermediate"], vocab=s["vocab"], num_codes=s.get("codes", 16),
                              text_targets=info["text_targets_per_row"], image_targets=0, lora_rank=s["rank"])
    row["useful_flops_per_token"] = fl["per_token"]
    # peak: median of the measurements taken right after each timed uvjax step (same load), the one at
    # start-up reported too
    row["matmul_peak_gflops_start"] = info["matmul_peak_gflops"]
    row["matmul_peak_gflops_all"] = [r["matmul_peak_gflops"] for r in res["jax"]["runs"]]
    row["matmul_peak_gflops"] = statistics.median(row["matmul_peak_gflops_all"])
    row["compile_s"] = info["compile_s"]
    for k in ws:
        row[k]["achieved_gflops"] = fl["total"] / row[k]["step_s_median"] / 1e9
    row["fraction_of_matmul_peak"] = row["jax"]["achieved_gflops"] / row["matmul_peak_gflops"]
    row["matmul_floor_s"], row["ratio_at_matmul_floor"] = matmul_floor(
        fl["total"], row["matmul_peak_gflops"], row["torch"]["step_s_median"])
    row["rss_ratio"] = row["jax"]["peak_rss_mb"] / row["torch"]["peak_rss_mb"]
    if "torch_default_malloc" in ws:
        row["ratio_vs_torch_default_malloc"] = row["jax"]["tokens_per_s"] / row["torch_default_malloc"]["tokens_per_s"]
        print(f"  HF+peft with glibc's default malloc: {row['torch_default_malloc']['tokens_per_s']:.0f} tok/s "
              f"(uvjax ×{row['ratio_vs_torch_default_malloc']:.2f}), RSS "
              f"{row['torch_default_malloc']['peak_rss_mb']:.0f} MB")
    if "jax_one_block" in ws:
        row["jax_one_block"]["compile_s"] = ws["jax_one_block"].ready["info"]["compile_s"]
        row["ratio_one_block_vs_torch"] = row["jax_one_block"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
        print(f"  ablation (attention as one T×T block): {row['jax_one_block']['tokens_per_s']:.0f} tok/s "
              f"(×{row['ratio_one_block_vs_torch']:.2f} HF), RSS {row['jax_one_block']['peak_rss_mb']:.0f} MB")
    print(f"train {name}: uvjax {row['jax']['tokens_per_s']:.0f} tok/s vs HF+peft {row['torch']['tokens_per_s']:.0f}"
          f" → ×{row['ratio_tokens_per_s']:.2f} | loss diff {row['loss_max_abs_diff']:.2e} | uvjax "
          f"{row['jax']['achieved_gflops']:.0f} GFLOP/s = {100 * row['fraction_of_matmul_peak']:.0f}% of "
          f"{row['matmul_peak_gflops']:.0f} | RSS {row['jax']['peak_rss_mb']:.0f} vs "
          f"{row['torch']['peak_rss_mb']:.0f} MB | compile {row['compile_s']:.1f} s | at the matmul floor "
          f"({row['matmul_floor_s']:.2f} s) the ratio would be ×{row['ratio_at_matmul_floor']:.2f}", flush=True)
    return row


def decode_compare(name, weights, args):
    ws = {"jax": Worker("jax", "decode", name, weights, args),
          "torch": Worker("torch", "decode", name, weights, args, malloc=hf_malloc(args))}
    TUNABLES.update({k: w.ready["glibc_tunables"] for k, w in ws.items()})
    rows = []
    for B in [int(x) for x in args.decode_batches.split(",")]:
        warm = {k: w.run(B) for k, w in ws.items()}  # compile on the JAX side
        res = alternate(ws, B, args.decode_reps, args.snapshot_s)
        row = {"config": name, "batch": B, "prompt": args.prompt, "new_tokens": args.new_tokens}
        for k in ws:
            times = [t for r in res[k]["runs"] for t in r["times"]]
            med = statistics.median(times)
            row[k] = {"s_median": med, "s_all": times, "first_run_s": warm[k]["times"][0],
                      "new_tokens_per_s": B * args.new_tokens / med, "idle": _snap_summary(res[k]["snapshots"])}
        row["ratio_new_tokens_per_s"] = row["jax"]["new_tokens_per_s"] / row["torch"]["new_tokens_per_s"]
        a, b = res["jax"]["runs"][-1]["tokens"], res["torch"]["runs"][-1]["tokens"]
        row["greedy_first16_agree"] = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))
        rows.append(row)
        print(f"decode {name} batch {B}: uvjax {row['jax']['new_tokens_per_s']:.0f} new tok/s vs HF "
              f"{row['torch']['new_tokens_per_s']:.0f} → ×{row['ratio_new_tokens_per_s']:.2f} | greedy first 16 "
              f"agree {100 * row['greedy_first16_agree']:.0f}%", flush=True)
    bye = {k: w.close() for k, w in ws.items()}
    for r in rows:
        for k in ws:
            r[k]["peak_rss_mb"] = bye[k]["rss_mb"]
    return rows


SIDE_NAMES = {"jax": "uvjax", "torch": "HF+peft", "torch_default_malloc": "HF+peft, default malloc",
              "jax_one_block": "uvjax, one block"}


def markdown(payload) -> str:
    m, idle = payload["machine"], payload["idle"]
    cpus = payload["args"].get("cpus")
    pinned = f" (every worker pinned to CPUs {cpus})" if cpus else ""
    from benchmarks.common import machine_line
    lines = [f"# uvjax vs HF transformers + peft ({m['date']})", "", machine_line(m), "",
             f"Machine: {m['platform']}, {idle['cores']} cores{pinned}, jax {m['jax']}, torch {payload['torch_version']} "
             f"({payload['args']['torch_threads']} threads), transformers {payload['transformers_version']}, "
             f"peft {payload['peft_version']}. Idle check at start: {idle['cpu_busy_percent']}% busy, "
             f"load {idle['loadavg_1m']:.2f}. GLIBC_TUNABLES uvjax / HF workers: "
             f"`{payload.get('glibc_tunables', {}).get('jax') or '-'}` / "
             f"`{payload.get('glibc_tunables', {}).get('torch') or '-'}`.", "", f"Command: `{payload['command']}`", "",
             "## Train step (fp32, LoRA on 7 projections, AdamW on LoRA only)", "",
             "| config | uvjax tok/s | HF+peft tok/s | ratio | target | ratio at the matmul floor | max loss diff "
             "| uvjax GFLOP/s | % of matmul peak | RSS uvjax / HF (MB) | compile (s) "
             "| CPU busy before units (median/max %) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in payload["train"]:
        t = TARGETS.get(r["config"], {}).get("train")
        lines.append(
            f"| {r['config']} | {r['jax']['tokens_per_s']:.0f} | {r['torch']['tokens_per_s']:.0f} | "
            f"×{r['ratio_tokens_per_s']:.2f} | {'≥ ×%.1f' % t if t else '–'} | "
            f"{'×%.2f' % r['ratio_at_matmul_floor'] if 'ratio_at_matmul_floor' in r else '–'} | {r['loss_max_abs_diff']:.1e} | "
            f"{r['jax']['achieved_gflops']:.0f} | {100 * r['fraction_of_matmul_peak']:.0f}% of "
            f"{r['matmul_peak_gflops']:.0f} | {r['jax']['peak_rss_mb']:.0f} / {r['torch']['peak_rss_mb']:.0f} | "
            f"{r['compile_s']:.1f} | {r['jax']['idle']['cpu_busy_percent_median']:.0f}/"
            f"{max(r['jax']['idle']['cpu_busy_percent_max'], r['torch']['idle']['cpu_busy_percent_max']):.0f} |")
    dm = [r for r in payload["train"] if "torch_default_malloc" in r]
    if dm:
        lines += ["", "Same run, a third worker: HF+peft with glibc's default malloc (no GLIBC_TUNABLES):", "",
                  "| config | HF tok/s (uvjax's malloc) | HF tok/s (default malloc) | uvjax ratio vs default-malloc HF "
                  "| RSS (MB) |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in dm:
            lines.append(f"| {r['config']} | {r['torch']['tokens_per_s']:.0f} | "
                         f"{r['torch_default_malloc']['tokens_per_s']:.0f} | ×{r['ratio_vs_torch_default_malloc']:.2f} | "
                         f"{r['torch_default_malloc']['peak_rss_mb']:.0f} |")
    if payload["train"]:
        lines += ["", "*Ratio at the matmul floor*: HF's step time over the step's useful FLOPs at the in-run 2048² "
                      "matmul rate — the ratio a uvjax step made of nothing but GEMMs at that rate would reach; the "
                      "largest this machine state allows (GEMMs of other shapes can run a little faster or slower)."]
        sides = [k for k in ("jax", "torch", "torch_default_malloc", "jax_one_block") if k in payload["train"][0]]
        lines += ["", "CPU seconds per timed step, median user / system (the worker process, all threads; system "
                      "time is page faults and the kernel zeroing pages):", "",
                  "| config | " + " | ".join(SIDE_NAMES[k] for k in sides) + " |",
                  "| --- |" + " ---: |" * len(sides)]
        for r in payload["train"]:
            cells = [f"{statistics.median(r[k]['cpu_user_s_all']):.2f} / {statistics.median(r[k]['cpu_sys_s_all']):.2f}"
                     if r.get(k, {}).get("cpu_user_s_all") else "–" for k in sides]
            lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    abl = [r for r in payload["train"] if "jax_one_block" in r]
    if abl:
        lines += ["", "Ablation, same run: uvjax with its causal attention as one T×T block (no query blocks):", "",
                  "| config | uvjax tok/s (blocked) | one block tok/s | ratio vs HF (one block) | RSS one block (MB) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in abl:
            lines.append(f"| {r['config']} | {r['jax']['tokens_per_s']:.0f} | {r['jax_one_block']['tokens_per_s']:.0f} | "
                         f"×{r['ratio_one_block_vs_torch']:.2f} | {r['jax_one_block']['peak_rss_mb']:.0f} |")
    if payload["decode"]:
        lines += ["", f"## Greedy decode (prompt {payload['args']['prompt']}, {payload['args']['new_tokens']} new "
                      "tokens, KV cache, end-to-end wall time)", "",
                  "| config | batch | uvjax new tok/s | HF generate new tok/s | ratio | target | greedy agree (first 16) "
                  "| RSS uvjax / HF (MB) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in payload["decode"]:
            t = TARGETS.get(r["config"], {}).get(f"decode_b{r['batch']}")
            lines.append(
                f"| {r['config']} | {r['batch']} | {r['jax']['new_tokens_per_s']:.0f} | "
                f"{r['torch']['new_tokens_per_s']:.0f} | ×{r['ratio_new_tokens_per_s']:.2f} | "
                f"{'≥ ×%.0f' % t if t else '–'} | {100 * r['greedy_first16_agree']:.0f}% | "
                f"{r['jax']['peak_rss_mb']:.0f} / {r['torch']['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="S,M", help="train configs")
    ap.add_argument("--steps", type=int, default=6, help="timed train steps per side (alternated)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--decode_config", default="S")
    ap.add_argument("--decode_batches", default="1,8", help="empty: skip decoding")
    ap.add_argument("--decode_reps", type=int, default=3)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch_threads", type=int, default=0, help="torch's threads (0: one per CPU the workers run on)")
    ap.add_argument("--cpus", default="", help="pin every worker to these CPU ids (e.g. 0: both sides on one core; "
                                               "XLA's pool sizes itself to them, torch gets one thread each)")
    ap.add_argument("--hf_full_logits", action="store_true", help="HF computes logits at every position")
    ap.add_argument("--hf_malloc", default="uvjax", choices=["uvjax", "default", "both"],
                    help="glibc malloc settings of the HF workers: uvjax's (uvjax/runtime_env.py, as the uvjax workers "
                         "and `python -m uvjax.*` have them), glibc's defaults, or both (a third, default-malloc HF "
                         "worker in training; decoding uses uvjax's)"),
    ap.add_argument("--ablate_attn_block", action="store_true",
                    help="also time uvjax with its causal attention as one T×T block (a third worker)")
    ap.add_argument("--attn_block", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--scan_unroll", type=int, default=0,
                    help="uvjax training: layers per loop iteration (0: no loop; the setting for these 4-8 layers)")
    ap.add_argument("--decode_scan_unroll", type=int, default=0, help="uvjax decoding: the same, for the decode loop")
    ap.add_argument("--snapshot_s", type=float, default=0.5, help="CPU snapshot before each timed unit")
    ap.add_argument("--out", default="benchmarks/results/compare_torch.json")
    ap.add_argument("--md", default="", help="Markdown table path (default: --out with .md)")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--side")
    ap.add_argument("--task")
    ap.add_argument("--config")
    ap.add_argument("--weights")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    args.torch_threads = args.torch_threads or len(parse_cpus(args.cpus) if args.cpus else os.sched_getaffinity(0))

    import tempfile
    import numpy as np
    from benchmarks.common import idle_check, machine, write_json
    idle = idle_check()
    payload = {"machine": machine(), "idle": idle, "args": vars(args), "command": " ".join(sys.argv),
               "train": [], "decode": []}
    from importlib.metadata import version
    for p in ("torch", "transformers", "peft"):
        payload[f"{p}_version"] = version(p)
    with tempfile.TemporaryDirectory() as tmp:
        names = [c for c in args.configs.split(",") if c]
        if args.decode_batches and args.decode_config not in names:
            names.append(args.decode_config)
        paths = {}
        for name in names:
            paths[name] = os.path.join(tmp, f"{name}.npz")
            np.savez(paths[name], **make_weights(spec_of(name), args.seed))
        for name in [c for c in args.configs.split(",") if c]:
            payload["train"].append(train_compare(name, paths[name], args))
        if args.decode_batches:
            payload["decode"] = decode_compare(args.decode_config, paths[args.decode_config], args)
    payload["glibc_tunables"] = dict(TUNABLES)
    write_json(args.out, payload)
    md = args.md or os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(payload))
    print(f"wrote {md}")
    print(markdown(payload))


if __name__ == "__main__":
    main()
