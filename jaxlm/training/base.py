"""Where a run's weights start: `model.init_from`, the one start-from setting.

- "" : random weights;
- "hf:DIR" : a Hugging Face checkpoint, streamed onto the mesh (its config.json sets the model's shape);
- a jaxlm run directory: that run's latest model checkpoint (its config sets the shape).
The run computes as it is told (dtype, remat, attention kernel); the base fixes shape and layout.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from jaxlm.core import atomic, rundir
from jaxlm.core.config import Config, ConfigError, validate
from jaxlm.core.sharding import tree_shardings
from jaxlm.training.checkpoint import Checkpointer

# Settings of the base model that a run starting from it chooses for itself.
COMPUTE = ("dtype", "remat", "attention", "init_from")


def is_hf(ref: str) -> bool:
    return ref.startswith("hf:")


def directory(ref: str) -> str:
    """The directory `model.init_from` names (hf:DIR or a run directory)."""
    return os.path.abspath(os.path.expanduser(ref.removeprefix("hf:")))


def _run_config(run: str) -> Config:
    from jaxlm.core import overrides

    if not os.path.isfile(os.path.join(run, rundir.CONFIG)):
        raise ConfigError(f"model.init_from={run} is not a jaxlm run directory (no {rundir.CONFIG}) and has no "
                          f"hf: prefix; pass a run directory or hf:DIR for a Hugging Face checkpoint")
    return overrides.load([os.path.join(run, rundir.CONFIG)])


def resolve(config: Config) -> Config:
    """`config` with the model shape of its `model.init_from`, and the base's tokenizer for the data
    unless one is set."""
    ref = config.model.init_from
    if not ref:
        return config
    if is_hf(ref):
        from jaxlm.hf import importer

        return importer.resolve_init_from(config)
    run = directory(ref)
    base = _run_config(run).model
    model = dataclasses.replace(base, **{k: getattr(config.model, k) for k in COMPUTE})
    data = config.data
    if not data.tokenizer:
        names = [n for n in rundir.TOKENIZER_FILES if os.path.isfile(os.path.join(run, n))]
        if names:
            data = dataclasses.replace(data, tokenizer=os.path.join(run, names[0]))
    return validate(dataclasses.replace(config, model=model, data=data))


def load_params(config: Config, model, mesh, progress: bool = True):
    """The base's params on `mesh`, each array born on its shards; None for random weights."""
    ref = config.model.init_from
    if not ref:
        return None
    if is_hf(ref):
        from jaxlm.hf import importer

        return importer.load_params(directory(ref), dataclasses.replace(config.model, init_from=""), mesh,
                                    progress=progress)
    from jaxlm.core import sharded_init
    from jaxlm.training.assembly import boxed_params

    run = directory(ref)
    saved = _run_config(run)
    boxed = boxed_params(model)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            sharded_init.strip_boxes(boxed), tree_shardings(boxed, mesh))
    ckpt = Checkpointer(rundir.checkpoint_dir(run, saved.checkpoint.dir), saved.checkpoint)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"model.init_from={run} holds no complete checkpoint; train it first")
        return ckpt.restore_params(step, abstract)
    finally:
        ckpt.close()


def copy_files(config: Config, run_dir: str) -> None:
    """Copies what a run started from the base must carry: the tokenizer (and its Hugging Face files) and
    hf_config.json, so that generate and export need nothing else."""
    ref = config.model.init_from
    if not ref:
        return
    src = directory(ref)
    if is_hf(ref):
        from jaxlm.hf import importer

        importer.copy_run_files(src, run_dir)
        return
    from jaxlm.hf import tokenizer as hf_tokenizer

    hf_tokenizer.copy_files(src, run_dir)
    if os.path.isfile(os.path.join(src, rundir.HF_CONFIG)):
        with open(os.path.join(src, rundir.HF_CONFIG)) as f:
            atomic.write_json(os.path.join(run_dir, rundir.HF_CONFIG), json.load(f))


def template_dir(config: Config) -> str:
    """Where the base's chat template and tokenizer files live ("" for none)."""
    return directory(config.model.init_from) if config.model.init_from else ""
