"""Test setup: 8 fake CPU devices, set before jax is imported anywhere, and small shared fixtures."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxlm.core.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # exact float32 comparisons on CPU


def quick_jit(fn, *args):
    """`fn` compiled for `args` without XLA's backend optimisations: several times faster to compile, the
    same float32 results. For tests that compile many small programs to compare numbers."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def small_config(**model) -> Config:
    """A model small enough to compile in a second: float32 compute, GQA, 2 layers."""
    fields = dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                  max_seq_len=64, dtype="float32", attention="xla")
    fields.update(model)
    return Config(
        model=ModelConfig(**fields),
        mesh=MeshConfig(),
        optim=OptimConfig(lr=1e-2, warmup_steps=1, eps=1e-6),
        train=TrainConfig(steps=4, batch_size=8, seq_len=16),
    )


@pytest.fixture
def config() -> Config:
    return small_config()


def replace(config: Config, **sections) -> Config:
    return dataclasses.replace(config, **{k: dataclasses.replace(getattr(config, k), **v) for k, v in sections.items()})
