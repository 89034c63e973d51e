"""Analytic FLOP counts and per-device peak FLOP/s, for MFU.

FLOPs are counted by hand rather than read from XLA because `cost_analysis()` counts a scanned layer
once instead of once per layer. Remat recomputation is not counted (MFU, not hardware utilisation).
"""

from __future__ import annotations

import jax

from jaxlm.core.config import ModelConfig

# Dense bf16 datasheet peaks per chip (TPU) or per GPU, in FLOP/s.
PEAK_FLOPS = {
    "cpu": 185e9,  # measured float32 FMA ceiling of the 2-core reference host (shared/PLATFORM.md)
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}


def peak_flops_per_device(device=None) -> float:
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return PEAK_FLOPS["cpu"]
    kind = device.device_kind
    matches = [k for k in PEAK_FLOPS if kind.startswith(k)]
    if not matches:
        raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; set train.peak_flops")
    return PEAK_FLOPS[max(matches, key=len)]


def matmul_params(c: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: every layer weight plus the output projection."""
    h = c.resolved_head_dim
    attn = c.d_model * h * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.d_model * c.mlp_dim
    return c.num_layers * (attn + mlp) + c.d_model * c.vocab_size


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter, plus attention scores and values (fwd + bwd).

    Attention counts the full T x T square (no causal halving), the usual convention (PaLM appendix B).
    """
    window = min(seq_len, c.sliding_window) if c.sliding_window else seq_len
    attention = 12 * c.num_layers * c.num_heads * c.resolved_head_dim * window
    return 6 * matmul_params(c) + attention
