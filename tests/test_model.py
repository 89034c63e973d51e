"""Model numerics: scan vs unrolled, remat vs none, attention kernels and masks, full-size presets."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import quick_jit, small_config

from jaxlm.core import overrides
from jaxlm.core.config import ConfigError
from jaxlm.core.sharded_init import abstract_params
from jaxlm.model import attention
from jaxlm.model.layers import rope_frequencies
from jaxlm.model.transformer import Transformer, count_params, stack_layers, unstack_layers
from jaxlm.training.objectives import next_token


def _batch(vocab=128, b=2, t=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(b, t + 1))
    segments = np.concatenate([np.ones((b, t // 2)), 2 * np.ones((b, t - t // 2))], axis=1).astype(np.int32)
    positions = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "positions": jnp.asarray(positions, jnp.int32), "segment_ids": jnp.asarray(segments),
            "loss_mask": jnp.ones((b, t), jnp.int32)}


def _init(model, batch):
    init = lambda key: nn.unbox(model.init(key, batch["inputs"]))["params"]
    return quick_jit(init, jax.random.key(0))(jax.random.key(0))


def _loss_and_grads(model, params, batch):
    f = lambda p: next_token(model.apply).loss(p, batch, None)[1]["loss"]
    return quick_jit(jax.value_and_grad(f), params)(params)


@pytest.mark.slow  # two compiled value-and-grads (~20 s); the scanned model is what every other test runs
def test_scan_equals_unrolled():
    config = small_config(qkv_bias=True, qk_norm=True)
    batch = _batch()
    scanned = Transformer(config.model)
    unrolled = Transformer(dataclasses.replace(config.model, scan_layers=False))
    params = _init(scanned, batch)
    loss_s, grads_s = _loss_and_grads(scanned, params, batch)
    loss_u, grads_u = _loss_and_grads(unrolled, unstack_layers(params, 2), batch)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads_s, stack_layers(grads_u, 2))


@pytest.mark.parametrize("policy", ["full"] + [pytest.param(p, marks=pytest.mark.slow)  # ~15 s each
                                              for p in ("dots", "dots_no_batch", "save_attention_out")])
def test_remat_gives_same_gradients(policy):
    config = small_config()
    batch = _batch()
    plain = Transformer(config.model)
    params = _init(plain, batch)
    loss_a, grads_a = _loss_and_grads(plain, params, batch)
    loss_b, grads_b = _loss_and_grads(Transformer(dataclasses.replace(config.model, remat=policy)), params, batch)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_a, grads_b)


def test_packed_segments_do_not_see_each_other():
    """The second document's logits equal those of running it alone at positions 0.."""
    config = small_config()
    model = Transformer(config.model)
    batch = _batch(t=16)
    params = _init(model, batch)
    packed = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    alone = model.apply({"params": params}, batch["inputs"][:, 8:])
    np.testing.assert_allclose(packed[:, 8:], alone, rtol=1e-5, atol=1e-5)


def _qkv(b=2, t=128, n=4, k=2, h=64, seed=0):
    rng = np.random.default_rng(seed)
    q, kk, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(b, t, n, h), (b, t, k, h), (b, t, k, h)])
    seg = jnp.asarray(np.repeat([1, 2, 3], [50, 50, t - 100])[None].repeat(b, 0), jnp.int32)
    return q, kk, v, seg


def _naive_attention(q, k, v, seg, window):
    """Per head loops with explicit GQA head repetition, in numpy."""
    q, k, v, seg = map(np.asarray, (q, k, v, seg))
    b, t, n, h = q.shape
    rep = n // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for head in range(n):
            s = q[bi, :, head] @ k[bi, :, head // rep].T / np.sqrt(h)
            i, j = np.arange(t)[:, None], np.arange(t)[None]
            ok = (j <= i) & (seg[bi][:, None] == seg[bi][None]) & ((i - j < window) if window else True)
            s = np.where(ok, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[bi, :, head] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, head // rep]
    return out


@pytest.mark.parametrize("window", [0, 16])
def test_xla_attention_matches_naive(window):
    q, k, v, seg = _qkv()
    np.testing.assert_allclose(attention.xla_attention(q, k, v, seg, window), _naive_attention(q, k, v, seg, window),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 16])
def test_splash_kernel_matches_reference_in_interpret_mode(window):
    """The TPU Pallas kernel, run by the Pallas interpreter on CPU, agrees with the XLA path."""
    q, k, v, seg = _qkv(b=1)
    out = attention.splash_attention(q, k, v, seg, window, interpret=True)
    np.testing.assert_allclose(out, attention.xla_attention(q, k, v, seg, window), rtol=1e-5, atol=1e-5)


def test_attention_switch_fails_clearly_without_hardware():
    assert attention.resolve("auto", "cpu") == "xla"
    assert attention.resolve("auto", "gpu") == "cudnn"
    assert attention.resolve("auto", "tpu") == "splash"
    with pytest.raises(ConfigError, match="model.attention=cudnn needs a GPU"):
        attention.resolve("cudnn", "cpu")
    with pytest.raises(ConfigError, match="model.attention=splash needs a TPU"):
        attention.resolve("splash", "cpu")


def test_llama3_rope_scaling_matches_reference_formula():
    c = overrides.load(["llama3_8b"]).model
    inv = np.asarray(rope_frequencies(c), np.float64)
    base = 1.0 / (c.rope_theta ** (np.arange(0, 128, 2) / 128))
    expected = []
    for f in base:  # the published LLaMA-3.1 rule, written out per frequency
        wavelen = 2 * np.pi / f
        if wavelen < c.rope_original_max_len / c.rope_high_freq_factor:
            expected.append(f)
        elif wavelen > c.rope_original_max_len / c.rope_low_freq_factor:
            expected.append(f / c.rope_scaling_factor)
        else:
            smooth = (c.rope_original_max_len / wavelen - c.rope_low_freq_factor) / (
                c.rope_high_freq_factor - c.rope_low_freq_factor)
            expected.append((1 - smooth) * f / c.rope_scaling_factor + smooth * f)
    np.testing.assert_allclose(inv, expected, rtol=1e-5)


@pytest.mark.parametrize("preset, published", [
    ("llama3_8b", 8_030_261_248), ("llama3_1b", 1_235_814_400), ("qwen2_0_5b", 494_032_768),
])
def test_full_size_presets_build_through_eval_shape(preset, published):
    from jaxlm.core.mesh import make_mesh
    from jaxlm.core.sharding import tree_shardings

    config = overrides.load([preset])
    model = Transformer(config.model)
    assert count_params(abstract_params(model)) == published
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    P = jax.sharding.PartitionSpec
    shardings = tree_shardings(boxed, make_mesh(dataclasses.replace(config.mesh, fsdp=4, tensor=2)))
    assert shardings["layers"]["attn"]["q"].spec == P(None, "fsdp", "tensor", None)  # (L, embed, heads, head_dim)
    assert shardings["layers"]["mlp"]["down"].spec == P(None, "tensor", "fsdp")
    # A dimension the mesh axis does not divide is replicated rather than rejected: Qwen2's 14 heads on tensor=4.
    shardings = tree_shardings(boxed, make_mesh(dataclasses.replace(config.mesh, fsdp=2, tensor=4)))
    heads_split = shardings["layers"]["attn"]["q"].spec[2]
    assert heads_split == (None if config.model.num_heads % 4 else "tensor")


def test_cross_entropy_gradient_matches_autodiff():
    """The hand-written backward of the fused cross-entropy equals autodiff of the plain formula."""
    from jaxlm.training.losses import cross_entropy

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.int32)

    def plain(l):
        logz = jax.nn.logsumexp(l, -1)
        nll = logz - jnp.take_along_axis(l, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * mask) + 1e-2 * jnp.sum(logz**2 * mask)

    fused = lambda l: sum(cross_entropy(l, targets, mask, z_loss=1e-2)[:2])
    np.testing.assert_allclose(fused(logits), plain(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(fused)(logits), jax.grad(plain)(logits), rtol=1e-5, atol=1e-7)


def test_value_head_reads_the_final_hidden_states_without_moving_them():
    """PPO's critic: the values sown beside the logits are the final hidden states times `value`, the logits
    are the language model's as without a critic, and the values' gradient reaches `value` alone."""
    from jaxlm.training.objectives import per_token_losses

    config = small_config(value_head=True)
    model, batch = Transformer(config.model), _batch()
    params = _init(model, batch)
    plain = Transformer(dataclasses.replace(config.model, value_head=False))
    without = {k: v for k, v in params.items() if k != "value"}
    row = (batch["inputs"], batch["positions"], batch["segment_ids"])
    (h_btd, _), state = model.apply({"params": params}, *row, hidden=True, mutable=["intermediates"])
    values = state["intermediates"]["values"][0]
    np.testing.assert_allclose(values, np.asarray(h_btd @ params["value"][0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.apply({"params": params}, *row), plain.apply({"params": without}, *row))
    out = per_token_losses(model.apply, params, batch, batch["targets"])
    np.testing.assert_array_equal(out.values, values)
    grads = jax.grad(lambda p: per_token_losses(model.apply, p, batch, batch["targets"]).values.sum())(params)
    moved = {k for k, g in grads.items() if any(np.any(np.asarray(x)) for x in jax.tree.leaves(g))}
    assert moved == {"value"}
