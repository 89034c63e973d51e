"""A decoder-only Transformer of the LLaMA family (LLaMA 2/3, Mistral, Qwen2/Qwen3), or GPT-2
(`architecture="gpt2"`).

Every parameter and main activation carries logical axis names; `jaxlm.core.sharding` maps them to the mesh.
Shape letters: B batch, T length, S key length, D model width, N query heads, K KV heads, H head dim,
V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from jaxlm.core.config import ConfigError, ModelConfig
from jaxlm.core.sharding import BATCH_AXES, constrain
from jaxlm.model import attention, context_parallel, pipeline
from jaxlm.model.moe import MoE
from jaxlm.model.pipeline import Pipeline
from jaxlm.model.layers import (MLP, GeluMLP, LayerNorm, LowRank, RMSNorm, apply_rope, compute_dtype, dense,
                                param_dtype, rope_frequencies, row_defaults, weight)

BTD = ("activation_batch", "activation_length", "activation_embed")
BTNH = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
BTKH = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
BTV = ("activation_batch", "activation_length", "activation_vocab")
BTF = ("activation_batch", "activation_length", "activation_mlp")

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
    def __call__(self, x_btd, positions_bt, segment_ids_bt, layer_cache=None, decode=None, prefix_mask_bt=None):
        """With `layer_cache` ({"k", "v"}: (B, S, K, H)) the new keys and values are written at slot
        `decode["slot"]` (one for all rows, or one per row) and the queries attend over the whole cache (keys
        marked in `decode["valid"]`); that path is causal and ignores `prefix_mask_bt` (prefix-LM attention,
        `jaxlm.model.attention`). Returns (output, updated layer cache or None)."""
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
        if layer_cache is None and sequence_shards() > 1 and not self.is_initializing():  # zigzag token order
            out_btnh = context_parallel.sharded_ring_attention(
                q_btnh, k_btkh, v_btkh, segment_ids_bt, sliding_window=c.sliding_window)
        elif layer_cache is None:
            out_btnh = attention.attend(q_btnh, k_btkh, v_btkh, segment_ids_bt, impl=self.impl,
                                        sliding_window=c.sliding_window, prefix_mask=prefix_mask_bt)
        else:
            layer_cache = {"k": attention.write_cache(layer_cache["k"], k_btkh, decode["slot"]),
                           "v": attention.write_cache(layer_cache["v"], v_btkh, decode["slot"])}
            out_btnh = attention.cached_attention(
                q_btnh, layer_cache["k"], layer_cache["v"], decode["slot"], decode["valid"], c.sliding_window
            )
        out_btnh = checkpoint_name(constrain(out_btnh, BTNH), "attention_out")
        out_btd = dense(out_btnh, o_nhd.astype(dt), n_in=2)
        if c.architecture == "gpt2":
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
            out_btd += self.param("o_bias", zeros, (c.d_model,), param_dtype(c)).astype(dt)
        return out_btd, layer_cache


def sequence_shards() -> int:
    """The size of the `sequence` mesh axis that context parallelism splits each row over (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get("sequence", 1)


def norm(c: ModelConfig, name: str) -> nn.Module:
    if c.architecture == "gpt2":
        return LayerNorm(c.norm_eps, compute_dtype(c), param_dtype(c), name=name)
    return RMSNorm(c.norm_eps, compute_dtype(c), param_dtype(c), name=name)


class Block(nn.Module):
    """Pre-norm residual block. Returns (x, None) so that it can be the body of `nn.scan`."""

    config: ModelConfig
    impl: str
    moe: bool = False  # routed experts (jaxlm.model.moe) instead of the dense MLP

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, layer_cache=None, decode=None, prefix_mask_bt=None):
        c = self.config
        x_btd = constrain(x_btd, BTD)
        h_btd = norm(c, "attn_norm")(x_btd)
        attn_btd, layer_cache = Attention(c, self.impl, name="attn")(
            h_btd, positions_bt, segment_ids_bt, layer_cache, decode, prefix_mask_bt)
        x_btd = x_btd + attn_btd
        h_btd = norm(c, "mlp_norm")(x_btd)
        if self.moe:
            x_btd = x_btd + MoE(c, name="moe")(h_btd, segment_ids_bt, decoding=layer_cache is not None)
        else:
            x_btd = x_btd + (GeluMLP if c.architecture == "gpt2" else MLP)(c, name="mlp")(h_btd)
        return constrain(x_btd, BTD), layer_cache


class Transformer(nn.Module):
    config: ModelConfig
    impl: str = "xla"
    pipeline: Pipeline = Pipeline()  # how the layers run on a mesh with pipeline stages (jaxlm.model.pipeline)

    @nn.compact
    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache=None, decode=None,
                 hidden: bool = False, prefix_mask=None):
        """Returns float32 logits (B, T, V) (a classifier's: (B, T, num_labels)). Segment ids separate packed
        documents; 0 marks padding. `prefix_mask` (B, T), 1 inside each document's prefix, makes the rows
        prefix-LM rows: prefix tokens attend to each other both ways (`jaxlm.model.attention`).

        With `hidden`, returns instead the final (normed) hidden states (B, T, D) and the output head (V, D),
        both in the compute dtype, for a loss that forms the logits a piece at a time
        (`jaxlm.training.losses.tiled_token_losses`).

        For decoding, `cache` holds every layer's keys and values ({"k", "v"}: (L, B, S, K, H), see
        `jaxlm.inference.generate`; with unrolled layers it may be a list of L {"k", "v"} (B, S, K, H), which
        each layer updates in place, where slicing and restacking would copy the whole cache every step) and `decode` says where to write ({"slot"}) and which slots hold tokens ({"valid"});
        the call then returns (logits, updated cache). Decoding is causal: a prefix-LM model's prompt is then
        read causally too (prefilling it bidirectionally is not implemented), and `prefix_mask` is ignored.
        """
        c = self.config
        if cache is not None:
            prefix_mask = None
        dt = compute_dtype(c)
        positions_bt, segment_ids_bt = row_defaults(tokens_bt, positions_bt, segment_ids_bt)
        shards = sequence_shards() if cache is None and not self.is_initializing() else 1
        if prefix_mask is not None and shards > 1:  # config validation rejects this too; a second guard
            raise ConfigError("prefix-LM attention (prefix_mask) cannot run with context parallelism "
                              "(mesh.sequence > 1): use mesh.fsdp/tensor/data")
        if shards > 1:
            # Context parallelism: every layer sees the row in zigzag order (balanced causal work per
            # sequence shard, jaxlm.model.context_parallel); only attention depends on the order, and it
            # knows the layout. The hidden states go back to the caller's order before the head.
            zigzag = context_parallel.zigzag_order(tokens_bt.shape[1], shards)
            tokens_bt, positions_bt, segment_ids_bt = (
                jnp.take(a, zigzag, axis=1) for a in (tokens_bt, positions_bt, segment_ids_bt))
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

        x_btd, cache = self._layers(x_btd, positions_bt, segment_ids_bt, cache, decode, prefix_mask)

        if shards > 1:
            x_btd = constrain(jnp.take(x_btd, context_parallel.inverse_order(zigzag), axis=1), BTD)
        x_btd = norm(c, "final_norm")(x_btd)
        if c.value_head:
            self._values(x_btd)
        head_vd = self._head(embed)
        if hidden:
            return x_btd, head_vd.astype(dt)
        logits_btv = dense(x_btd, head_vd.T.astype(dt))
        logits_btv = constrain(logits_btv.astype(jnp.float32), BTV)
        return logits_btv if cache is None else (logits_btv, cache)

    def _layers(self, x_btd, positions_bt, segment_ids_bt, cache, decode, prefix_mask):
        """The layers: pipelined over stages, scanned, or unrolled. Returns (x, updated cache or None)."""
        c = self.config
        block = Block
        if c.remat != "none" and cache is None:  # decoding takes no gradients
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        stages = self._pipeline_on(cache, x_btd.shape[0])
        if prefix_mask is not None and stages is not None:  # config validation rejects this too
            raise ConfigError("prefix-LM attention (prefix_mask) cannot run in pipeline stages (mesh.stage > 1): "
                              "use mesh.fsdp/tensor/data")
        if stages is not None:
            x_btd = self._pipelined(x_btd, positions_bt, segment_ids_bt, *stages)
        elif c.scan_layers:
            # The cache is scanned over its leading layer axis; everything else is the same for each layer.
            in_axes = (nn.broadcast, nn.broadcast, nn.broadcast if cache is None else 0, nn.broadcast, nn.broadcast)
            layers = nn.scan(
                block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                in_axes=in_axes, length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.impl, c.num_experts > 0, name="layers")
            x_btd, cache = layers(x_btd, positions_bt, segment_ids_bt, cache, decode, prefix_mask)
        else:
            per_layer, listed = [], isinstance(cache, list)
            for i in range(c.num_layers):
                layer_cache = cache[i] if listed else None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
                x_btd, layer_cache = block(c, self.impl, c.is_moe_layer(i), name=f"layers_{i}")(
                    x_btd, positions_bt, segment_ids_bt, layer_cache, decode, prefix_mask)
                per_layer.append(layer_cache)
            if cache is not None:
                cache = per_layer if listed else jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        return x_btd, cache

    def _values(self, x_btd) -> None:
        """A PPO critic's value of every position, float32 (B, T), sown as intermediates "values" so that one
        forward pass gives the objective both the policy's logits and the critic's values. The critic reads
        the policy's final hidden states without moving them: its loss trains the head alone (on the tiny
        model, a critic whose gradient also moved the shared backbone undid the policy's learning)."""
        c = self.config
        w_1d = weight(self, "value", (1, c.d_model), ("labels", "embed"), c)
        if isinstance(w_1d, LowRank):
            w_1d = w_1d.w + dense(w_1d.a, w_1d.b)
        values = dense(jax.lax.stop_gradient(x_btd), w_1d.T.astype(x_btd.dtype))[..., 0].astype(jnp.float32)
        self.sow("intermediates", "values", values)

    def _head(self, embed: nn.Embed):
        """The output head (V, D): the vocabulary's, or a classifier's (num_labels, D)."""
        c = self.config
        if c.num_labels:  # a sequence classifier: label-major like the vocabulary head, read at every position
            head_vd = weight(self, "score", (c.num_labels, c.d_model), ("labels", "embed"), c)
        elif c.tie_embeddings:
            head_vd = embed.embedding
        else:
            # Vocab-major like the embedding (and Hugging Face's lm_head): XLA:CPU computes this layout's
            # weight gradient faster.
            head_vd = weight(self, "lm_head", (c.vocab_size, c.d_model), ("vocab", "embed"), c)
        if isinstance(head_vd, LowRank):  # an adapted head: merged once, (V, D) like the plain weight
            head_vd = head_vd.w + dense(head_vd.a, head_vd.b)
        return head_vd

    def _pipeline_on(self, cache, batch: int):
        """(mesh, micro-batches) when the layers run as a pipeline: stages > 1, training or scoring (not
        decoding), after `init` (which creates the same scanned params either way), and a batch that splits
        into micro-batches. Another batch (an eval harness scoring a few rows) runs the plain scan, over
        the same stage-sharded weights, with the same result; training checks its own batch at start
        (`jaxlm.training.assembly.check_batch`)."""
        mesh = jax.sharding.get_abstract_mesh()
        if cache is not None or mesh.empty or mesh.shape.get(pipeline.AXIS, 1) == 1 or self.is_initializing():
            return None
        stages = mesh.shape[pipeline.AXIS]
        if not self.config.scan_layers:
            raise ConfigError(f"mesh.stage={stages} needs model.scan_layers=true (the stages split the stacked layers)")
        ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
        if batch % ways:
            return None
        try:
            return mesh, pipeline.microbatches_for(self.pipeline, stages, batch // ways)
        except ConfigError:  # too few rows for the micro-batches
            return None

    def _pipelined(self, x_btd, positions_bt, segment_ids_bt, mesh, microbatches: int):
        c = self.config

        def layer_fn(p, x, pos, seg):  # one layer as a pure function of its params
            return Block(c, self.impl, c.num_experts > 0, parent=None).apply({"params": p}, x, pos, seg)[0]

        if c.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=REMAT_POLICIES[c.remat])
        return pipeline.run(layer_fn, self.variables["params"]["layers"], x_btd, positions_bt, segment_ids_bt,
                            dataclasses.replace(self.pipeline, microbatches=microbatches), mesh)


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
