"""Reads a Hugging Face checkpoint (config.json + safetensors) into jaxlm parameters on a mesh.

Parameters are streamed: every jaxlm array is built with `jax.make_array_from_callback`, and each device's
callback reads only its own block of the Hugging Face tensor from a memory map. No host ever holds more
than its own shards, so a model larger than one host's memory loads across a mesh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from jaxlm.core import atomic, rundir, sharded_init
from jaxlm.core.config import Config, ConfigError, ModelConfig, validate, with_model
from jaxlm.core.sharding import tree_shardings
from jaxlm.hf import families, tensor_map, tokenizer as hf_tokenizer
from jaxlm.hf.tensor_map import TensorMap
from jaxlm.hf.tensors import SafetensorsDir, few
from jaxlm.model import architectures

log = logging.getLogger(__name__)

HF_CONFIG_FILE = rundir.HF_CONFIG


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{hf_dir} is not a Hugging Face checkpoint (no config.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


def resolve_init_from(config: Config, hf_dir: str) -> Config:
    """`config` with the model shape of the Hugging Face checkpoint in `hf_dir` (its base), and that
    checkpoint's tokenizer for the data unless one is set."""
    # Called before the multi-process start, which the platform query must not precede.
    model = families.model_config(read_config(hf_dir), config.model, families.safe_platform(config.distributed))
    data = config.data
    if not data.tokenizer:
        names = [n for n in rundir.TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
        if not names:
            raise ConfigError(f"{hf_dir} has no {' or '.join(rundir.TOKENIZER_FILES)}; set data.tokenizer to the "
                              f"model's tokenizer")
        data = dataclasses.replace(data, tokenizer=os.path.join(hf_dir, names[0]))
    return validate(dataclasses.replace(with_model(config, model), data=data))


def copy_run_files(hf_dir: str, run_dir: str) -> str | None:
    """Copies the tokenizer files and the Hugging Face config.json (as hf_config.json) into a run directory.
    Returns the tokenizer file jaxlm reads, or None."""
    atomic.write_json(os.path.join(run_dir, HF_CONFIG_FILE), read_config(hf_dir))
    return hf_tokenizer.copy_files(hf_dir, run_dir)


def _block(ckpt: SafetensorsDir, m: TensorMap, layer: int | None, index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` (in jaxlm layout, one layer) of the parameter `m` describes; a per-expert map reads
    one HF tensor for each expert in the block's expert range."""
    if m.experts:
        experts = range(*index[0].indices(m.experts))
        first = _one_block(ckpt, m, m.hf.format(i=layer, j=experts[0]), index[1:])
        out = np.empty((len(experts), *first.shape), first.dtype)
        out[0] = first
        for k, j in enumerate(experts[1:], 1):
            out[k] = _one_block(ckpt, m, m.hf.format(i=layer, j=j), index[1:])
        return out
    return _one_block(ckpt, m, m.hf.format(i=layer), index)


def _one_block(ckpt: SafetensorsDir, m: TensorMap, name: str, index: tuple[slice, ...]) -> np.ndarray:
    # Slices per view axis: jaxlm axis j is view axis perm[j]; a picked axis is one fixed index.
    kept = [a for a in range(len(m.view)) if not m.pick or a != m.pick[0]]
    view_index: list[slice] = [slice(None)] * len(m.view)
    for j, s in enumerate(index):
        view_index[kept[m.perm[j]]] = s
    if m.pick:
        view_index[m.pick[0]] = slice(m.pick[1], m.pick[1] + 1)
    view_index = [slice(*s.indices(n)) for s, n in zip(view_index, m.view)]
    # Each HF axis is read over the range of its outermost view axis; inner axes are sliced afterwards.
    read, after, block_view = [], [], []
    for group in tensor_map.view_groups(m):
        inner = int(np.prod([m.view[a] for a in group[1:]]))
        outer = view_index[group[0]]
        read.append(slice(outer.start * inner, outer.stop * inner))
        block_view += [outer.stop - outer.start] + [m.view[a] for a in group[1:]]
        after += [slice(None)] + [view_index[a] for a in group[1:]]
    block = ckpt.read(name, tuple(read)).reshape(block_view)[tuple(after)]
    if m.pick:
        block = block[(slice(None),) * m.pick[0] + (0,)]
    return block.transpose(m.perm)


def fused_experts(ckpt: SafetensorsDir, c: ModelConfig) -> bool:
    """Whether the checkpoint stacks each layer's experts in one tensor (transformers 5's in-memory names)
    rather than the hub's one tensor per expert."""
    return bool(c.num_experts) and any(n.endswith(".mlp.experts.gate_up_proj") for n in ckpt.names())


def check(ckpt: SafetensorsDir, c: ModelConfig, maps: tuple[list[TensorMap], list[TensorMap]] | None = None) -> None:
    """Raises ConfigError naming every missing, misshaped or unexpected tensor."""
    top, layer = maps or families.tensor_maps(c)
    expected = {m.hf: m.hf_shape for m in top}
    for m, i in tensor_map.all_layers(c, layer):
        expected.update({name: m.hf_shape for name in m.names(i)})
    present = set(ckpt.names())
    missing = sorted(set(expected) - present)
    misshaped = [f"{n} {list(ckpt.shape(n))} (expected {list(s)})" for n, s in expected.items()
                 if n in present and ckpt.shape(n) != s]
    # Some writers keep the tied copy; a classifier has no vocabulary head to tie.
    ignored = {"lm_head.weight"} if c.tie_embeddings and not c.num_labels else set()
    if c.encoder_decoder:
        from jaxlm.hf.t5_family import IGNORED

        ignored |= set(IGNORED)
    unexpected = sorted(n for n in present - set(expected) - ignored if not n.endswith(families.IGNORED_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"missing tensors {few(missing)}")
    if misshaped:
        problems.append(f"wrongly shaped tensors {few(misshaped)}")
    if unexpected:
        problems.append(f"unexpected tensors {few(unexpected)}")
    if problems:
        raise ConfigError(f"{ckpt.directory} does not match its config.json: {'; '.join(problems)}. "
                          f"The checkpoint is incomplete or not of the architecture its config names")


def open_checkpoint(hf_dir: str, c: ModelConfig) -> tuple[SafetensorsDir, tuple[list[TensorMap], list[TensorMap]]]:
    """The checkpoint, checked against `c`, and the tensor maps of its layout."""
    ckpt = SafetensorsDir(hf_dir)
    if c.architecture == "gpt2" and not any(n.startswith("transformer.") for n in ckpt.names()):
        # The original GPT-2 uploads name tensors without the GPT2LMHeadModel prefix.
        ckpt.entries = {f"transformer.{n}": e for n, e in ckpt.entries.items()}
    if c.architecture == "bert":  # older BERT uploads say LayerNorm.gamma/beta
        from jaxlm.hf.bert_family import legacy_name

        ckpt.entries = {legacy_name(n): e for n, e in ckpt.entries.items()}
    maps = families.tensor_maps(c, fused_experts(ckpt, c))
    check(ckpt, c, maps)
    return ckpt, maps


def load_params(hf_dir: str, c: ModelConfig, mesh: Mesh, progress: bool = True) -> dict:
    """The model's parameters from `hf_dir`, each array on its target sharding (jaxlm.core.sharding rules)."""
    ckpt, (top, layer) = open_checkpoint(hf_dir, c)
    model = architectures.build(c)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    shardings = traverse_util.flatten_dict(tree_shardings(boxed, mesh), is_leaf=lambda _, x: not isinstance(x, dict))
    abstract = traverse_util.flatten_dict(sharded_init.strip_boxes(boxed))
    jobs = [(m, None, m.path) for m in top]
    if c.scan_layers:  # one array per stack and map: every layer of one kind (a dense/MoE mix cannot scan)
        jobs += [(m, "stacked", tensor_map.layer_path(c, m, 0)) for m in tensor_map.layer_maps(c, layer, 0)]
    else:
        jobs += [(m, i, tensor_map.layer_path(c, m, i)) for m, i in tensor_map.all_layers(c, layer)]
    if sorted(p for _, _, p in jobs) != sorted(abstract):
        raise AssertionError(f"tensor maps do not cover the model: {sorted(set(abstract) ^ {p for _, _, p in jobs})}")

    from tqdm import tqdm

    out = {}
    for m, where, path in tqdm(jobs, desc="import", unit="tensor", disable=not progress or jax.process_index()):
        target = abstract[path]

        def read(index, m=m, where=where, dtype=target.dtype):
            index = index or (slice(None),) * len(target.shape)
            if where == "stacked":  # fill one array layer by layer: a single copy, converted on assignment
                layers = range(*index[0].indices(tensor_map.stack_depth(c, m.stack)))
                first = _block(ckpt, m, layers[0], index[1:])
                out = np.empty((len(layers), *first.shape), dtype)
                out[0] = first
                for k, i in enumerate(layers[1:], 1):
                    out[k] = _block(ckpt, m, i, index[1:])
                return out
            return _block(ckpt, m, where, index).astype(dtype)

        out[path] = jax.make_array_from_callback(target.shape, shardings[path], read, dtype=target.dtype)
    return traverse_util.unflatten_dict(out)
