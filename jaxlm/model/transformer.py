"""A decoder-only Transformer of the LLaMA family (LLaMA 2/3, Mistral, Qwen2/Qwen3), or GPT-2
(`architecture="gpt2"`).

Every parameter and main activation carries logical axis names; `jaxlm.core.sharding` maps them to the mesh.
Shape letters: B batch, T length, S key length, D model width, N query heads, K KV heads, H head dim,
V vocabulary, L layers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from jaxlm.core.config import ModelConfig
from jaxlm.core.sharding import constrain
from jaxlm.model import attention
from jaxlm.model.layers import (MLP, GeluMLP, LayerNorm, RMSNorm, apply_rope, compute_dtype, dense, param_dtype,
                          rope_frequencies, weight)

BTD = ("activation_batch", "activation_length", "activation_embed")
BTNH = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
BTKH = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


class Attention(nn.Module):
    config: ModelConfig
    impl: str  # a resolved kernel name: xla, cudnn or splash

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, layer_cache=None, decode=None):
        """With `layer_cache` ({"k", "v"}: (B, S, K, H)) the new keys and values are written at slot
        `decode["slot"]` and the queries attend over the whole cache (keys marked in `decode["valid"]`).
        Returns (output, updated layer cache or None)."""
        c = self.config
        dt = compute_dtype(c)
        h = c.resolved_head_dim
        n, k = c.num_heads, c.num_kv_heads
        q_dnh = weight(self, "q", (c.d_model, n, h), ("embed", "heads", "head_dim"), c)
        k_dkh = weight(self, "k", (c.d_model, k, h), ("embed", "kv_heads", "head_dim"), c)
        v_dkh = weight(self, "v", (c.d_model, k, h), ("embed", "kv_heads", "head_dim"), c)
        o_nhd = weight(self, "o", (n, h, c.d_model), ("heads", "head_dim", "embed"), c)
        x_btd = x_btd.astype(dt)
        q_btnh = dense(x_btd, q_dnh.astype(dt))
        k_btkh = dense(x_btd, k_dkh.astype(dt))
        v_btkh = dense(x_btd, v_dkh.astype(dt))
        if c.qkv_bias:
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim"))
            kv_zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("kv_heads", "head_dim"))
            q_btnh += self.param("q_bias", zeros, (n, h), param_dtype(c)).astype(dt)
            k_btkh += self.param("k_bias", kv_zeros, (k, h), param_dtype(c)).astype(dt)
            v_btkh += self.param("v_bias", kv_zeros, (k, h), param_dtype(c)).astype(dt)
        if c.qk_norm:  # Qwen3: RMSNorm over each head's vector before RoPE
            q_btnh = RMSNorm(c.norm_eps, dt, param_dtype(c), name="q_norm")(q_btnh)
            k_btkh = RMSNorm(c.norm_eps, dt, param_dtype(c), name="k_norm")(k_btkh)
        if c.architecture == "llama":  # GPT-2 adds learned positions to the embeddings instead
            inv_freq = rope_frequencies(c)
            q_btnh = apply_rope(q_btnh, positions_bt, inv_freq)
            k_btkh = apply_rope(k_btkh, positions_bt, inv_freq)
        q_btnh = constrain(q_btnh, BTNH)
        k_btkh = constrain(k_btkh, BTKH)
        v_btkh = constrain(v_btkh, BTKH)
        if layer_cache is None:
            out_btnh = attention.attend(
                q_btnh, k_btkh, v_btkh, segment_ids_bt, impl=self.impl, sliding_window=c.sliding_window
            )
        else:
            write = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
                cache, new.astype(cache.dtype), decode["slot"], axis=1)
            layer_cache = {"k": write(layer_cache["k"], k_btkh), "v": write(layer_cache["v"], v_btkh)}
            out_btnh = attention.cached_attention(
                q_btnh, layer_cache["k"], layer_cache["v"], decode["slot"], decode["valid"], c.sliding_window
            )
        out_btnh = checkpoint_name(constrain(out_btnh, BTNH), "attention_out")
        out_btd = dense(out_btnh, o_nhd.astype(dt), n_in=2)
        if c.architecture == "gpt2":
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
            out_btd += self.param("o_bias", zeros, (c.d_model,), param_dtype(c)).astype(dt)
        return out_btd, layer_cache


def norm(c: ModelConfig, name: str) -> nn.Module:
    if c.architecture == "gpt2":
        return LayerNorm(c.norm_eps, compute_dtype(c), param_dtype(c), name=name)
    return RMSNorm(c.norm_eps, compute_dtype(c), param_dtype(c), name=name)


class Block(nn.Module):
    """Pre-norm residual block. Returns (x, None) so that it can be the body of `nn.scan`."""

    config: ModelConfig
    impl: str

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, layer_cache=None, decode=None):
        c = self.config
        x_btd = constrain(x_btd, BTD)
        h_btd = norm(c, "attn_norm")(x_btd)
        attn_btd, layer_cache = Attention(c, self.impl, name="attn")(
            h_btd, positions_bt, segment_ids_bt, layer_cache, decode)
        x_btd = x_btd + attn_btd
        h_btd = norm(c, "mlp_norm")(x_btd)
        x_btd = x_btd + (GeluMLP if c.architecture == "gpt2" else MLP)(c, name="mlp")(h_btd)
        return constrain(x_btd, BTD), layer_cache


class Transformer(nn.Module):
    config: ModelConfig
    impl: str = "xla"

    @nn.compact
    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache=None, decode=None):
        """Returns float32 logits (B, T, V). Segment ids separate packed documents; 0 marks padding.

        For decoding, `cache` holds every layer's keys and values ({"k", "v"}: (L, B, S, K, H), see
        `jaxlm.inference.generate`) and `decode` says where to write ({"slot"}) and which slots hold tokens ({"valid"});
        the call then returns (logits, updated cache).
        """
        c = self.config
        dt = compute_dtype(c)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones_like(tokens_bt)
        embed = nn.Embed(
            c.vocab_size, c.d_model, dtype=dt, param_dtype=param_dtype(c),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("vocab", "embed")),
            name="embed",
        )
        x_btd = embed(tokens_bt)
        if c.architecture == "gpt2":  # learned absolute positions
            pos_embed = weight(self, "pos_embed", (c.max_seq_len, c.d_model), ("norm", "embed"), c)
            x_btd = x_btd + jnp.take(pos_embed, positions_bt, axis=0).astype(dt)
        x_btd = constrain(x_btd, BTD)

        block = Block
        if c.remat != "none" and cache is None:  # decoding takes no gradients
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            # The cache is scanned over its leading layer axis; everything else is the same for each layer.
            in_axes = nn.broadcast if cache is None else (nn.broadcast, nn.broadcast, 0, nn.broadcast)
            layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.impl, name="layers")
            extra = () if cache is None else (cache, decode)
            x_btd, cache = layers(x_btd, positions_bt, segment_ids_bt, *extra)
        else:
            per_layer = []
            for i in range(c.num_layers):
                layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
                x_btd, layer_cache = block(c, self.impl, name=f"layers_{i}")(
                    x_btd, positions_bt, segment_ids_bt, layer_cache, decode)
                per_layer.append(layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)

        x_btd = norm(c, "final_norm")(x_btd)
        if c.tie_embeddings:
            head_vd = embed.embedding
        else:
            # Vocab-major like the embedding (and Hugging Face's lm_head): XLA:CPU computes this layout's
            # weight gradient faster.
            head_vd = weight(self, "lm_head", (c.vocab_size, c.d_model), ("vocab", "embed"), c)
        logits_btv = dense(x_btd, head_vd.T.astype(dt))
        logits_btv = constrain(
            logits_btv.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab")
        )
        return logits_btv if cache is None else (logits_btv, cache)


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Converts scanned parameters (leading L axis under "layers") into unrolled `layers_{i}` entries."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params


def stack_layers(params: dict, num_layers: int) -> dict:
    """The inverse of `unstack_layers`."""
    params = dict(params)
    per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return params


def count_params(abstract_params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(abstract_params))
