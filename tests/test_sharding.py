"""Sharded numerics on 8 fake CPU devices: meshes, losses, gradients and checkpoint restore across meshes."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from conftest import quick_jit, small_config

from jaxlm.core import sharded_init
from jaxlm.core.config import CheckpointConfig, ConfigError, MeshConfig
from jaxlm.core.mesh import make_mesh, mesh_shape
from jaxlm.core.sharding import global_batch
from jaxlm.model.transformer import Transformer
from jaxlm.training import optim
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.objectives import next_token
from jaxlm.training.step import make_step

MESHES = {
    "single": (MeshConfig(fsdp=1), 1),
    "fsdp2_tensor4": (MeshConfig(fsdp=2, tensor=4), 8),
    "data2_fsdp4": (MeshConfig(data=2, fsdp=4), 8),
    "fsdp8": (MeshConfig(fsdp=-1), 8),
}


def _numpy_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, t = config.train.batch_size, config.train.seq_len
    tokens = rng.integers(0, config.model.vocab_size, size=(b, t + 1)).astype(np.int32)
    segments = (np.arange(t) >= t // 3).astype(np.int32)[None].repeat(b, 0) + 1
    positions = np.where(segments == 1, np.arange(t), np.arange(t) - t // 3).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
            "segment_ids": segments, "loss_mask": np.ones((b, t), np.int32)}


def _setup(config, mesh_name):
    mesh_config, n = MESHES[mesh_name]
    mesh = make_mesh(mesh_config, jax.devices()[:n])
    model = Transformer(config.model)
    tx = optim.build_optimizer(config.optim, config.train.steps, sharded_init.abstract_params(model))
    init = sharded_init.make_init_fn(model, tx, seed=0)
    return mesh, model, tx, init


def _one_step(config, mesh_name, batch_np):
    mesh, model, tx, init = _setup(config, mesh_name)
    with jax.set_mesh(mesh):
        state, _ = sharded_init.create(init, mesh)
        batch = global_batch(batch_np, mesh)
        nll = lambda p: next_token(model.apply).loss(p, batch, None)[1]["loss"]
        grad_fn = jax.value_and_grad(lambda p: nll(p) / batch["loss_mask"].sum())
        loss, grads = quick_jit(grad_fn, state.params)(state.params)
        step = make_step(next_token(model.apply), tx, grad_accum=config.optim.grad_accum)
        state, metrics = quick_jit(step, state, batch)(state, batch)
        return jax.device_get((loss, grads, metrics["loss"], state.params))


@pytest.mark.parametrize("mesh_name", ["fsdp2_tensor4", pytest.param("data2_fsdp4", marks=pytest.mark.slow)])  # ~36 s each
def test_sharded_loss_and_gradients_equal_single_device(mesh_name):
    config = small_config()
    batch = _numpy_batch(config)
    ref = _one_step(config, "single", batch)
    got = _one_step(config, mesh_name, batch)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)  # loss
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-6)  # loss reported by the train step
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got[1], ref[1])  # grads
    # Params after one Adam step. Adam divides by |g|, which amplifies float32 noise in near-zero gradients,
    # so parameters are compared to a thousandth of the step size (lr = 1e-2).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), got[3], ref[3])


@pytest.mark.slow  # a sharded step compiled twice (~40 s); accumulation is checked by default in test_finetune.py
def test_gradient_accumulation_equals_full_batch():
    config = small_config()
    batch = _numpy_batch(config)
    full = _one_step(config, "fsdp8", batch)
    accum = dataclasses.replace(config, optim=dataclasses.replace(config.optim, grad_accum=2))
    # Two micro-batches of 4 rows over 8 devices is not possible with a batch split 8 ways; use 4 devices.
    MESHES["fsdp4"] = (MeshConfig(fsdp=4), 4)
    got = _one_step(accum, "fsdp4", batch)
    np.testing.assert_allclose(got[2], full[2], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), got[3], full[3])


def test_params_are_really_sharded():
    config = small_config()
    mesh, _, _, init = _setup(config, "fsdp2_tensor4")
    with jax.set_mesh(mesh):
        state, _ = sharded_init.create(init, mesh)
    q = state.params["layers"]["attn"]["q"]  # (L, D=32, N=4, H=8): embed over fsdp=2, heads over tensor=4
    assert q.addressable_shards[0].data.shape == (2, 16, 1, 8)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")["layers"]["attn"]["q"]
    assert mu.sharding == q.sharding  # Adam moments inherit the parameter's sharding


@pytest.mark.parametrize("sizes, fragment", [
    (MeshConfig(fsdp=3), "multiply to 3 but there are 8 devices"),
    (MeshConfig(fsdp=-1, tensor=3), "3 does not divide 8"),
    (MeshConfig(fsdp=-1, tensor=-1), "at most one -1"),
    (MeshConfig(fsdp=0), "sizes must be positive"),
])
def test_impossible_meshes_are_rejected(sizes, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        make_mesh(sizes)
    assert fragment in str(e.value)


def test_dcn_and_ici_sizes_resolve():
    shape = mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=4, dcn_data=-1), num_devices=256, num_slices=2)
    assert shape["ici"]["fsdp"] == 32 and shape["ici"]["tensor"] == 4 and shape["dcn"]["data"] == 2


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    """Saved on a 2x4 (fsdp x tensor) mesh; restored on 1x8 and on one device with identical values."""
    config = small_config()
    mesh, _, _, init = _setup(config, "fsdp2_tensor4")
    with jax.set_mesh(mesh):
        state, _ = sharded_init.create(init, mesh)
        ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig())
        ckpt.save(1, state, {"next_index": 1}, {"name": "t"})
        ckpt.close()
    saved = jax.device_get(state)
    for name in ("fsdp8", "single"):
        mesh, _, _, init = _setup(config, name)
        with jax.set_mesh(mesh):
            abstract = sharded_init.abstract_state(init, mesh)
            restored, data_state = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig()).restore(1, abstract)
        assert data_state == {"next_index": 1}
        assert restored.params["layers"]["attn"]["q"].sharding.mesh.shape == mesh.shape
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)


def test_splash_attention_sharded_over_the_mesh_matches_reference():
    """The shard_map wrapper around the TPU kernel (batch over fsdp, heads over tensor), interpreted on CPU."""
    from jaxlm.model import attention

    rng = np.random.default_rng(0)
    q, k, v = (jax.numpy.asarray(rng.normal(size=(2, 128, 4, 64)), np.float32) for _ in range(3))
    seg = jax.numpy.asarray(np.repeat([1, 2], [70, 58])[None].repeat(2, 0), np.int32)
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: attention.attend(*a, impl="splash", interpret=True))(q, k, v, seg)
    np.testing.assert_allclose(out, attention.xla_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)
