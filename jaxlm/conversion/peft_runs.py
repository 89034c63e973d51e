"""LoRA run directories and PEFT: export a `jaxlm finetune` LoRA run's adapters for the `peft` library, and
make a run directory from a PEFT adapter and a base run (`jaxlm peft export|import`)."""

from __future__ import annotations

import dataclasses
import os

import jax

from jaxlm.core import atomic, overrides, rundir, sharded_init
from jaxlm.core.config import ConfigError
from jaxlm.core.overrides import to_dict
from jaxlm.hf import tokenizer as hf_tokenizer
from jaxlm.hf.peft import export, import_adapters
from jaxlm.inference.load import load_run
from jaxlm.model import lora as lora_lib
from jaxlm.training.checkpoint import save_params


def export_run(run_dir: str, out: str, base_model: str = "") -> str:
    """Exports the adapters of a `jaxlm finetune` LoRA run (<run>/adapters) as a PEFT adapter at `out`."""
    from safetensors.numpy import load_file

    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    path = os.path.join(run_dir, rundir.ADAPTERS, "adapters.safetensors")
    if not os.path.isfile(os.path.join(run_dir, rundir.CONFIG)) or not os.path.isfile(path):
        raise ConfigError(f"{run_dir} is not a LoRA finetuning run (needs {rundir.CONFIG} and "
                          f"{rundir.ADAPTERS}/adapters.safetensors)")
    config = overrides.load([os.path.join(run_dir, rundir.CONFIG)])
    adapters: dict = {}
    for key, value in load_file(path).items():
        node = adapters
        *parents, last = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return export(adapters, config.lora, config.model, out, base_model)


def import_run(adapter_dir: str, base_run: str, out: str) -> str:
    """A new run directory `out`: `base_run`'s model with the PEFT adapter merged in (for generate and export),
    plus the adapter in jaxlm's own format (`out/adapters`)."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and os.listdir(out):  # before the base run is read
        raise ConfigError(f"{out} already exists and is not empty; choose a new output directory")
    run = load_run(base_run)
    lora_config, adapters = import_adapters(adapter_dir, run.config.model)
    lo = lora_lib.Lora(run.model, lora_config, sharded_init.boxed_params(run.model))
    merged = jax.jit(lo.merge)(run.params, adapters)
    config = dataclasses.replace(run.config, lora=lora_config, train=dataclasses.replace(run.config.train, run_dir=out),
                                 checkpoint=dataclasses.replace(run.config.checkpoint, dir=""))
    with atomic.new_directory(out) as tmp:  # a failure leaves no half-written run behind
        hf_tokenizer.copy_files(os.path.abspath(os.path.expanduser(base_run)), tmp)
        atomic.write_json(os.path.join(tmp, rundir.CONFIG), to_dict(config))
        lora_lib.save_adapters(os.path.join(tmp, rundir.ADAPTERS), adapters, lora_config)
        save_params(rundir.checkpoint_dir(tmp), merged, run.step, to_dict(config), config.checkpoint, config.train.seed)
    return out
