"""Analytic *useful* FLOPs of a train step (what MFU divides by).

Counted: matmul FLOPs (2·m·n·k) that the loss actually needs.
- Forward per token and layer: q/k/v/o and gate/up/down projections (plus LoRA's two thin matmuls per
  targeted projection), and attention scores + weighted values, *halved* for causal masking
  (2·2·T·H·D / 2 per token).
- Logits only where targets are: LM head 2·E·V per text target, generation head 2·E·K per image target.
- Backward: activation gradients for every matmul (1× forward) and weight gradients only for
  trainable weights (1× their forward): a frozen base costs 2×, a trainable matrix 3×, attention 3×.
Not counted: norms, RoPE, softmax, elementwise ops, remat recomputation, the adapters' tiny matmuls.
"""
from __future__ import annotations


def train_flops_per_step(*, batch: int, seq: int, hidden: int, layers: int, heads: int, kv_heads: int,
                         head_dim: int, intermediate: int, vocab: int, num_codes: int,
                         text_targets: float, image_targets: float, lora_rank: int = 0,
                         lora_targets=("q", "k", "v", "o", "gate", "up", "down"), base_trainable: bool = False,
                         lm_head_trainable: bool = False) -> dict:
    """``text_targets`` / ``image_targets``: target counts per sequence."""
    E, H, K, D, I = hidden, heads, kv_heads, head_dim, intermediate
    shapes = {"q": (E, H * D), "k": (E, K * D), "v": (E, K * D), "o": (H * D, E),
              "gate": (E, I), "up": (E, I), "down": (I, E)}
    proj_fwd = sum(2 * a * b for a, b in shapes.values())  # per token per layer
    lora_fwd = sum(2 * lora_rank * (a + b) for n, (a, b) in shapes.items() if lora_rank and n in lora_targets)
    attn_fwd = 2 * 2 * seq * H * D / 2  # per token per layer, causal halved
    tokens = batch * seq
    base_mult = 3 if base_trainable else 2
    per_layer = tokens * (proj_fwd * base_mult + lora_fwd * 3 + attn_fwd * 3)
    decoder = layers * per_layer
    lm = batch * text_targets * 2 * E * vocab * (3 if lm_head_trainable else 2)
    gen = batch * image_targets * 2 * E * num_codes * 3  # the generation head always trains
    total = decoder + lm + gen
    return {"total": total, "decoder": decoder, "lm_head": lm, "generation_head": gen,
            "per_token": total / tokens}
