"""Building blocks of the Transformer: RMSNorm, rotary embeddings and the SwiGLU MLP (LLaMA family);
LayerNorm and the GELU MLP (GPT-2).

Shape letters: B batch, T length, D model width, N query heads, K KV heads, H head dim, F MLP width.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.core.config import ModelConfig
from jaxlm.core.sharding import constrain
from jaxlm.model.quantize import is_quantized


def param_dtype(config: ModelConfig):
    return jnp.dtype(config.param_dtype)


def compute_dtype(config: ModelConfig):
    return jnp.dtype(config.dtype)


LORA_A, LORA_B = "_lora_a", "_lora_b"  # suffixes of the adapter params `jaxlm.model.lora` places beside a weight


@dataclasses.dataclass(frozen=True)
class LowRank:
    """A weight with a LoRA update, w + a @ b (a: (*in, r), b: (r, *out), scale folded into b); see `dense`.
    A mixture-of-experts stack's are batched over its leading expert axis, (E, *in, r) and (E, r, *out)
    (`moe.expert_weights` merges those)."""

    w: jax.Array
    a: jax.Array
    b: jax.Array

    def astype(self, dtype) -> "LowRank":
        return LowRank(self.w.astype(dtype), self.a.astype(dtype), self.b.astype(dtype))


def weight(module: nn.Module, name: str, shape, names, config: ModelConfig, fan_in: int | None = None):
    """A weight with logical axis names, initialised N(0, init_std) (scaled by fan-in when given).

    With LoRA adapters beside it (params `{name}_lora_a`, `{name}_lora_b`, placed by `jaxlm.model.lora`) it is a
    `LowRank`, which `dense` applies as x @ w + (x @ a) @ b."""
    stored = module.get_variable("params", name) if module.has_variable("params", name) else None
    if is_quantized(stored):  # weight-only quantized (jaxlm.model.quantize): dequantize into the compute dtype
        w = stored.dequantize(compute_dtype(config))
    else:
        std = config.init_std if fan_in is None else 1.0 / math.sqrt(fan_in)
        init = nn.with_logical_partitioning(nn.initializers.normal(std), names)
        w = module.param(name, init, shape, param_dtype(config))
    if module.has_variable("params", name + LORA_A):
        return LowRank(w, module.get_variable("params", name + LORA_A), module.get_variable("params", name + LORA_B))
    return w


def row_defaults(tokens_bt, positions_bt=None, segment_ids_bt=None):
    """(positions, segment ids) of a batch, each the given one or, if None, that of one unpacked document
    per row: positions 0..T-1, segment id 1 everywhere."""
    if positions_bt is None:
        positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    if segment_ids_bt is None:
        segment_ids_bt = jnp.ones_like(tokens_bt)
    return positions_bt, segment_ids_bt


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """Contracts the last `n_in` dims of x with the first `n_in` of w, as one 2-D matmul.

    Same result as the einsum; XLA:CPU runs the flattened 2-D form about 1.5x faster, most of all in the
    backward pass, where the einsum's weight gradient contracts over two (batch, length) dims.
    """
    if isinstance(w, LowRank):  # LoRA on activations: no gradient of the (frozen) full weight is formed
        return dense(x, w.w, n_in) + dense(dense(x, w.a, n_in), w.b)
    k = math.prod(w.shape[:n_in])
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*x.shape[: x.ndim - n_in], *w.shape[n_in:])


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(config: ModelConfig) -> jax.Array:
    """Inverse frequencies (H/2,), with LLaMA-3 scaling of the low frequencies when configured."""
    h = config.resolved_head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if not config.rope_scaling_factor:
        return inv
    factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelen = 2 * jnp.pi / inv
    low_wavelen = config.rope_original_max_len / low
    high_wavelen = config.rope_original_max_len / high
    smooth = (config.rope_original_max_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates (B, T, heads, H) by position, pairing dimension i with i + H/2 (the Hugging Face layout)."""
    angles = positions[:, :, None, None].astype(jnp.float32) * inv_freq  # (B, T, 1, H/2)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    config: ModelConfig
    mlp_dim: int = 0  # 0: config.mlp_dim (a MoE's shared expert has its own width)

    @nn.compact
    def __call__(self, x_btd):
        c = self.config
        dt = compute_dtype(c)
        f = self.mlp_dim or c.mlp_dim
        gate_df = weight(self, "gate", (c.d_model, f), ("embed", "mlp"), c)
        up_df = weight(self, "up", (c.d_model, f), ("embed", "mlp"), c)
        down_fd = weight(self, "down", (f, c.d_model), ("mlp", "embed"), c)
        x_btd = x_btd.astype(dt)
        gate_btf = dense(x_btd, gate_df.astype(dt))
        up_btf = dense(x_btd, up_df.astype(dt))
        h_btf = constrain(
            jax.nn.silu(gate_btf) * up_btf, ("activation_batch", "activation_length", "activation_mlp")
        )
        return dense(h_btf, down_fd.astype(dt))


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias (GPT-2), computed in float32."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


# model.mlp_activation's functions, by the name after its "gated_" prefix: "gelu" is the exact (erf) GELU of
# BERT, "gelu_tanh" the tanh approximation of GPT-2 and of T5's gated-gelu (transformers' gelu_new).
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


class GeluMLP(nn.Module):
    """The biased, non-gated MLP of GPT-2 and BERT: down(act(x @ up + up_bias)) + down_bias, act the model's
    `mlp_activation` (GPT-2: gelu_tanh, BERT: gelu; `config.check_activation` keeps it non-gated)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        c = self.config
        dt = compute_dtype(c)
        up_df = weight(self, "up", (c.d_model, c.mlp_dim), ("embed", "mlp"), c)
        down_fd = weight(self, "down", (c.mlp_dim, c.d_model), ("mlp", "embed"), c)
        zeros = lambda names: nn.with_logical_partitioning(nn.initializers.zeros, names)
        up_bias = self.param("up_bias", zeros(("mlp",)), (c.mlp_dim,), param_dtype(c))
        down_bias = self.param("down_bias", zeros(("norm",)), (c.d_model,), param_dtype(c))
        x_btd = x_btd.astype(dt)
        h_btf = ACTIVATIONS[c.resolved_mlp_activation](dense(x_btd, up_df.astype(dt)) + up_bias.astype(dt))
        h_btf = constrain(h_btf, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(h_btf, down_fd.astype(dt)) + down_bias.astype(dt)
