"""Loads a trained run (config, tokenizer, latest checkpoint) for generation and evaluation."""

from __future__ import annotations

import dataclasses
import os

import jax

from jaxlm import attention, mesh as mesh_lib, optim, overrides, sharded_init
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.model import Transformer

TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass
class LoadedRun:
    config: Config
    model: Transformer
    params: dict
    tokenizer: object  # sentencepiece.SentencePieceProcessor
    step: int


def load_run(run_dir: str, step: int | None = None) -> LoadedRun:
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{run_dir} is not a jaxlm run directory (no config.json); pass the directory `jaxlm train` printed")
    config = overrides.load([config_path])
    tokenizer = tokenizer_lib.load(os.path.join(run_dir, TOKENIZER_FILE))
    if tokenizer.vocab_size() > config.model.vocab_size:
        raise ConfigError(f"{run_dir}/{TOKENIZER_FILE} has {tokenizer.vocab_size()} pieces but the model has "
                          f"{config.model.vocab_size}: the tokenizer does not belong to this checkpoint")
    ckpt = Checkpointer(config.checkpoint.dir or os.path.join(run_dir, "checkpoints"), config.checkpoint)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise ConfigError(f"{ckpt.directory} holds no complete checkpoint; train first or pass another run")
    model = Transformer(config.model, attention.resolve(config.model.attention))
    mesh = mesh_lib.make_mesh(config.mesh)
    # The checkpoint holds the whole train state; restoring it whole keeps one code path with training.
    tx = optim.build_optimizer(config.optim, config.train.steps, sharded_init.abstract_params(model))
    with jax.set_mesh(mesh):
        abstract = sharded_init.abstract_state(sharded_init.make_init_fn(model, tx, config.train.seed), mesh)
        state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    return LoadedRun(config, model, state.params, tokenizer, step)
