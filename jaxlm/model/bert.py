"""An encoder of the BERT family (BERT, RoBERTa) with a masked-LM head (`architecture="bert"`).

Learned absolute positions (looked up at `position + position_offset`: RoBERTa numbers its positions from
pad id + 1), token type embeddings, an embedding LayerNorm, post-LN blocks with biases on every projection,
bidirectional attention inside each segment, and the MLM head: dense + activation + LayerNorm, then the
word embeddings (tied) plus an output bias. No dropout.

Parameters (scanned layers under "layers", stacked on a leading L axis; unrolled ones under "layers_{i}"):
  embed/embedding (V, D), pos_embed (max_seq_len + position_offset, D), type_embed (type_vocab_size, D),
  embed_norm/{scale, bias};
  layers/attn/{q, k, v (D, N, H), q_bias, k_bias, v_bias (N, H), o (N, H, D), o_bias (D,)}, layers/attn_norm,
  layers/mlp/{up (D, F), up_bias (F,), down (F, D), down_bias (D,)}, layers/mlp_norm;
  mlm/{dense (D, D), dense_bias (D,), norm/{scale, bias}, bias (V,)}.
Shape letters as in jaxlm.model.transformer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from jaxlm.core.config import ModelConfig
from jaxlm.core.sharding import constrain
from jaxlm.model import attention
from jaxlm.model.layers import (ACTIVATIONS, GeluMLP, LayerNorm, compute_dtype, dense, param_dtype, row_defaults,
                                weight)
from jaxlm.model.transformer import BTD, BTNH, BTV, REMAT_POLICIES


def bias(module: nn.Module, name: str, shape, names, c: ModelConfig) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.zeros, names)
    return module.param(name, init, shape, param_dtype(c)).astype(compute_dtype(c))


def attend(q_btnh, k_btnh, v_btnh, segment_ids_bt, impl: str):
    """Bidirectional softmax attention: every token sees every token of its own segment (padding, segment
    0, sees only padding, so no row is fully masked). cuDNN takes the segment mask; every other kernel name
    runs the XLA path (splash's kernel in jaxlm.model.attention is causal only)."""
    same_bss = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, mask=same_bss[:, None], implementation="cudnn")
    t = q_btnh.shape[1]
    return attention._masked_attention(q_btnh, k_btnh, v_btnh, jnp.ones((t, t), bool), segment_ids_bt, segment_ids_bt)


class Attention(nn.Module):
    """Multi-head self-attention with biases (BERT has as many key/value heads as query heads), scaled by
    1/sqrt(head_dim)."""

    config: ModelConfig
    impl: str

    @nn.compact
    def __call__(self, x_btd, segment_ids_bt):
        c = self.config
        dt = compute_dtype(c)
        n, h = c.num_heads, c.resolved_head_dim
        x_btd = x_btd.astype(dt)
        qkv = []
        for name in ("q", "k", "v"):
            w_dnh = weight(self, name, (c.d_model, n, h), ("embed", "heads", "head_dim"), c)
            b_nh = bias(self, f"{name}_bias", (n, h), ("heads", "head_dim"), c)
            qkv.append(constrain(dense(x_btd, w_dnh.astype(dt)) + b_nh, BTNH))
        out_btnh = checkpoint_name(constrain(attend(*qkv, segment_ids_bt, self.impl), BTNH), "attention_out")
        o_nhd = weight(self, "o", (n, h, c.d_model), ("heads", "head_dim", "embed"), c)
        return dense(out_btnh, o_nhd.astype(dt), n_in=2) + bias(self, "o_bias", (c.d_model,), ("norm",), c)


def layer_norm(c: ModelConfig, name: str) -> LayerNorm:
    return LayerNorm(c.norm_eps, compute_dtype(c), param_dtype(c), name=name)


class Block(nn.Module):
    """Post-LN residual block (BERT): x = LN(x + attn(x)); x = LN(x + mlp(x)). Returns (x, None) so that it
    can be the body of `nn.scan`."""

    config: ModelConfig
    impl: str

    @nn.compact
    def __call__(self, x_btd, segment_ids_bt):
        c = self.config
        x_btd = constrain(x_btd, BTD)
        x_btd = layer_norm(c, "attn_norm")(x_btd + Attention(c, self.impl, name="attn")(x_btd, segment_ids_bt))
        x_btd = layer_norm(c, "mlp_norm")(x_btd + GeluMLP(c, name="mlp")(x_btd))
        return constrain(x_btd, BTD), None


class Encoder(nn.Module):
    config: ModelConfig
    impl: str = "xla"

    @nn.compact
    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, token_types=None, hidden: bool = False):
        """Returns float32 MLM logits (B, T, V). Segment ids separate packed documents (attention stays
        inside each; 0 marks padding); positions restart at each document; `token_types` (B, T) default to 0.

        With `hidden`, returns (h (B, T, D+1), head (V, D+1)) in the compute dtype, with h @ head.T equal to
        the logits, for the losses that form the logits a piece at a time
        (`jaxlm.training.losses.tiled_token_losses`): the head's output bias rides as an extra column of the
        head against a constant-1 column of h. The logits are computed by that same product, so both paths
        agree exactly.
        """
        c = self.config
        positions_bt, segment_ids_bt = row_defaults(tokens_bt, positions_bt, segment_ids_bt)
        embed = nn.Embed(
            c.vocab_size, c.d_model, dtype=compute_dtype(c), param_dtype=param_dtype(c),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("vocab", "embed")),
            name="embed",
        )
        x_btd = self._embed(embed, tokens_bt, positions_bt, token_types)
        x_btd = self._layers(x_btd, segment_ids_bt)
        h_btd, head_vd = self._mlm_head(x_btd, embed)
        if hidden:
            return h_btd, head_vd
        return constrain(dense(h_btd, head_vd.T).astype(jnp.float32), BTV)

    def _embed(self, embed: nn.Embed, tokens_bt, positions_bt, token_types):
        """Word + position (+ token type) embeddings, layer-normed."""
        c = self.config
        dt = compute_dtype(c)
        x_btd = embed(tokens_bt)
        pos_pd = weight(self, "pos_embed", (c.max_seq_len + c.position_offset, c.d_model), ("norm", "embed"), c)
        x_btd = x_btd + jnp.take(pos_pd, positions_bt + c.position_offset, axis=0).astype(dt)
        if c.type_vocab_size:
            types_yd = weight(self, "type_embed", (c.type_vocab_size, c.d_model), ("norm", "embed"), c)
            token_types = jnp.zeros_like(tokens_bt) if token_types is None else token_types
            x_btd = x_btd + jnp.take(types_yd, token_types, axis=0).astype(dt)
        return layer_norm(c, "embed_norm")(constrain(x_btd, BTD))

    def _layers(self, x_btd, segment_ids_bt):
        c = self.config
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            layers = nn.scan(
                block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                in_axes=nn.broadcast, length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.impl, name="layers")
            return layers(x_btd, segment_ids_bt)[0]
        for i in range(c.num_layers):
            x_btd, _ = block(c, self.impl, name=f"layers_{i}")(x_btd, segment_ids_bt)
        return x_btd

    def _mlm_head(self, x_btd, embed: nn.Embed):
        """(h (B, T, D+1), head (V, D+1)): the transformed hidden states with a constant-1 column, and the
        tied word embeddings with the output bias as a last column."""
        c = self.config
        dt = compute_dtype(c)
        mlm = MLMTransform(c, name="mlm")
        h_btd, bias_v = mlm(x_btd)
        ones_bt1 = jnp.ones((*h_btd.shape[:2], 1), dt)
        h_btd = constrain(jnp.concatenate([h_btd, ones_bt1], axis=-1), BTD)
        head_vd = jnp.concatenate([embed.embedding.astype(dt), bias_v[:, None]], axis=-1)
        return h_btd, head_vd


class MLMTransform(nn.Module):
    """BERT's prediction-head transform, LN(act(x @ dense + dense_bias)), and the head's output bias (V,)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        c = self.config
        dt = compute_dtype(c)
        dense_dd = weight(self, "dense", (c.d_model, c.d_model), ("embed", "mlp"), c)
        h_btd = dense(x_btd.astype(dt), dense_dd.astype(dt)) + bias(self, "dense_bias", (c.d_model,), ("norm",), c)
        act = ACTIVATIONS[c.resolved_mlp_activation]  # the encoder's own (`config.check_activation`: not gated)
        h_btd = layer_norm(c, "norm")(act(constrain(h_btd, BTD)))
        return h_btd, bias(self, "bias", (c.vocab_size,), ("vocab",), c)
