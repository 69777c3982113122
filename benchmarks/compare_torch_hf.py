"""The HF transformers + peft side of benchmarks/compare_torch.py: the independent reference.

HF ``LlamaForCausalLM`` (fp32, ``attn_implementation="sdpa"``) wrapped by peft LoRA on the seven projections,
loaded with the shared weights (benchmarks/compare_torch_common.py); its per-token loss under uvjax's text-target
masks, its AdamW step on the LoRA factors, and the timed units its worker runs (``UNITS``). Needs the torch
extra (torch, transformers, peft); only the HF workers (and tests/test_compare_torch.py) import it.
"""
from __future__ import annotations

import time

import torch

from benchmarks.compare_torch_common import PROJ_HF, decode_prompts, logits_to_keep, source_mask, text_batch, timed
from benchmarks.torch_compat import ensure_torchvision_importable


def import_hf():
    """transformers + peft (the registry's torchvision made importable first: benchmarks/torch_compat.py)."""
    ensure_torchvision_importable()
    import peft  # reason: only importable after the torchvision fix above
    import transformers  # reason: as peft
    return transformers, peft


def hf_model(s: dict, w: dict):
    """HF LlamaForCausalLM (fp32, sdpa) + peft LoRA on the 7 projections, loaded with ``w``."""
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


def torch_optimizer(model, lr: float = 2e-4):
    """torch AdamW over the trainable (LoRA) parameters, matching uvjax_config's optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def torch_train_step(model, opt, batch: dict, keep: int = 0) -> float:
    """One HF+peft step: loss (uvjax text-target masks) → backward → AdamW. Returns the pre-update loss."""
    opt.zero_grad(set_to_none=True)
    loss = hf_loss(model, batch, keep)
    loss.backward()
    opt.step()
    return float(loss.detach())


# ============================================================================ the HF worker's timed units
class TorchTrain:
    def __init__(self, s, w, args):
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
            loss, dt, c = timed(lambda: torch_train_step(self.model, self.opt, self.batch, self.keep))
            losses.append(loss)
            times.append(dt)
            cpu.append(c)
        return {"times": times, "losses": losses, "cpu": cpu}


class TorchDecode:
    def __init__(self, s, w, args):
        self.model = hf_model(s, w)
        self.model.eval()
        self.s, self.args, self.info = s, args, {}

    def run(self, batch):
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


UNITS = {"train": TorchTrain, "decode": TorchDecode}


def worker_setup(args):
    """An HF worker, before it builds its unit: torch's thread count, then transformers + peft."""
    torch.set_num_threads(args.torch_threads)
    import_hf()
