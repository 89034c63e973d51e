"""Weight-only quantization: int8, int4 and NF4 with one float32 scale per block of the last axis.

A quantized weight is a `QuantizedArray` pytree whose leaves keep every leading axis of the original, so
slicing a scanned (L, ...) stack along its layer axis slices the quantized form too; `layers.weight`
dequantizes such leaves on the fly, so quantized params drop into the same model code as float ones.

Layout for an array x of shape (..., n) and block size b (b divides n):
  codes  (..., n/b, b)    int8 for "int8"; uint8 holding two 4-bit codes per byte for "int4" and "nf4" (..., n/b, b/2)
  scale  (..., n/b, 1)    float32: absmax of the block / largest code magnitude
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.core.config import ConfigError
from jaxlm.core.sharding import tree_shardings

FORMATS = ("int8", "int4", "nf4")

# The 16 NF4 levels of QLoRA (Dettmers et al., 2023): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)

# Which params are quantized by default: every projection of the blocks (T5's cross-attention and wi/wo
# MLPs too; a MoE layer's stacked experts, blocked along their last axis like any weight, and its shared
# expert) and the untied output head. Embeddings (a gather, no matmul), norms, biases, T5's relative
# position tables and the MoE router and shared-expert gate stay in float: the routing weights are tiny, and
# rounding them would flip which experts a token picks.
DEFAULT_INCLUDE = r"((attn|cross)/(q|k|v|o)|mlp/(gate|up|down|wi|wi_0|wi_1|wo)|moe/(shared/)?(gate|up|down)|lm_head)$"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    codes: jax.Array
    scale: jax.Array
    fmt: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        per_byte = 1 if self.fmt == "int8" else 2
        *lead, blocks, width = self.codes.shape
        return (*lead, blocks * width * per_byte)

    @property
    def nbytes(self) -> int:
        return int(self.codes.size * self.codes.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        if self.fmt == "int8":
            values = self.codes.astype(jnp.float32)
        else:
            low = (self.codes & 0xF).astype(jnp.int32)
            high = (self.codes >> 4).astype(jnp.int32)
            nibbles = jnp.stack([low, high], axis=-1).reshape(*self.codes.shape[:-1], -1)
            if self.fmt == "int4":
                values = (nibbles - 8).astype(jnp.float32)
            else:
                values = jnp.asarray(NF4_LEVELS)[nibbles]
        return (values * self.scale).reshape(self.shape).astype(dtype)


def block_size_for(n: int, fmt: str, block_size: int) -> int:
    """The block actually used for a last axis of n: the largest divisor of n that is <= block_size."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        # gcd(n, 0) is n: a 0 would silently mean one block per row instead of an error.
        raise ConfigError(f"block_size={block_size!r} is out of range: must be >= 1")
    b = math.gcd(n, block_size)
    if fmt != "int8" and b % 2:
        raise ConfigError(f"{fmt} packs two codes per byte, so the last axis ({n}) must be even")
    return b


def quantize(x: jax.Array, fmt: str = "int8", block_size: int = 128) -> QuantizedArray:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")
    x = jnp.asarray(x, jnp.float32)
    b = block_size_for(x.shape[-1], fmt, block_size)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    top = {"int8": 127.0, "int4": 7.0, "nf4": 1.0}[fmt]
    scale = jnp.where(absmax > 0, absmax / top, 1.0)
    normed = blocks / scale
    if fmt == "int8":
        return QuantizedArray(jnp.clip(jnp.round(normed), -127, 127).astype(jnp.int8), scale, fmt)
    if fmt == "int4":
        codes = (jnp.clip(jnp.round(normed), -7, 7) + 8).astype(jnp.uint8)
    else:  # nearest NF4 level
        codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1).astype(jnp.uint8)
    pairs = codes.reshape(*codes.shape[:-1], b // 2, 2)
    return QuantizedArray(pairs[..., 0] | (pairs[..., 1] << 4), scale, fmt)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def quantize_params(params, fmt: str = "int8", block_size: int = 128, include: str = DEFAULT_INCLUDE):
    """Quantizes the leaves whose '/'-joined path matches `include` (searched, not anchored at the start).

    A weight boxed in `nn.LogicallyPartitioned` with names (*lead, last) gives codes and scale boxed with
    (*lead, last, None): the block axis takes the split axis's name, so the quantized weight shards like
    the float one (`sharding._fit` drops mesh axes the block count cannot be split over) instead of being
    replicated on every device."""
    pattern = re.compile(include)

    def visit(path, leaf):
        value = leaf.value if _is_box(leaf) else leaf
        if value.ndim < 2 or not pattern.search(_path_str(path)):
            return leaf
        q = quantize(value, fmt, block_size)
        if not _is_box(leaf):
            return q
        names = (*leaf.names, None)
        return dataclasses.replace(q, codes=leaf.replace(value=q.codes, names=names),
                                   scale=leaf.replace(value=q.scale, names=names))

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=_is_box)


def quantize_sharded(params, fmt: str, block_size: int, boxed_abstract, mesh, include: str = DEFAULT_INCLUDE):
    """`quantize_params` of unboxed `params` under jit, every code and scale born on the shards the boxed
    abstract params (`jax.eval_shape` of the model's init) give them: no device holds a whole weight."""
    quantized = jax.eval_shape(lambda p: quantize_params(p, fmt, block_size, include), boxed_abstract)
    shardings = tree_shardings(quantized, mesh)
    return jax.jit(lambda p: quantize_params(p, fmt, block_size, include), out_shardings=shardings)(params)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def nbytes(tree) -> int:
    """Bytes held by a param tree, quantized or not."""
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return sum(x.nbytes if is_quantized(x) else int(x.size * x.dtype.itemsize) for x in leaves)


def dequantize_params(params, dtype=jnp.float32):
    return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, params, is_leaf=is_quantized)
