"""Loads a trained run (config, tokenizer, latest checkpoint) for generation and evaluation."""

from __future__ import annotations

import dataclasses
import os

import jax

from jaxlm.core import mesh as mesh_lib, overrides, rundir, sharded_init
from jaxlm.core.config import Config, ConfigError, LoraConfig
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.model import quantize as quantize_lib
from jaxlm.model.transformer import Transformer
from jaxlm.training import assembly
from jaxlm.training.checkpoint import Checkpointer


@dataclasses.dataclass
class LoadedRun:
    config: Config
    model: Transformer
    params: dict
    tokenizer: tokenizer_lib.Tokenizer
    step: int
    directory: str = ""  # the run directory (holds tokenizer and chat template files)
    mesh: object = None  # the jax.sharding.Mesh the params are sharded over


DECODER_ONLY = ("llama", "gpt2")
GENERATES = (*DECODER_ONLY, "t5")


def load_run(run_dir: str, step: int | None = None, quantize: str | None = None,
             block_size: int = 128, language_model: bool = True,
             architectures: tuple[str, ...] | None = None, purpose: str = "") -> LoadedRun:
    """Loads the params of `step` (default: the latest), optionally weight-only quantized
    (`jaxlm.model.quantize` formats int8, int4, nf4). With `language_model`, a classifier run (a reward
    model) is a one-line error: it has no vocabulary head to generate or score text with."""
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    config_path = os.path.join(run_dir, rundir.CONFIG)
    if not os.path.isfile(config_path):
        raise ConfigError(f"{run_dir} is not a jaxlm run directory (no config.json); pass the directory `jaxlm train` printed")
    config = overrides.load([config_path])
    if language_model and config.model.num_labels:
        raise ConfigError(f"{run_dir} is a {'reward model' if config.model.num_labels == 1 else 'classifier'} "
                          f"(model.num_labels={config.model.num_labels}): it scores text and has no vocabulary head "
                          "to generate or evaluate with; export it with jaxlm convert to-hf")
    arch = config.model.architecture
    if architectures is not None and arch not in architectures:
        kinds = {"bert": "an encoder (it fills in masked tokens)", "t5": "an encoder-decoder"}.get(arch, arch)
        raise ConfigError(f"{run_dir} is {kinds}, model.architecture={arch}; {purpose or 'this command'} runs "
                          f"model.architecture={' or '.join(architectures)}")
    tokenizer = tokenizer_lib.load_for_run(run_dir)  # tokenizer.json (imported models) or tokenizer.model
    if tokenizer.vocab_size() > config.model.vocab_size:
        raise ConfigError(f"{tokenizer.path} has {tokenizer.vocab_size()} pieces but the model has "
                          f"{config.model.vocab_size}: the tokenizer does not belong to this checkpoint")
    # A damaged checkpoint (see Checkpointer.restore_params) is a one-line error naming the intact steps.
    with Checkpointer(rundir.checkpoint_dir(run_dir, config.checkpoint.dir), config.checkpoint) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{ckpt.directory} holds no complete checkpoint; train first or pass another run")
        if step not in ckpt.manager.all_steps():
            raise ConfigError(f"{ckpt.directory} has no checkpoint for step {step}; it has {ckpt.manager.all_steps()}")
        # The saved model is a plain one: LoRA runs save their adapters merged in.
        spec = assembly.build(dataclasses.replace(config, lora=LoraConfig()))
        mesh = mesh_lib.make_mesh(config.mesh)
        with jax.set_mesh(mesh):
            params = ckpt.restore_params(step, assembly.abstract_state(spec, mesh).params)
            if quantize:  # codes and scales sharded like the weights they replace
                params = quantize_lib.quantize_sharded(params, quantize, block_size, sharded_init.boxed_params(spec.model), mesh)
    return LoadedRun(config, spec.model, params, tokenizer, step, run_dir, mesh)
