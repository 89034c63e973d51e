"""Pipeline parallelism over the `stage` mesh axis: the same loss and gradients as one device, for GPipe and
the circular schedule, alone and with FSDP; checkpoints move between meshes with and without stages."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import quick_jit, replace, small_config

from jaxlm.core import mesh as mesh_lib
from jaxlm.core.config import CheckpointConfig, ConfigError, MeshConfig
from jaxlm.core.overrides import to_dict
from jaxlm.model import pipeline
from jaxlm.model.pipeline import Pipeline
from jaxlm.model.transformer import Transformer
from jaxlm.training import assembly
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.objectives import next_token

B, T = 8, 16


def close(actual, desired):
    """Gradients summed over micro-batches (or devices) in another order: rtol 1e-5, with an absolute floor of
    1e-5 of the largest entry for the entries that cancel to near zero."""
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(desired))))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((B, T), np.int32)
    seg[:, 10:] = 2  # two packed documents per row
    seg[:2, 14:] = 0  # and some padding
    pos = np.where(np.arange(T) < 10, np.arange(T), np.arange(T) - 10)
    batch = {"inputs": rng.integers(0, 128, (B, T)), "targets": rng.integers(0, 128, (B, T)),
             "positions": np.broadcast_to(pos, (B, T)), "segment_ids": seg, "loss_mask": (seg > 0)}
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


@functools.lru_cache
def _params(model_config):
    init = lambda key: Transformer(model_config, "xla").init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    return quick_jit(init, jax.random.key(0))(jax.random.key(0))  # the same params with or without stages


def _value_and_grads(config, mesh, pipe=Pipeline()):
    model = Transformer(config.model, "xla", pipe)
    params = _params(dataclasses.replace(config.model, remat="none"))
    loss = lambda p: next_token(model.apply, z_loss=1e-4).loss(p, _batch(), None)[0]
    f = jax.value_and_grad(loss)
    if mesh is None:
        return quick_jit(f, params)(params)
    with jax.set_mesh(mesh):
        assert "ppermute" in str(jax.make_jaxpr(f)(params))  # the pipeline, not a plain scan, ran
        return quick_jit(f, params)(params)


def _mesh(stage, fsdp=1, tensor=1):
    return mesh_lib.make_mesh(MeshConfig(stage=stage, fsdp=fsdp, tensor=tensor), jax.devices()[:stage * fsdp * tensor])


CASES = [  # stages, fsdp, micro-batches, layer chunks per stage (1: GPipe, 2: circular)
    pytest.param(2, 1, 4, 1, id="gpipe-2"),
    pytest.param(2, 2, 2, 2, id="circular-2-fsdp2"),
    pytest.param(4, 2, 4, 2, id="circular-4-fsdp2", marks=pytest.mark.slow),
    pytest.param(4, 1, 4, 1, id="gpipe-4", marks=pytest.mark.slow),  # each ~5 s to compile; the slow pass
    pytest.param(4, 1, 8, 2, id="circular-4", marks=pytest.mark.slow),  # runs the whole grid
    pytest.param(2, 1, 2, 2, id="circular-2", marks=pytest.mark.slow),
    pytest.param(2, 4, 2, 2, id="circular-2-fsdp4", marks=pytest.mark.slow),
    pytest.param(4, 2, 4, 1, id="gpipe-4-fsdp2", marks=pytest.mark.slow),
    pytest.param(2, (2, 2), 2, 2, id="circular-2-fsdp2-tensor2", marks=pytest.mark.slow),  # (fsdp, tensor)
]


@pytest.mark.parametrize("stages,fsdp,microbatches,repeats", CASES)
def test_pipeline_equals_one_device(stages, fsdp, microbatches, repeats):
    config = small_config(num_layers=8, remat="full" if repeats > 1 else "none")
    v1, g1 = _value_and_grads(config, None)
    fsdp, tensor = fsdp if isinstance(fsdp, tuple) else (fsdp, 1)
    vp, gp = _value_and_grads(config, _mesh(stages, fsdp, tensor), Pipeline(microbatches, repeats))
    np.testing.assert_allclose(vp, v1, rtol=1e-6)
    jax.tree.map(close, gp, g1)


def test_bubble_and_microbatch_choice():
    assert pipeline.bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert pipeline.bubble_fraction(4, 8, repeats=2) == pytest.approx(3 / 19)  # circular: smaller
    assert pipeline.bubble_fraction(1, 8) == 0.0
    assert pipeline.microbatches_for(Pipeline(), 4, 64) == 16  # the most up to 4 per stage that divide
    assert pipeline.microbatches_for(Pipeline(), 4, 12) == 12
    assert pipeline.microbatches_for(Pipeline(6), 4, 12) == 6


def _sizes(**sizes):
    return {a: sizes.get(a, 1) for a in mesh_lib.AXES}


@pytest.mark.parametrize("changes,sizes,message", [
    ({"model": {"num_layers": 6}}, _sizes(stage=4),
     "model.num_layers=6 is not divisible by mesh.stage=4 x train.pipeline_repeats=1"),
    ({"model": {"num_layers": 8}, "train": {"pipeline_repeats": 4}}, _sizes(stage=4),
     "model.num_layers=8 is not divisible by mesh.stage=4 x train.pipeline_repeats=4"),
    ({"train": {"pipeline_microbatches": 2}}, _sizes(stage=4),
     "train.pipeline_microbatches=2 is fewer than the 4 pipeline stages"),
    ({"train": {"pipeline_microbatches": 3}}, _sizes(stage=2),
     "train.pipeline_microbatches=3 does not divide the 8 rows"),
    ({"train": {"batch_size": 2}}, _sizes(stage=4),
     "each batch shard gets 2 rows per step, too few to split into 4..16 micro-batches"),
    ({"train": {"seq_len": 20}}, _sizes(sequence=4), "train.seq_len=20 must be divisible by 2\\*mesh.sequence=8"),
    ({}, _sizes(stage=2, sequence=2), "mesh.stage=2 and mesh.sequence=2 cannot be combined"),
    ({"model": {"scan_layers": False}}, _sizes(stage=2), "mesh.stage=2 needs model.scan_layers=true"),
])
def test_bad_pipeline_and_sequence_settings_are_one_line(changes, sizes, message):
    config = replace(small_config(num_layers=4), **changes)
    with pytest.raises(ConfigError, match=message) as e:
        assembly.check_parallelism(config, sizes)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # ~20 s each way; by default the pipelined model is checked to keep the checkpoint's tree
@pytest.mark.parametrize("direction", ["piped-to-plain", "plain-to-piped"])
def test_checkpoint_moves_between_pipelined_and_plain_meshes(tmp_path, direction):
    """A state saved from a 2-stage x 4-fsdp mesh restores bit for bit onto 8-way FSDP without stages, and
    back (~17 s each way); the next step from it is the same on either mesh."""
    config = replace(small_config(num_layers=4), train=dict(batch_size=B, seq_len=T, pipeline_microbatches=2))
    spec = assembly.build(config, "xla")
    step_fn = assembly.step_function(spec, assembly.objective(config, spec))
    step = lambda state, batch: quick_jit(step_fn, state, batch)(state, batch)
    piped, plain = _mesh(2, 4), _mesh(1, 8)
    states = {}
    ways = {"piped-to-plain": ("piped", piped, plain), "plain-to-piped": ("plain", plain, piped)}
    for name, mesh, other in [ways[direction]]:
        with jax.set_mesh(mesh):
            state = assembly.initial_state(spec, assembly.abstract_state(spec, mesh), mesh)
            state, _ = step(state, _batch(1))
            with Checkpointer(str(tmp_path / name), CheckpointConfig(async_save=False)) as ckpt:
                ckpt.save(1, state, {"position": 1}, to_dict(config), force=True)
            states[name] = jax.device_get(state)
        with jax.set_mesh(other):
            with Checkpointer(str(tmp_path / name), CheckpointConfig()) as ckpt:
                restored, _ = ckpt.restore(1, assembly.abstract_state(spec, other))
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), states[name])
            assert restored.params["layers"]["attn"]["q"].sharding.spec[0] == ("stage" if other is piped else None)
            next_state, metrics = step(restored, _batch(2))
        with jax.set_mesh(mesh):
            same_state, same_metrics = step(state, _batch(2))
        np.testing.assert_allclose(metrics["loss"], same_metrics["loss"], rtol=1e-6)
        jax.tree.map(close, jax.device_get(next_state.params), jax.device_get(same_state.params))


def test_pipelined_transformer_keeps_the_checkpoint_layout():
    """The pipelined model has the same parameter tree as the plain one: `init` is the scanned model."""
    config = small_config(num_layers=4)
    plain = jax.eval_shape(lambda: Transformer(config.model, "xla").init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    with jax.set_mesh(_mesh(2)):
        piped = jax.eval_shape(lambda: Transformer(config.model, "xla", Pipeline(2)).init(
            jax.random.key(0), jnp.zeros((2, 8), jnp.int32)))
    assert jax.tree.structure(plain) == jax.tree.structure(piped)


@pytest.mark.slow  # five `jaxlm train` processes (~2 min); the restore itself is checked above by default
@pytest.mark.parametrize("first,second", [("mesh.stage=2", "mesh.stage=1"), ("mesh.stage=1", "mesh.stage=2")])
def test_cli_resume_across_pipeline_stages(tmp_path, first, second):
    """`jaxlm train` stopped on one mesh and resumed on the other gives the uninterrupted run's losses."""
    from test_train import SMALL, jaxlm_train, losses

    args = SMALL + ["train.steps=4", "checkpoint.every=100"]
    cache = str(tmp_path / "cache")
    whole = jaxlm_train(args, tmp_path / "whole", cache)
    assert whole.returncode == 0, whole.stderr
    split = jaxlm_train(args + [first, "train.stop_at=2"], tmp_path / "split", cache)
    assert split.returncode == 0, split.stderr
    resumed = jaxlm_train(args + [second], tmp_path / "split", cache)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "mesh.stage" in resumed.stdout + resumed.stderr
    if "stage=2" in first + second:
        assert "pipeline: 2 stages" in split.stderr + resumed.stderr
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)


def test_a_batch_too_small_for_micro_batches_runs_the_plain_scan():
    """Scoring a single row on a pipelined mesh (an eval harness) falls back to the scan over the same
    stage-sharded weights: same logits, no error."""
    config = small_config(num_layers=4)
    model = Transformer(config.model, "xla", Pipeline())
    params = _params(config.model)
    tokens = _batch()["inputs"][:1]
    want = quick_jit(lambda p: model.apply({"params": p}, tokens), params)(params)
    with jax.set_mesh(_mesh(4)):
        assert "ppermute" not in str(jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens))(params))
        got = quick_jit(lambda p: model.apply({"params": p}, tokens), params)(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
