"""Writes jaxlm parameters as Hugging Face safetensors (model.safetensors, or shards with
model.safetensors.index.json), one tensor produced and written at a time.
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np

from jaxlm.core.config import ConfigError, ModelConfig
from jaxlm.hf import families, tensor_map, tensors
from jaxlm.hf.tensor_map import TensorMap

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def hf_tensor(params: dict, c: ModelConfig, maps: list[TensorMap], layer: int | None,
              expert: int | None = None) -> np.ndarray:
    """One Hugging Face tensor, from the jaxlm parameters that `maps` (one map, or the parts of a fused
    tensor) describe, for one layer and (per-expert maps) one expert: the inverse of the importer's reading."""
    parts = []
    for m in sorted(maps, key=lambda m: m.pick[1] if m.pick else 0):
        path = m.path if layer is None else tensor_map.layer_path(c, m, layer)
        array = params
        for key in path:
            array = array[key]
        if not array.is_fully_addressable:
            raise ConfigError("export runs on one process; load the run on a single host to export it")
        # Only the one layer's (and expert's) slice leaves the devices.
        index = (layer,) if layer is not None and c.scan_layers else ()
        index += (expert,) if expert is not None else ()
        value = np.asarray(jax.device_get(array[index] if index else array))
        parts.append(value.transpose(np.argsort(m.perm)))  # back to the view axes, without the picked one
    view = np.stack(parts, axis=maps[0].pick[0]) if maps[0].pick else parts[0]
    return view.reshape(maps[0].hf_shape)


def plan(c: ModelConfig) -> dict[str, tuple[list[TensorMap], int | None, int | None]]:
    """HF tensor name -> (the maps that make it, layer index or None, expert index or None), in a stable
    order: the hub's layout, one tensor per expert."""
    top, layer = families.tensor_maps(c)
    out: dict[str, tuple[list[TensorMap], int | None, int | None]] = {}
    for m in top:
        out.setdefault(m.hf, ([], None, None))[0].append(m)
    for m, i in tensor_map.all_layers(c, layer):
        for j, name in enumerate(m.names(i)):
            out.setdefault(name, ([], i, j if m.experts else None))[0].append(m)
    return out


def write_checkpoint(params: dict, c: ModelConfig, out: str, dtype: str = "float32",
                     max_shard_bytes: int = 5 << 30, progress: bool = True) -> list[str]:
    """Writes the safetensors files of `params` into the existing directory `out`."""
    from tqdm import tqdm

    np_dtype = DTYPES[dtype]
    order = plan(c)
    specs = [(name, maps[0].hf_shape, np_dtype) for name, (maps, _, _) in order.items()]
    produce = lambda name: hf_tensor(params, c, *order[name]).astype(np_dtype)
    bar = lambda items: tqdm(items, desc="export", unit="tensor", disable=not progress)
    return tensors.write(out, specs, produce, max_shard_bytes, bar)
