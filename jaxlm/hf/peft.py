"""PEFT LoRA adapters: export jaxlm adapters for the `peft` library, and import PEFT adapters.

A PEFT adapter is `adapter_config.json` + `adapter_model.safetensors` with, per adapted nn.Linear,
`base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); the update is
(lora_alpha / r) * B @ A on the (out, in) weight. jaxlm's A (*L, *in, r) and B (*L, r, *out) flatten to
the same (in, out) layout the Hugging Face converters use (`jaxlm.hf.families`), so each is a reshape and
a transpose. Only LLaMA-family models (LLaMA, Mistral, Qwen) map: GPT-2 fuses q, k and v in one Conv1D.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from jaxlm.core import atomic
from jaxlm.core.config import ConfigError, LoraConfig, ModelConfig
from jaxlm.hf import families

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def _modules(c: ModelConfig) -> dict[tuple[str, ...], str]:
    """jaxlm in-layer path ("attn", "q") -> Hugging Face module name with "{i}" for the layer."""
    if c.architecture != "llama":
        raise ConfigError(f"PEFT adapters map to LLaMA-family models only, not model.architecture={c.architecture}")
    _, layer = families.tensor_maps(c)
    return {m.path: m.hf.removesuffix(".weight") for m in layer
            if m.hf.endswith("_proj.weight") and not m.experts}  # PEFT adapts no per-expert modules


def _layer_items(adapters: dict, c: ModelConfig):
    """(layer index, in-layer path, a (*in, r), b (r, *out)) for every adapted weight of every layer."""
    def walk(tree, prefix=()):
        if "a" in tree and "b" in tree and not isinstance(tree["a"], dict):
            yield prefix, tree
            return
        for k, v in tree.items():
            yield from walk(v, (*prefix, k))

    for path, ab in walk(adapters):
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        if path[0] == "layers":  # scanned: a leading layer axis
            for i in range(c.num_layers):
                yield i, path[1:], a[i], b[i]
        elif re.fullmatch(r"layers_\d+", path[0]):
            yield int(path[0].split("_")[1]), path[1:], a, b
        else:
            raise ConfigError(f"adapter on {'/'.join(path)} is outside the layers; PEFT export supports layer projections")


def export(adapters: dict, lora: LoraConfig, c: ModelConfig, out: str, base_model: str = "") -> str:
    """Writes the PEFT adapter directory `out` (atomically: a temporary directory, then a rename)."""
    from safetensors.numpy import save_file

    names = _modules(c)
    tensors, modules = {}, set()
    for i, path, a, b in _layer_items(adapters, c):
        if path not in names:
            raise ConfigError(f"no Hugging Face module for {'/'.join(path)}; PEFT export supports {sorted(names)}")
        module = names[path].format(i=i)
        r = a.shape[-1]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        modules.add(module)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "target_modules": sorted(modules), "inference_mode": True, "modules_to_save": None,
    }
    out = os.path.abspath(os.path.expanduser(out))
    with atomic.new_directory(out) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
    return out


def import_adapters(directory: str, c: ModelConfig) -> tuple[LoraConfig, dict]:
    """(LoRA config, adapters) for the jaxlm model `c` from a PEFT adapter directory.

    Layers the adapter leaves out get zero A and B (no change), so that scanned layers share one shape."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            pc = json.load(f)
        tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as e:
        raise ConfigError(f"{directory} is not a PEFT adapter ({CONFIG_FILE} + {WEIGHTS_FILE}): {e}") from None
    if pc.get("peft_type") != "LORA":
        raise ConfigError(f"{directory}: peft_type {pc.get('peft_type')!r} is not supported; only LORA adapters import")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(pc.get(key, False)) != ok:
            raise ConfigError(f"{directory}: {key}={pc.get(key)} is not supported")
    if pc.get("rank_pattern") or pc.get("alpha_pattern"):
        raise ConfigError(f"{directory}: per-module rank_pattern / alpha_pattern are not supported")
    r, alpha = int(pc["r"]), float(pc["lora_alpha"])
    # jaxlm scales by alpha / r; rsLoRA by alpha / sqrt(r): fold the difference into B.
    b_factor = float(np.sqrt(r)) if pc.get("use_rslora") else 1.0
    names = {v: k for k, v in _modules(c).items()}
    found: dict[tuple[str, ...], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    pattern = re.compile(r"(?:base_model\.model\.)?(.*)\.lora_A(?:\.\w+)?\.weight")
    for key in tensors:
        m = pattern.fullmatch(key)
        if not m:
            if ".lora_B" not in key:
                raise ConfigError(f"{directory}: unexpected tensor {key} (only LoRA A/B weights import)")
            continue
        module = m.group(1)
        layer = re.search(r"\.layers\.(\d+)\.", module)
        generic = re.sub(r"\.layers\.\d+\.", ".layers.{i}.", module)
        if layer is None or generic not in names:
            raise ConfigError(f"{directory}: no jaxlm weight for module {module}")
        a = tensors[key]
        b = tensors.get(key.replace("lora_A", "lora_B"))
        if b is None:
            raise ConfigError(f"{directory}: {key} has no matching lora_B tensor")
        found.setdefault(names[generic], {})[int(layer.group(1))] = (a, b * b_factor)
    if not found:
        raise ConfigError(f"{directory} holds no LoRA weights")
    shapes = {m.path: m.shape for m in families.tensor_maps(c)[1]}
    flat = {}
    for path, per_layer in found.items():
        shape = shapes[path]
        n_in = 1 if path[-1] != "o" else 2
        a_list, b_list = [], []
        for i in range(c.num_layers):
            a, b = per_layer.get(i, (np.zeros((r, int(np.prod(shape[:n_in]))), np.float32),
                                     np.zeros((int(np.prod(shape[n_in:])), r), np.float32)))
            if a.shape != (r, int(np.prod(shape[:n_in]))) or b.shape != (int(np.prod(shape[n_in:])), r):
                raise ConfigError(f"{directory}: layer {i} {'/'.join(path)} has A {a.shape} and B {b.shape}, which do "
                                  f"not fit rank {r} and the weight {shape}")
            a_list.append(a.T.reshape(*shape[:n_in], r).astype(np.float32))
            b_list.append(b.T.reshape(r, *shape[n_in:]).astype(np.float32))
        if c.scan_layers:
            flat[("layers", *path)] = {"a": np.stack(a_list), "b": np.stack(b_list)}
        else:
            for i in range(c.num_layers):
                flat[(f"layers_{i}", *path)] = {"a": a_list[i], "b": b_list[i]}
    adapters: dict = {}
    for path, ab in flat.items():
        node = adapters
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = ab
    targets = tuple(sorted({f"{'/'.join(p)}$" for p in found}))
    return LoraConfig(targets=targets, rank=r, alpha=alpha, dropout=float(pc.get("lora_dropout", 0.0))), adapters
