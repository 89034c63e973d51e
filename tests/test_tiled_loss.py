"""Vocabulary-tiled cross-entropy: the same losses and gradients as the whole logits, without them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import quick_jit, replace, small_config

from jaxlm.core import mesh as mesh_lib, sharded_init
from jaxlm.core.config import ConfigError, MeshConfig
from jaxlm.model.transformer import Transformer
from jaxlm.training import assembly
from jaxlm.training.losses import (auto_chunks, masked_sums, resolve_chunks, tiled_token_losses, token_losses)
from jaxlm.training.objectives import next_token


def close(actual, desired):
    """rtol 1e-6, with an absolute floor of 1e-6 of the largest entry: the weight gradient sums over chunks in
    another order than one matmul does, and its entries that cancel to near zero carry that rounding."""
    np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(desired))))


def _inputs(b=3, t=16, d=24, v=40, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], (b, t, d))
    w = jax.random.normal(k[1], (v, d)) * 0.3
    targets = jax.random.randint(k[2], (b, t), 0, v)
    mask = jax.random.bernoulli(k[3], 0.7, (b, t)).astype(jnp.float32) * jax.random.uniform(k[4], (b, t), maxval=2.0)
    return h, w, targets, mask  # the mask carries weights as well as zeros


def _loss(losses_fn, z_loss):
    def f(h, w, targets, mask):
        nll, zl, _ = masked_sums(*losses_fn(h, w, targets), mask, z_loss)
        return nll + zl
    return f


@pytest.mark.parametrize("chunks", [2, 4, 16])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_tiled_losses_and_gradients_equal_the_whole_logits(chunks, z_loss):
    h, w, targets, mask = _inputs()
    whole = _loss(lambda h, w, t: token_losses((h @ w.T).astype(jnp.float32), t), z_loss)
    tiled = _loss(lambda h, w, t: tiled_token_losses(h, w, t, chunks), z_loss)
    (lw, (gh_w, gw_w)), (lt, (gh_t, gw_t)) = [
        quick_jit(jax.value_and_grad(f, argnums=(0, 1)), h, w, targets, mask)(h, w, targets, mask)
        for f in (whole, tiled)]
    np.testing.assert_allclose(lt, lw, rtol=1e-6)
    close(gh_t, gh_w)
    close(gw_t, gw_w)
    # The per-token outputs themselves, in the caller's token order.
    for a, b in zip(tiled_token_losses(h, w, targets, chunks), token_losses((h @ w.T).astype(jnp.float32), targets)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def _grads(config, loss_chunks, mesh=None):
    model = Transformer(config.model, "xla")
    init = lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    params = quick_jit(init, jax.random.key(0))(jax.random.key(0))
    rng = np.random.default_rng(0)
    b, t = 4, 16
    batch = {"inputs": rng.integers(0, config.model.vocab_size, (b, t)), "targets": rng.integers(0, 128, (b, t)),
             "positions": np.tile(np.arange(t), (b, 1)), "segment_ids": np.ones((b, t), np.int32),
             "loss_mask": rng.integers(0, 2, (b, t))}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    objective = next_token(model.apply, z_loss=1e-4, loss_chunks=loss_chunks)
    f = jax.value_and_grad(lambda p: objective.loss(p, batch, None)[0])
    if mesh is None:
        return quick_jit(f, params)(params)
    with jax.set_mesh(mesh):
        return quick_jit(f, params)(params)


@pytest.mark.slow  # ~8 s each; by default the sharded test below compares tiled with untiled on the model
@pytest.mark.parametrize("tied", [False, True])
def test_tiled_objective_equals_untiled_on_a_model(tied):
    config = small_config(tie_embeddings=tied)
    (v1, g1), (v4, g4) = _grads(config, 1), _grads(config, 4)
    np.testing.assert_allclose(v4, v1, rtol=1e-6)
    jax.tree.map(close, g4, g1)


def test_tiled_objective_sharded_equals_single_device():
    """fsdp x tensor x sequence: the chunks keep the batch, vocabulary and sequence shardings."""
    config = small_config()
    mesh = mesh_lib.make_mesh(MeshConfig(fsdp=2, tensor=2, sequence=2), jax.devices()[:8])
    (v1, g1), (v4, g4) = _grads(config, 1), _grads(config, 2, mesh)
    np.testing.assert_allclose(v4, v1, rtol=1e-6)
    jax.tree.map(close, g4, g1)


def test_tiling_keeps_the_whole_logits_out_of_memory():
    """XLA's own count of the step's temporaries: the (B, T, V) logits and their gradient are gone."""
    config = small_config(vocab_size=32768, d_model=64, num_layers=1)
    config = replace(config, train=dict(batch_size=4, seq_len=256))

    def temp_bytes(chunks):
        c = replace(config, train=dict(loss_chunks=chunks))
        spec = assembly.build(c, "xla")
        step = assembly.step_function(spec, assembly.objective(c, spec))
        state = sharded_init.strip_boxes(jax.eval_shape(spec.init))
        batch = {k: jax.ShapeDtypeStruct((4, 256), jnp.int32)
                 for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
        return jax.jit(step).lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    logits = 4 * 256 * 32768 * 4
    untiled, tiled = temp_bytes(1), temp_bytes(16)
    assert untiled > logits  # the float32 logits (and their gradient) are live at once
    assert tiled < untiled - logits  # at least one whole logits' worth less: only a 1/16 chunk at a time


def test_auto_chunks_tile_only_where_the_logits_are_large():
    # bench_18m on one CPU: 8 x 256 x 8192 float32 logits are 64 MiB: left whole.
    assert auto_chunks(8, 256, 8192) == 1
    # llama3_8b on v5p-64 (32 chips, fsdp): 16 rows x 8192 tokens x 128256 vocabulary are 67 GB of logits.
    chunks = auto_chunks(16, 8192, 128256)
    assert chunks > 1 and 8192 % chunks == 0
    assert 16 * (8192 // chunks) * 128256 * 4 <= 1 << 30
    assert resolve_chunks(0, 512, 8192, 128256, {"fsdp": 32}) == chunks
    assert resolve_chunks(0, 512, 8192, 128256, {"fsdp": 32, "tensor": 4}) < chunks  # vocabulary split 4 ways


def test_loss_chunks_that_do_not_divide_the_row_are_one_line():
    with pytest.raises(ConfigError, match=r"train.loss_chunks=5 x mesh.sequence=1 does not divide train.seq_len=16"):
        resolve_chunks(5, 4, 16, 128)
    with pytest.raises(ConfigError, match=r"train.loss_chunks=4 x mesh.sequence=8"):
        resolve_chunks(4, 4, 16, 128, {"sequence": 8})
    config = dataclasses.replace(small_config(), train=dataclasses.replace(small_config().train, loss_chunks=3))
    with pytest.raises(ConfigError, match="train.loss_chunks=3"):
        assembly.check_parallelism(config, {a: 1 for a in mesh_lib.AXES})
