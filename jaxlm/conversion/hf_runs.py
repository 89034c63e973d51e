"""A jaxlm run directory from a Hugging Face checkpoint (`jaxlm convert from-hf`), and a run's checkpoint as a
Hugging Face model directory that `transformers` loads as-is (`jaxlm convert to-hf`).

Export writes config.json, the safetensors and the tokenizer: the Hugging Face files the run was imported
with, or, for a run pretrained by jaxlm, its sentencepiece model with a LLaMA tokenizer config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax

from jaxlm.core import atomic, mesh as mesh_lib, rundir
from jaxlm.core.config import Config, ConfigError, validate, with_model
from jaxlm.core.overrides import to_dict
from jaxlm.data import objective_rows
from jaxlm.hf import exporter, families, importer, tokenizer as hf_tokenizer
from jaxlm.inference.load import load_run
from jaxlm.training import assembly
from jaxlm.training.checkpoint import Checkpointer

log = logging.getLogger(__name__)


def from_hf(hf_dir: str, out: str, base: Config | None = None) -> Config:
    """Writes a jaxlm run directory at `out` (config.json, an Orbax checkpoint at step 0, the tokenizer and
    chat template) that `jaxlm generate`, `jaxlm train OUT/config.json` and export read."""
    hf_dir, out = os.path.abspath(os.path.expanduser(hf_dir)), os.path.abspath(os.path.expanduser(out))
    base = base or Config()
    model = families.model_config(importer.read_config(hf_dir), base.model)
    if model.num_labels > 1:  # before the run directory exists
        raise ConfigError(f"{hf_dir} is a sequence classifier with {model.num_labels} labels, which no jaxlm task "
                          f"trains or runs (task=reward trains a 1-label reward model)")
    with atomic.new_directory(out) as tmp:
        config = _write_run(hf_dir, out, tmp, base, model)
    return config


def _write_run(hf_dir: str, out: str, tmp: str, base: Config, model) -> Config:
    tok_file = importer.copy_run_files(hf_dir, tmp)
    if tok_file is None:
        log.warning("%s has no %s: copy the model's tokenizer into %s before generating from or exporting it",
                    hf_dir, " or ".join(rundir.TOKENIZER_FILES), out)
    # A reward model (num_labels=1) is a run of task=reward, which validation requires; pretrain, the
    # default, could not train its score head anyway. A task the caller chose stays (and fails validation).
    task = "reward" if model.num_labels == 1 and base.task == "pretrain" else base.task
    config = dataclasses.replace(
        with_model(base, model), name=base.name if base.name != "run" else os.path.basename(out), task=task,
        train=dataclasses.replace(base.train, run_dir=out, seq_len=min(base.train.seq_len, model.max_seq_len)),
        data=dataclasses.replace(base.data, tokenizer=os.path.join(out, tok_file) if tok_file else base.data.tokenizer),
        checkpoint=dataclasses.replace(base.checkpoint, dir=""),
    )
    validate(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    spec = assembly.build(config)
    with jax.set_mesh(mesh):
        params = importer.load_params(hf_dir, model, mesh)  # the optimizer state is what a fresh run starts with
        state = assembly.initial_state(spec, assembly.abstract_state(spec, mesh), mesh, params)
        ckpt = Checkpointer(rundir.checkpoint_dir(tmp), dataclasses.replace(config.checkpoint, async_save=False))
        ckpt.save(0, state, None, to_dict(config), force=True)
        ckpt.close()
    atomic.write_json(os.path.join(tmp, rundir.CONFIG), to_dict(config))
    return config


def _sentencepiece_tokenizer_config(tok, c) -> dict:
    """A tokenizer_config.json for a sentencepiece model jaxlm trained: the text's tokens as the run saw them.
    A decoder reads BOS first; a T5 encoder reads the text then EOS (`jaxlm generate`, span corruption); a
    BERT encoder `<s> text </s>` as pretraining packed it, with its mask piece."""
    piece = lambda i: tok.id_to_piece(i) if i >= 0 else None
    out = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tok.bos_id()), "eos_token": piece(tok.eos_id()),
           "unk_token": piece(tok.unk_id()), "pad_token": piece(tok.pad_id()), "add_bos_token": not c.encoder_decoder,
           "add_eos_token": c.encoder_decoder or c.encoder_only, "model_max_length": 1 << 30}
    if c.encoder_only:
        out["mask_token"] = piece(objective_rows.mask_id(tok))
    return out


def to_hf(run_dir: str, out: str, dtype: str = "float32", step: int | None = None,
           max_shard_bytes: int = 5 << 30) -> str:
    """Writes the run's checkpoint (`step`, default the latest) as a Hugging Face model directory `out`."""
    if dtype not in exporter.DTYPES:
        raise ConfigError(f"--dtype {dtype} is not supported; use one of {', '.join(exporter.DTYPES)}")
    run_dir, out = os.path.abspath(os.path.expanduser(run_dir)), os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and os.listdir(out):  # before the checkpoint is read
        raise ConfigError(f"{out} already exists and is not empty; choose a new output directory")
    run = load_run(run_dir, step, language_model=False)
    c = run.config.model
    template = None
    if os.path.isfile(os.path.join(run_dir, rundir.HF_CONFIG)):
        with open(os.path.join(run_dir, rundir.HF_CONFIG)) as f:
            template = json.load(f)
    tok = run.tokenizer
    # The tokenizer's special tokens: all of a run pretrained by jaxlm (no template), and a classifier's pad id
    # where its template names none.
    tokens = dict(bos_token_id=tok.bos_id(), eos_token_id=tok.eos_id(),
                  pad_token_id=tok.pad_id() if tok.pad_id() >= 0 else None)
    config = families.hf_config(c, template, dtype, tokens)
    with atomic.new_directory(out) as tmp:
        exporter.write_checkpoint(run.params, c, tmp, dtype, max_shard_bytes)
        atomic.write_json(os.path.join(tmp, "config.json"), config)
        copied = hf_tokenizer.copy_files(run_dir, tmp)
        if copied == rundir.SENTENCEPIECE and not os.path.isfile(os.path.join(tmp, rundir.TOKENIZER_CONFIG)):
            atomic.write_json(os.path.join(tmp, rundir.TOKENIZER_CONFIG), _sentencepiece_tokenizer_config(tok, c))
    return out
