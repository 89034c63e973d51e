"""Exports a jaxlm run directory as a Hugging Face checkpoint that `transformers` loads as-is.

Writes config.json, model.safetensors (or shards with model.safetensors.index.json), and the tokenizer:
the Hugging Face files the run was imported with, or, for a run pretrained by jaxlm, its sentencepiece
model with a LLaMA tokenizer config. Tensors are produced and written one at a time.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np

from jaxlm.core import rundir
from jaxlm.core.config import ConfigError, ModelConfig
from jaxlm.hf import families, tensors, tokenizer as hf_tokenizer
from jaxlm.hf.families import TensorMap
from jaxlm.hf.importer import HF_CONFIG_FILE

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def hf_tensor(params: dict, c: ModelConfig, maps: list[TensorMap], layer: int | None) -> np.ndarray:
    """One Hugging Face tensor, from the jaxlm parameters that `maps` (one map, or the parts of a fused
    tensor) describe: the inverse of the importer's reading."""
    parts = []
    for m in sorted(maps, key=lambda m: m.pick[1] if m.pick else 0):
        if layer is None:
            path = m.path
        elif c.scan_layers:
            path = ("layers", *m.path)
        else:
            path = (f"layers_{layer}", *m.path)
        array = params
        for key in path:
            array = array[key]
        if not array.is_fully_addressable:
            raise ConfigError("export runs on one process; load the run on a single host to export it")
        value = np.asarray(jax.device_get(array[layer] if layer is not None and c.scan_layers else array))
        parts.append(value.transpose(np.argsort(m.perm)))  # back to the view axes, without the picked one
    view = np.stack(parts, axis=maps[0].pick[0]) if maps[0].pick else parts[0]
    return view.reshape(maps[0].hf_shape)


def plan(c: ModelConfig) -> dict[str, tuple[list[TensorMap], int | None]]:
    """HF tensor name -> (the maps that make it, layer index or None), in a stable order."""
    top, layer = families.tensor_maps(c)
    out: dict[str, tuple[list[TensorMap], int | None]] = {}
    for m in top:
        out.setdefault(m.hf, ([], None))[0].append(m)
    for i in range(c.num_layers):
        for m in layer:
            out.setdefault(m.hf.format(i=i), ([], i))[0].append(m)
    return out


def write_checkpoint(params: dict, c: ModelConfig, out: str, dtype: str = "float32",
                     max_shard_bytes: int = 5 << 30, progress: bool = True) -> list[str]:
    """Writes the safetensors files of `params` into the existing directory `out`."""
    from tqdm import tqdm

    np_dtype = DTYPES[dtype]
    order = plan(c)
    specs = [(name, maps[0].hf_shape, np_dtype) for name, (maps, _) in order.items()]
    produce = lambda name: hf_tensor(params, c, *order[name]).astype(np_dtype)
    bar = lambda items: tqdm(items, desc="export", unit="tensor", disable=not progress)
    return tensors.write(out, specs, produce, max_shard_bytes, bar)


def _sentencepiece_tokenizer_config(tok) -> dict:
    piece = lambda i: tok.id_to_piece(i) if i >= 0 else None
    return {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tok.bos_id()), "eos_token": piece(tok.eos_id()),
            "unk_token": piece(tok.unk_id()), "pad_token": piece(tok.pad_id()), "add_bos_token": True,
            "add_eos_token": False, "model_max_length": 1 << 30}


def export(run_dir: str, out: str, dtype: str = "float32", step: int | None = None,
           max_shard_bytes: int = 5 << 30) -> str:
    """Writes the run's checkpoint (`step`, default the latest) as a Hugging Face model directory `out`."""
    from jaxlm.core.atomic import write_json as write_json_atomic
    from jaxlm.inference.load import load_run

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
    run_dir, out = os.path.abspath(os.path.expanduser(run_dir)), os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and os.listdir(out):
        raise ConfigError(f"{out} already exists and is not empty; choose a new output directory")
    run = load_run(run_dir, step)
    c = run.config.model
    template = None
    if os.path.isfile(os.path.join(run_dir, HF_CONFIG_FILE)):
        with open(os.path.join(run_dir, HF_CONFIG_FILE)) as f:
            template = json.load(f)
    config = families.hf_config(c, template, dtype)
    tok = run.tokenizer
    if template is None:  # a run pretrained by jaxlm: its tokenizer's special tokens
        config.update(bos_token_id=tok.bos_id(), eos_token_id=tok.eos_id(),
                      pad_token_id=tok.pad_id() if tok.pad_id() >= 0 else None)
    tmp = f"{out}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_checkpoint(run.params, c, tmp, dtype, max_shard_bytes)
    write_json_atomic(os.path.join(tmp, "config.json"), config)
    copied = hf_tokenizer.copy_files(run_dir, tmp)
    if copied == rundir.SENTENCEPIECE and not os.path.isfile(os.path.join(tmp, rundir.TOKENIZER_CONFIG)):
        write_json_atomic(os.path.join(tmp, rundir.TOKENIZER_CONFIG), _sentencepiece_tokenizer_config(tok))
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)
    return out
