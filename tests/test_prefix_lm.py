"""Prefix-LM attention: a document's prefix tokens see each other both ways, everything else stays causal."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import quick_jit, small_config

from jaxlm.core import mesh as mesh_lib
from jaxlm.core.config import ConfigError, MeshConfig
from jaxlm.model import attention
from jaxlm.model.transformer import Transformer, unstack_layers


def _rows(t: int):
    """(segment_ids, prefix_mask) (4, t): prefixes ending at 5, 70 and 150 (clipped to t), and a packed row of
    two documents, each with its own prefix, then padding."""
    seg = np.ones((4, t), np.int32)
    prefix = np.zeros((4, t), np.int32)
    for row, end in enumerate((5, 70, 150)):
        prefix[row, :min(end, t)] = 1
    half, pad = t // 2, t - t // 20
    seg[3, half:pad], seg[3, pad:] = 2, 0
    prefix[3, :half * 3 // 10] = 1
    prefix[3, half:half + (pad - half) * 2 // 3] = 1
    return seg, prefix


def _hand_mask(seg, prefix, window=0):
    """The rule, one (row, query, key) at a time: same segment and (causal within the window, or both in a
    prefix; prefix pairs ignore the window)."""
    b, t = seg.shape
    mask = np.zeros((b, t, t), bool)
    for r in range(b):
        for i in range(t):
            for j in range(t):
                causal = j <= i and (not window or i - j < window)
                mask[r, i, j] = seg[r, i] == seg[r, j] and (causal or bool(prefix[r, i] and prefix[r, j]))
    return mask


def _softmax_attention(q, k, v, mask):
    """Plain float32 softmax attention under a (B, T, S) mask, KV heads repeated for GQA."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v).astype(np.float32)


def _qkv(t, b=4, n=4, kv=2, h=16, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))


@pytest.mark.parametrize("t,window", [(16, 0), (64, 0), (130, 0), (200, 0), (200, 24)])
def test_prefix_attention_matches_hand_built_mask(t, window):
    """T > 64 gives several query blocks: prefixes end inside the first, second and third block."""
    q, k, v = _qkv(t)
    seg, prefix = _rows(t)
    want = _softmax_attention(q, k, v, _hand_mask(seg, prefix, window))
    fn = lambda q, k, v, s, p: attention.attend(q, k, v, s, impl="xla", sliding_window=window, prefix_mask=p)
    args = (q, k, v, jnp.asarray(seg), jnp.asarray(prefix))
    np.testing.assert_allclose(quick_jit(fn, *args)(*args), want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.asarray(attention.make_mask(jnp.asarray(seg), window, jnp.asarray(prefix)))[:, 0],
                          _hand_mask(seg, prefix, window))


def test_no_prefix_is_causal_exactly():
    """Compiled, as the model runs it (eagerly, the `lax.cond` branch is compiled while the causal path runs
    op by op, which rounds differently)."""
    q, k, v = _qkv(200)
    seg = jnp.asarray(_rows(200)[0])
    zeros = jnp.zeros(seg.shape, jnp.int32)
    causal_fn = lambda q, k, v, s: attention.attend(q, k, v, s, impl="xla")
    prefix_fn = lambda q, k, v, s, p: attention.attend(q, k, v, s, impl="xla", prefix_mask=p)
    causal = quick_jit(causal_fn, q, k, v, seg)(q, k, v, seg)
    np.testing.assert_array_equal(quick_jit(prefix_fn, q, k, v, seg, zeros)(q, k, v, seg, zeros), causal)
    want = _softmax_attention(q, k, v, _hand_mask(np.asarray(seg), np.zeros(seg.shape)))
    np.testing.assert_allclose(causal, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_fused_kernels_refuse_prefix(impl):
    q, k, v = _qkv(16)
    seg, prefix = (jnp.asarray(a) for a in _rows(16))
    with pytest.raises(ConfigError, match="set model.attention=xla"):
        attention.attend(q, k, v, seg, impl=impl, prefix_mask=prefix)


def _model_inputs(t=160):
    """Two rows: one document whose 70-token prefix crosses the first 64-query block, and two packed documents
    with prefixes of 10 and 12 tokens."""
    tokens = jax.random.randint(jax.random.key(1), (2, t), 0, 128)
    seg = np.ones((2, t), np.int32)
    seg[1, 80:] = 2
    pos = np.where(seg == 2, np.arange(t) - 80, np.arange(t)).astype(np.int32)
    prefix = np.zeros((2, t), np.int32)
    prefix[0, :70] = prefix[1, :10] = prefix[1, 80:92] = 1
    return tokens, jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(prefix)


def test_transformer_prefix_is_bidirectional_and_the_rest_causal():
    config = small_config(max_seq_len=256)
    scanned = Transformer(config.model)
    tokens, pos, seg, prefix = _model_inputs()
    params = quick_jit(lambda key: nn.unbox(scanned.init(key, tokens))["params"], jax.random.key(0))(jax.random.key(0))

    def logits_fn(model, params=params):
        return quick_jit(lambda p, x: model.apply({"params": p}, x, pos, seg, prefix_mask=prefix), params, tokens)

    logits = logits_fn(scanned)
    base = logits(params, tokens)
    for row, changed in ((0, 66), (1, 8), (1, 90)):  # a later prefix token of each document
        other = np.asarray(logits(params, tokens.at[row, changed].add(1)))
        start = 80 if changed >= 80 else 0
        moved = np.abs(other[row] - np.asarray(base[row])).max(-1)
        assert np.all(moved[start:changed] > 1e-6)  # every earlier prefix position sees it
    for row, changed in ((0, 100), (1, 30), (1, 120)):  # a token after its document's prefix
        other = np.asarray(logits(params, tokens.at[row, changed].add(1)))
        np.testing.assert_array_equal(other[row, :changed], base[row, :changed])
        assert not np.allclose(other[row, changed:], base[row, changed:])
    np.testing.assert_array_equal(other[0], base[0])  # rows never see each other
    # The other document of a packed row never sees the change.
    np.testing.assert_array_equal(logits(params, tokens.at[1, 85].add(1))[1, :80], base[1, :80])

    unrolled = Transformer(dataclasses.replace(config.model, scan_layers=False))
    unrolled_params = unstack_layers(params, 2)
    unrolled_logits = logits_fn(unrolled, unrolled_params)(unrolled_params, tokens)
    np.testing.assert_allclose(unrolled_logits, base, rtol=1e-5, atol=1e-5)
    remat = Transformer(dataclasses.replace(config.model, remat="full"))
    np.testing.assert_allclose(logits_fn(remat)(params, tokens), base, rtol=1e-5, atol=1e-5)
    causal = Transformer(config.model).apply({"params": params}, tokens, pos, seg)
    assert not np.allclose(causal[0, :70], base[0, :70])


@pytest.mark.slow  # gradients of two compiled models (~6 s); the logits' prefix rule is checked by default
def test_transformer_prefix_gradients_with_remat_match():
    """Gradients flow through the per-block `lax.cond` the same with and without rematerialisation."""
    config = small_config(max_seq_len=256)
    tokens, pos, seg, prefix = _model_inputs()
    plain = Transformer(config.model)
    params = quick_jit(lambda key: nn.unbox(plain.init(key, tokens))["params"], jax.random.key(0))(jax.random.key(0))

    def grads(model):
        loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, tokens, pos, seg,
                                                                  prefix_mask=prefix))[..., 3])
        return quick_jit(jax.value_and_grad(loss), params)(params)

    (loss_a, grads_a), (loss_b, grads_b) = grads(plain), grads(Transformer(dataclasses.replace(config.model,
                                                                                             remat="full")))
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_a, grads_b)


@pytest.mark.parametrize("mesh_config,match", [(MeshConfig(sequence=2), "context parallelism"),
                                               (MeshConfig(stage=2), "pipeline stages")])
def test_sharded_layouts_refuse_prefix(mesh_config, match):
    model = Transformer(small_config().model)
    tokens, pos, seg, prefix = (a[:, :16] for a in _model_inputs())
    params = jax.eval_shape(lambda key: nn.unbox(model.init(key, tokens))["params"], jax.random.key(0))
    mesh = mesh_lib.make_mesh(mesh_config, jax.devices()[:2])
    with jax.set_mesh(mesh), pytest.raises(ConfigError, match=match):
        jax.eval_shape(lambda p: model.apply({"params": p}, tokens, pos, seg, prefix_mask=prefix), params)
