"""Analytic FLOP counts and per-device peak FLOP/s, for MFU.

FLOPs are counted by hand rather than read from XLA because `cost_analysis()` counts a scanned layer
once instead of once per layer. Remat recomputation is not counted (MFU, not hardware utilisation), and a mixture of
experts counts only its active parameters (the k experts each token is routed to, not all E).
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


def moe_layer_count(c: ModelConfig) -> int:
    return sum(c.is_moe_layer(i) for i in range(c.num_layers))


def _ffn_matmul_params(c: ModelConfig, moe: bool) -> int:
    """One layer's feed-forward weights that multiply each token: a MoE layer's router, its k routed
    experts (not all E: the others never see the token) and its shared expert (with its sigmoid gate)."""
    d = c.d_model
    if not moe:  # a gated MLP has three matrices, a plain one (GPT-2, BERT) two
        return (3 if c.resolved_mlp_activation.startswith("gated") else 2) * d * c.mlp_dim
    routed = c.experts_per_token * 3 * d * c.resolved_expert_mlp_dim
    shared = 3 * d * c.shared_expert_dim + (d if c.shared_expert_gate else 0) if c.shared_expert_dim else 0
    return routed + shared + d * c.num_experts


def matmul_params(c: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: every layer weight plus the output projection.
    For a mixture of experts only the active ones, so that MFU counts the work each token really does.
    An encoder-decoder's: every matmul weight once (one input token's plus one target token's)."""
    if c.encoder_decoder:
        return sum(_encoder_decoder_matmuls(c))
    h = c.resolved_head_dim
    kv_heads = c.num_heads if c.encoder_only else c.num_kv_heads  # jaxlm's encoder has no GQA
    attn = c.d_model * h * (2 * c.num_heads + 2 * kv_heads)
    moe = moe_layer_count(c)
    ffn = (c.num_layers - moe) * _ffn_matmul_params(c, False) + moe * _ffn_matmul_params(c, True)
    mlm = c.d_model * c.d_model if c.encoder_only else 0  # the masked-LM head's transform before the vocabulary
    return c.num_layers * attn + ffn + mlm + c.d_model * c.vocab_size


def routed_expert_params(c: ModelConfig) -> int:
    """The routed experts' weights in the whole model (every MoE layer's E x SwiGLU); 0 for a dense model."""
    return moe_layer_count(c) * c.num_experts * 3 * c.d_model * c.resolved_expert_mlp_dim


def active_params(c: ModelConfig, total: int) -> int:
    """Parameters one token uses, given the model's `total` (count_params of its `jax.eval_shape`): all
    of them but the E - k routed experts per MoE layer it is not sent to. Equal to `total` for a dense model."""
    if not c.num_experts:
        return total
    return total - routed_expert_params(c) * (c.num_experts - c.experts_per_token) // c.num_experts


def flops_per_token(c: ModelConfig, seq_len: int, target_len: int = 0) -> float:
    """Training FLOPs per token: 6 per matmul parameter, plus attention scores and values (fwd + bwd).

    Attention counts the full T x T square (no causal halving), the usual convention (PaLM appendix B).
    An encoder-decoder's are per token processed, input and target tokens alike, for rows of `seq_len` input
    and `target_len` (0: as many) target tokens (`_encoder_decoder_flops`).
    """
    if c.encoder_decoder:
        return _encoder_decoder_flops(c, seq_len, target_len or seq_len)
    window = min(seq_len, c.sliding_window) if c.sliding_window else seq_len
    attention = 12 * c.num_layers * c.num_heads * c.resolved_head_dim * window
    return 6 * matmul_params(c) + attention


def _encoder_decoder_matmuls(c: ModelConfig) -> tuple[int, int]:
    """T5: (matmul weights per input token, per target token). An input token goes through the encoder's
    layers and every decoder layer's cross-attention keys and values; a target token through the decoder's
    self-attention, cross-attention queries and outputs, MLP, and the head."""
    d, nh = c.d_model, c.num_heads * c.resolved_head_dim
    attn, ffn = 4 * d * nh, _ffn_matmul_params(c, False)
    per_input = c.num_layers * (attn + ffn) + c.resolved_decoder_layers * 2 * d * nh
    per_target = c.resolved_decoder_layers * (attn + 2 * d * nh + ffn) + d * c.vocab_size
    return per_input, per_target


def _encoder_decoder_flops(c: ModelConfig, s: int, t: int) -> float:
    """A row pair of s input and t target tokens: 6 FLOPs per weight per token it multiplies, plus the
    attention squares (encoder s x s, decoder t x t and cross t x s), spread over its s + t tokens."""
    per_input, per_target = _encoder_decoder_matmuls(c)
    nh = c.num_heads * c.resolved_head_dim
    attention = 12 * nh * (c.num_layers * s * s + c.resolved_decoder_layers * t * (t + s))
    return (6 * (s * per_input + t * per_target) + attention) / (s + t)
