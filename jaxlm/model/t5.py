"""An encoder-decoder Transformer of the T5 family (`architecture="t5"`): T5 v1.0, T5 v1.1 / Flan-T5, mT5 and
UMT5, numerically equal to Hugging Face's `T5ForConditionalGeneration` and kin.

T5 differs from the decoder-only model (jaxlm.model.transformer) in: no attention score scaling (T5 folds
1/sqrt(H) into the query init), a learned relative position bias added to the scores (bucketed key - query
distances, bidirectional in the encoder, causal in the decoder; one table per stack read by every layer, or
one per layer in UMT5), RMS norms without bias, no biases anywhere, a ReLU or gated-GELU MLP, one embedding
shared by both stacks, and a head that is either the embedding (T5 v1.0, with the hidden states scaled by
d_model**-0.5 first) or an untied `lm_head`.

Packed rows: the encoder row and the decoder row of a pair carry matching segment ids (0 is padding); a
decoder token cross-attends only to the encoder tokens of its own segment. Relative positions come from the
positions arrays, which restart at every packed example, so a packed example equals the example alone.

Generation (`jaxlm.inference.seq2seq_generate`) runs `encode` once, `cross_kv` once (every decoder layer's
cross-attention keys and values of the encoder output) and then `decode` with a cache, one token at a time.

Parameters:
    embed/embedding (V, D)
    encoder/relative_bias (R, N)   (not with relative_bias_per_layer: then layers/attn/relative_bias)
    encoder/layers/{attn_norm, attn/{q,k,v,o}, mlp_norm, mlp/{wi | wi_0, wi_1; wo}}   (stacked over layers,
        or layers_{i} with scan_layers=false)
    encoder/final_norm
    decoder/...    as the encoder, plus cross_norm and cross/{q,k,v,o} (cross-attention) in every layer
    lm_head (V, D)   untied only

Shape letters: B batch, T query length, S key length, D model width, N heads, H head dim, F MLP width,
V vocabulary, R relative position buckets.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from jaxlm.core.config import ModelConfig
from jaxlm.core.sharding import constrain
from jaxlm.model.attention import write_cache
from jaxlm.model.layers import (ACTIVATIONS, LowRank, RMSNorm, compute_dtype, dense, param_dtype, row_defaults,
                                weight)
from jaxlm.model.transformer import BTD, BTF, BTNH, BTV, REMAT_POLICIES

BNTS = ("activation_batch", "activation_heads", "activation_length", None)

def bucket_table(num_buckets: int, max_distance: int, bidirectional: bool) -> np.ndarray:
    """T5's bucket of each relative position r = key - query in [-max_distance, max_distance], at index
    r + max_distance. Further distances share the outermost buckets, so clipping r to this range is exact.

    Half of a direction's buckets are single distances, the rest logarithmically wider bins. The table is
    computed here in numpy float32, as transformers computes it in torch: jnp's float32 log differs in the
    last bit at some bin edges, which moves a distance into the neighbouring bucket."""
    r = np.arange(-max_distance, max_distance + 1)
    out = np.zeros_like(r)
    n = num_buckets
    if bidirectional:  # the upper half of the buckets for keys after the query
        n //= 2
        out += (r > 0) * n
        r = np.abs(r)
    else:  # keys after the query (masked anyway) count as distance 0
        r = -np.minimum(r, 0)
    exact = n // 2
    if exact == 0:
        return out
    with np.errstate(all="ignore"):
        ratio = np.log(np.maximum(r, exact).astype(np.float32) / np.float32(exact)) / np.float32(
            math.log(max_distance / exact))
        wide = exact + np.nan_to_num(ratio * np.float32(n - exact)).astype(np.int64)
    return out + np.where(r < exact, r, np.clip(wide, 0, n - 1))


def relative_buckets(c: ModelConfig, q_positions_bt, k_positions_bs, bidirectional: bool) -> jax.Array:
    """(B, T, S) int32 bucket of every (query, key) pair, from their positions."""
    table = jnp.asarray(bucket_table(c.relative_buckets, c.relative_max_distance, bidirectional), jnp.int32)
    md = c.relative_max_distance
    rel_bts = k_positions_bs[:, None, :] - q_positions_bt[:, :, None]
    return jnp.take(table, jnp.clip(rel_bts, -md, md) + md)


def position_bias(table_rn, buckets_bts) -> jax.Array:
    """(B, N, T, S) float32 bias of the relative bias table (R, N) at every pair's bucket.

    A one-hot matmul rather than a gather (as flaxformer's T5): its gradient is a matmul too, where a
    gather's is a scatter-add into R rows (7% of a t5_small train step on CPU; the one-hot's is lost in the
    noise). HIGHEST precision keeps the table's float32 values exact (TF32 or bfloat16 passes would round them)."""
    return constrain(_one_hot_bias(table_rn, buckets_bts), BNTS)


# Rebuilt in the backward pass from the int32 buckets: the float32 one-hot (B, T, S, R) it would otherwise
# keep is R/N times the bias itself (1 GiB at 32 x 512 x 512 x 32).
@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
def _one_hot_bias(table_rn, buckets_bts):
    onehot_btsr = (buckets_bts[..., None] == jnp.arange(table_rn.shape[0])).astype(jnp.float32)
    return jnp.einsum("btsr,rn->bnts", onehot_btsr, table_rn.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def relative_bias_table(module: nn.Module, c: ModelConfig):
    # Initialised as transformers does, N(0, 1/D).
    return weight(module, "relative_bias", (c.relative_buckets, c.num_heads), (None, "heads"), c, fan_in=c.d_model)


QUERY_BLOCK = 128


def biased_attention(q_btnh, k_bsnh, v_bsnh, bias_bnts, allowed_bts):
    """Softmax attention with float32 scores q.k + bias (no 1/sqrt(H): T5 folds it into the query init), keys
    limited to `allowed` (B, T, S).

    Long query rows go in blocks of `QUERY_BLOCK`: the same result, but each block's (B, N, block, S) scores
    stay in cache. On the 2-core CPU this makes t5_small's 512-token encoder attention (forward and backward)
    about 20% faster than one (B, N, 512, 512) pass."""
    t = q_btnh.shape[1]
    if t < 2 * QUERY_BLOCK:
        return _biased_block(q_btnh, k_bsnh, v_bsnh, bias_bnts, allowed_bts)
    blocks = range(0, t, QUERY_BLOCK)
    part = lambda x, i, axis: jax.lax.slice_in_dim(x, i, min(i + QUERY_BLOCK, t), axis=axis)
    return jnp.concatenate([
        _biased_block(part(q_btnh, i, 1), k_bsnh, v_bsnh, None if bias_bnts is None else part(bias_bnts, i, 2),
                      part(allowed_bts, i, 1)) for i in blocks], axis=1)


def _biased_block(q_btnh, k_bsnh, v_bsnh, bias_bnts, allowed_bts):
    scores = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bsnh, preferred_element_type=jnp.float32)
    if bias_bnts is not None:
        scores = scores + bias_bnts
    scores = jnp.where(allowed_bts[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bsnh.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v_bsnh)


class Attention(nn.Module):
    """T5 attention without biases: self-attention (`kv` is the block's own input) or cross-attention (`kv`
    the encoder's output). `own_bias`: this layer has its own relative bias table (UMT5 self-attention), read
    at `buckets`; otherwise the stack's shared `bias` (or none, in cross-attention) is added."""

    config: ModelConfig
    own_bias: bool = False

    @nn.compact
    def __call__(self, x_btd, kv, allowed_bts, bias_bnts=None, buckets_bts=None, layer_cache=None, slot=None,
                 project_only: bool = False):
        """Returns (output (B, T, D), layer cache). `kv` is (B, S, D) states to project, or already projected
        {"k", "v"} (B, S, N, H) (cross-attention keys and values computed once per encoded input, for decoding).

        Cached self-attention: `layer_cache` {"k", "v"} (B, S, N, H) gets the new keys and values written at
        cache slots `slot`.. (`jaxlm.model.attention.write_cache`), and the queries attend over the whole
        cache, the slots `allowed_bts` (B, T, S) lets them see; the updated cache is returned.
        `project_only`: returns just `kv` projected, {"k", "v"} (B, S, N, H) (`x_btd` is unused)."""
        c = self.config
        dt = compute_dtype(c)
        d, n, h = c.d_model, c.num_heads, c.resolved_head_dim
        # T5's init: 1/sqrt(H) of the unscaled scores folded into q's.
        q_dnh = weight(self, "q", (d, n, h), ("embed", "heads", "head_dim"), c, fan_in=d * h)
        k_dnh = weight(self, "k", (d, n, h), ("embed", "heads", "head_dim"), c, fan_in=d)
        v_dnh = weight(self, "v", (d, n, h), ("embed", "heads", "head_dim"), c, fan_in=d)
        o_nhd = weight(self, "o", (n, h, d), ("heads", "head_dim", "embed"), c, fan_in=n * h)
        if project_only:
            return {"k": constrain(dense(kv.astype(dt), k_dnh.astype(dt)), BTNH),
                    "v": constrain(dense(kv.astype(dt), v_dnh.astype(dt)), BTNH)}
        if self.own_bias:
            bias_bnts = position_bias(relative_bias_table(self, c), buckets_bts)
        q_btnh = constrain(dense(x_btd.astype(dt), q_dnh.astype(dt)), BTNH)
        if isinstance(kv, dict):
            k_bsnh, v_bsnh = kv["k"].astype(dt), kv["v"].astype(dt)
        else:
            k_bsnh = dense(kv.astype(dt), k_dnh.astype(dt))
            v_bsnh = dense(kv.astype(dt), v_dnh.astype(dt))
        k_bsnh, v_bsnh = constrain(k_bsnh, BTNH), constrain(v_bsnh, BTNH)
        if layer_cache is not None:
            layer_cache = {"k": write_cache(layer_cache["k"], k_bsnh, slot),
                           "v": write_cache(layer_cache["v"], v_bsnh, slot)}
            k_bsnh, v_bsnh = layer_cache["k"].astype(dt), layer_cache["v"].astype(dt)
        out_btnh = biased_attention(q_btnh, k_bsnh, v_bsnh, bias_bnts, allowed_bts)
        out_btnh = checkpoint_name(constrain(out_btnh, BTNH), "attention_out")
        return dense(out_btnh, o_nhd.astype(dt), n_in=2), layer_cache


class MLP(nn.Module):
    """T5's feed-forward: wo(act(x @ wi)) (T5 v1.0: ReLU), or gated, wo(act(x @ wi_0) * (x @ wi_1)) (T5 v1.1,
    mT5, UMT5: GELU, tanh approximation)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        c = self.config
        dt = compute_dtype(c)
        d, f = c.d_model, c.mlp_dim
        name = c.resolved_mlp_activation
        act = ACTIVATIONS[name.removeprefix("gated_")]
        x_btd = x_btd.astype(dt)
        if name.startswith("gated_"):
            wi0_df = weight(self, "wi_0", (d, f), ("embed", "mlp"), c, fan_in=d)
            wi1_df = weight(self, "wi_1", (d, f), ("embed", "mlp"), c, fan_in=d)
            h_btf = act(dense(x_btd, wi0_df.astype(dt))) * dense(x_btd, wi1_df.astype(dt))
        else:
            wi_df = weight(self, "wi", (d, f), ("embed", "mlp"), c, fan_in=d)
            h_btf = act(dense(x_btd, wi_df.astype(dt)))
        wo_fd = weight(self, "wo", (f, d), ("mlp", "embed"), c, fan_in=f)
        return dense(constrain(h_btf, BTF), wo_fd.astype(dt))


def norm(c: ModelConfig, name: str) -> RMSNorm:
    """T5's layer norm: RMS (no mean, no bias), variance in float32, as jaxlm's RMSNorm."""
    return RMSNorm(c.norm_eps, compute_dtype(c), param_dtype(c), name=name)


class Block(nn.Module):
    """Pre-norm residual block: self-attention, (decoder) cross-attention, MLP. `ctx` holds what every layer
    of the stack shares (masks, the shared position bias or the buckets, the encoder's output). Returns
    (x, out) so that it can be the body of `nn.scan`: `out` is None, or when decoding with `layer_cache`
    ({"self", "cross"}, see `EncoderDecoder.decode`) the updated self-attention cache, or with
    ctx["project_cross"] this layer's cross-attention keys and values of `x` (the encoder's output)."""

    config: ModelConfig
    decoder: bool

    @nn.compact
    def __call__(self, x_btd, ctx: dict, layer_cache=None, decode=None):
        c = self.config
        if ctx.get("project_cross"):
            return x_btd, Attention(c, name="cross")(None, x_btd, None, project_only=True)
        x_btd = constrain(x_btd, BTD)
        h_btd = norm(c, "attn_norm")(x_btd)
        self_cache = None if layer_cache is None else layer_cache["self"]
        attn_btd, self_cache = Attention(c, c.relative_bias_per_layer, name="attn")(
            h_btd, h_btd, ctx["self_allowed"], ctx.get("bias"), ctx.get("buckets"), self_cache,
            None if decode is None else decode["slot"])
        x_btd = x_btd + attn_btd
        if self.decoder:
            h_btd = norm(c, "cross_norm")(x_btd)
            kv = ctx["encoded"] if layer_cache is None else layer_cache["cross"]
            x_btd = x_btd + Attention(c, name="cross")(h_btd, kv, ctx["cross_allowed"])[0]
        h_btd = norm(c, "mlp_norm")(x_btd)
        x_btd = x_btd + MLP(c, name="mlp")(h_btd)
        # Only the self-attention cache changes: returning the cross-attention part too would make the layer
        # scan restack (copy) it every step.
        return constrain(x_btd, BTD), self_cache


class Stack(nn.Module):
    """The encoder's or the decoder's layers and final norm; the decoder's also read the encoder's output."""

    config: ModelConfig
    decoder: bool

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, encoded_bsd=None, encoded_segment_ids_bs=None,
                 cache=None, decode=None, project_cross: bool = False):
        """The final hidden states (B, T, D); when decoding with `cache` (decoder only; see
        `EncoderDecoder.decode`), (hidden states, updated cache). With `project_cross`, `x_btd` is the
        encoder's output and the result every layer's cross-attention {"k", "v"} (L, B, S, N, H)."""
        c = self.config
        if project_cross:  # no masks or bias: each layer only projects the encoder's output
            return self._layers(x_btd, {"project_cross": True})[1]
        key_slots = None if cache is None else jnp.arange(cache["self"]["k"].shape[2])
        ctx = self._context(positions_bt, segment_ids_bt, key_slots)
        if self.decoder:
            ctx["encoded"] = encoded_bsd
            ctx["cross_allowed"] = segment_ids_bt[:, :, None] == encoded_segment_ids_bs[:, None, :]
        x_btd, self_cache = self._layers(x_btd, ctx, cache, decode)
        x_btd = norm(c, "final_norm")(x_btd)
        return x_btd if cache is None else (x_btd, {"self": self_cache, "cross": cache["cross"]})

    def _layers(self, x_btd, ctx: dict, cache=None, decode=None):
        """Runs the blocks, scanned or unrolled: (x, the blocks' stacked outputs (L, ...) or None). A cache is
        scanned over (or sliced at) its leading layer axis. Unrolled layers slice the cache and stack it
        again, a copy per call that the scan does not make."""
        c = self.config
        block = Block
        if c.remat != "none" and cache is None and not ctx.get("project_cross"):  # no gradients otherwise
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        depth = c.resolved_decoder_layers if self.decoder else c.num_layers
        if c.scan_layers:
            layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast if cache is None else 0, nn.broadcast),
                length=depth, metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.decoder, name="layers")
            return layers(x_btd, ctx, cache, decode)
        outs = []
        for i in range(depth):
            layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
            x_btd, out = block(c, self.decoder, name=f"layers_{i}")(x_btd, ctx, layer_cache, decode)
            outs.append(out)
        return x_btd, None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

    def _context(self, positions_bt, segment_ids_bt, key_slots=None) -> dict:
        """Self-attention's mask (same segment; causal in the decoder) and position bias, or with per-layer
        tables (UMT5) the buckets each layer reads its own bias at. Computed once for all layers.

        When decoding, the keys are the cache's slots `key_slots` (S,). Every decoder row starts at slot 0
        with the start token, so a slot is its token's position: a query sees the slots up to its own
        position (all written by then), at relative distances slot - position."""
        c = self.config
        if key_slots is None:
            allowed = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
            if self.decoder:
                t = segment_ids_bt.shape[1]
                allowed &= jnp.tril(jnp.ones((t, t), bool))[None]
            key_positions = positions_bt
        else:
            allowed = key_slots[None, None, :] <= positions_bt[:, :, None]
            key_positions = jnp.broadcast_to(key_slots, (positions_bt.shape[0], key_slots.shape[0]))
        buckets = relative_buckets(c, positions_bt, key_positions, bidirectional=not self.decoder)
        if c.relative_bias_per_layer:
            return {"self_allowed": allowed, "buckets": buckets}
        # T5 keeps this table in layer 0's attention; every layer of the stack adds the same bias.
        return {"self_allowed": allowed, "bias": position_bias(relative_bias_table(self, c), buckets)}


class EncoderDecoder(nn.Module):
    """The T5 model. `impl` is accepted for the common model signature (`jaxlm.model.architectures.build`);
    T5's attention, with its per-row additive bias, always runs the XLA path."""

    config: ModelConfig
    impl: str = "xla"

    def setup(self):
        c = self.config
        # T5 initialises its (unscaled) embedding N(0, 1): the first norm rescales it anyway.
        self.embed = nn.Embed(
            c.vocab_size, c.d_model, dtype=compute_dtype(c), param_dtype=param_dtype(c),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        )
        self.encoder = Stack(c, decoder=False)
        self.decoder = Stack(c, decoder=True)
        if not c.tie_embeddings:  # vocab-major like the embedding (and Hugging Face's lm_head)
            self.lm_head = weight(self, "lm_head", (c.vocab_size, c.d_model), ("vocab", "embed"), c, fan_in=c.d_model)

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, decoder_inputs=None,
                 decoder_positions=None, decoder_segment_ids=None, hidden: bool = False):
        """Float32 logits (B, Td, V) of the decoder reading `decoder_inputs` (B, Td) (the targets shifted right
        behind `config.decoder_start_id`) over the encoded `tokens_bt` (B, S). Segment ids separate packed
        examples, with matching ids on both sides; 0 marks padding. Without decoder inputs (`init` with tokens
        alone) the decoder reads the tokens.

        With `hidden`, returns instead the decoder's final hidden states (B, Td, D) (already scaled for a tied
        head) and the head (V, D), both in the compute dtype, whose product is the logits
        (`jaxlm.training.objectives`)."""
        positions_bt, segment_ids_bt = row_defaults(tokens_bt, positions_bt, segment_ids_bt)
        if decoder_inputs is None:
            decoder_inputs, decoder_positions, decoder_segment_ids = tokens_bt, positions_bt, segment_ids_bt
        encoded_bsd = self.encode(tokens_bt, positions_bt, segment_ids_bt)
        return self.decode(encoded_bsd, segment_ids_bt, decoder_inputs, decoder_positions, decoder_segment_ids,
                           hidden=hidden)

    def encode(self, tokens_bs, positions_bs=None, segment_ids_bs=None):
        """The encoder's output (B, S, D) in the compute dtype; run once per input when generating
        (`model.apply(..., method="encode")`)."""
        positions_bs, segment_ids_bs = row_defaults(tokens_bs, positions_bs, segment_ids_bs)
        x_bsd = constrain(self.embed(tokens_bs), BTD)
        return self.encoder(x_bsd, positions_bs, segment_ids_bs)

    def cross_kv(self, encoded_bsd):
        """Every decoder layer's cross-attention keys and values of an encoder output, {"k", "v"}
        (L, B, S, N, H) in the compute dtype (`model.apply(..., method="cross_kv")`): they depend on the
        input alone, so decoding computes them once and keeps them in its cache (`decode`)."""
        return self.decoder(encoded_bsd, None, None, project_cross=True)

    def decode(self, encoded_bsd, encoded_segment_ids_bs, tokens_bt, positions_bt=None, segment_ids_bt=None,
               cache=None, decode=None, hidden: bool = False):
        """The decoder's float32 logits (B, T, V) (or, with `hidden`, as `__call__`) for `tokens_bt` over an
        encoder output and its segment ids (`model.apply(..., method="decode")`).

        Cached decoding: `cache` is {"self": {"k", "v"} (L, B, S, N, H), the decoder's self-attention keys and
        values, S the most decoder tokens; "cross": `cross_kv(encoded)`, (L, B, Se, N, H)} (L the decoder's
        layers) and `decode` {"slot"} says where `tokens_bt` go: cache slots slot..slot+T-1, one int for all
        rows or (B,) ints. Every row starts at slot 0 with the start token, so positions default to the slots.
        `encoded_bsd` is then unused (may be None): the cross-attention reads the cache's keys and values,
        masked by `encoded_segment_ids_bs` (0 marks encoder padding). Returns (logits, updated cache)."""
        c = self.config
        dt = compute_dtype(c)
        if cache is not None and positions_bt is None:
            slot = jnp.asarray(decode["slot"], jnp.int32)
            positions_bt = jnp.expand_dims(slot, -1) + jnp.arange(tokens_bt.shape[1], dtype=jnp.int32)
            positions_bt = jnp.broadcast_to(positions_bt, tokens_bt.shape)
        positions_bt, segment_ids_bt = row_defaults(tokens_bt, positions_bt, segment_ids_bt)
        x_btd = constrain(self.embed(tokens_bt), BTD)
        x_btd = self.decoder(x_btd, positions_bt, segment_ids_bt, encoded_bsd, encoded_segment_ids_bs, cache, decode)
        if cache is not None:
            x_btd, cache = x_btd
        if c.tie_embeddings:  # T5 v1.0 rescales before its tied head
            x_btd = x_btd * c.d_model**-0.5
        head_vd = self._head()
        if hidden:
            out = x_btd, head_vd.astype(dt)
        else:
            out = constrain(dense(x_btd, head_vd.T.astype(dt)).astype(jnp.float32), BTV)
        return out if cache is None else (out, cache)

    def _head(self):
        """The output head (V, D): the shared embedding, or the untied lm_head (an adapted one merged)."""
        head_vd = self.embed.embedding if self.config.tie_embeddings else self.lm_head
        if isinstance(head_vd, LowRank):
            head_vd = head_vd.w + dense(head_vd.a, head_vd.b)
        return head_vd
