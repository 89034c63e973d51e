"""LoRA through parameter masks: low-rank adapters beside a frozen base.

The trainable params are `{"base": model params, "lora": adapters}`. An adapter for a weight W of shape
(*L, *in, *out) is A (*L, *in, r) and B (*L, r, *out), with the weight's logical axis names, so it shards
with W. *L are the lead axes: the scanned layer axis, when there is one, and a mixture-of-experts layer's
expert axis, so that each expert (of each layer) has its own A and B. `Lora.apply` places A and
(alpha / r) * B beside W in the model's params (`{name}_lora_a`, `{name}_lora_b`); `layers.weight` then
returns a `LowRank` and `layers.dense` computes x @ W + (x @ A) @ B, so no gradient of the full W is ever
formed (`moe.expert_weights` instead merges W + A @ B per expert, since its grouped matmuls take whole
weights). The MoE router and shared-expert gate take no adapter (`UNADAPTED`).
Scanned layers slice the adapters with the weights, and a quantized W (QLoRA: a
`jaxlm.model.quantize.QuantizedArray`, whose codes and scales keep W's logical axis names and so shard like W) is
dequantized as usual. The base is frozen twice: `stop_gradient` here and `optim.build_optimizer`'s
trainable mask (so the base holds no optimizer state).

Dropout drops whole rank components (per layer and expert: rows of A) with probability `dropout` during
training and rescales the rest; PEFT's dropout on the adapter's input would need a mask per activation instead.
`merge` folds the adapters into W (for saving a plain model and for export). Continuing from saved or
PEFT adapters is `jaxlm.training.base.initial_adapters` (`model.init_from=RUN/adapters`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.core.config import ConfigError, LoraConfig
from jaxlm.core.sharding import path_str
from jaxlm.model.layers import LORA_A, LORA_B
from jaxlm.model.quantize import is_quantized, quantize_params

ADAPTER_FILE, ADAPTER_CONFIG = "adapters.safetensors", "adapters.json"


# Leading axes that batch independent weights: each slice gets its own adapter.
LEAD_AXES = ("layers", "expert")
# The MoE router and the shared expert's gate. Routing stays the base's: an adapter there would move tokens
# between experts, a discrete change the experts' own adapters cannot follow smoothly.
UNADAPTED = re.compile(r"(^|/)moe/(router|shared_gate)$")


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


class Target:
    """One adapted weight: where it is, how its axes split into (lead, inputs, outputs), and their names."""

    def __init__(self, path: str, shape: tuple[int, ...], names: tuple):
        self.path = path
        lead = 0
        while lead < len(names) and names[lead] in LEAD_AXES:
            lead += 1
        core = names[lead:]
        if "vocab" in core or "norm" in core:
            raise ConfigError(f"lora.targets matches {path}: embeddings and the output head cannot take LoRA; "
                              f"narrow the regex (e.g. 'attn/(q|v)$')")
        if core[0] == "embed":
            n_in = 1
        elif core[-1] == "embed":
            n_in = len(core) - 1
        else:
            raise ConfigError(f"lora.targets matches {path} (axes {core}), which is not a projection; narrow the regex")
        self.lead, self.n_in = lead, n_in
        self.lead_shape = shape[:lead]
        self.in_shape = shape[lead:lead + n_in]
        self.out_shape = shape[lead + n_in:]
        self.lead_names, self.in_names, self.out_names = names[:lead], core[:n_in], core[n_in:]

    def delta(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """A @ B in the weight's own shape (*L, *in, *out)."""
        k, m = int(np.prod(self.in_shape)), int(np.prod(self.out_shape))
        a2 = a.reshape(*self.lead_shape, k, a.shape[-1])
        b2 = b.reshape(*self.lead_shape, b.shape[self.lead], m)
        return (a2 @ b2).reshape(*self.lead_shape, *self.in_shape, *self.out_shape)


def find_targets(boxed_params, config: LoraConfig) -> dict[str, Target]:
    """The weights whose path matches any of `config.targets` (searched, e.g. "attn/(q|v)$").

    MoE routing weights (`UNADAPTED`) are passed over, so that "(gate|up|down)$" does not trip on
    "moe/shared_gate"; a pattern that matches nothing else is an error rather than a silent no-op."""
    patterns = [re.compile(p) for p in config.targets]
    targets, passed_over = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=_is_box)[0]:
        p = path_str(path)
        matching = [c.pattern for c in patterns if c.search(p)]
        if not matching:
            continue
        if UNADAPTED.search(p):
            for m in matching:
                passed_over.setdefault(m, p)
            continue
        names = leaf.names if _is_box(leaf) else (None,) * len(leaf.shape)
        value = leaf.value if _is_box(leaf) else leaf
        if len(value.shape) < 2:
            continue  # norms and biases are not projections
        targets[p] = Target(p, tuple(value.shape), tuple(names))
    for pattern, p in passed_over.items():
        if not any(re.search(pattern, t) for t in targets):
            raise ConfigError(f"lora.targets pattern {pattern!r} matches only MoE routing weights (e.g. {p}), which "
                              f"cannot take LoRA; adapt the experts instead, e.g. 'moe/(gate|up|down)$'")
    if not targets:
        every = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=_is_box)[0]]
        raise ConfigError(f"lora.targets={config.targets} matches no parameter; paths look like {', '.join(every[:8])}")
    return targets


def nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def flatten(tree, sep: str = "/") -> dict[str, jax.Array]:
    return {path_str(p).replace("/", sep): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Lora:
    """Builds adapters for a model's params and runs the model with them merged in."""

    def __init__(self, model: nn.Module, config: LoraConfig, boxed_params):
        self.model, self.config = model, config
        self.targets = find_targets(boxed_params, config)
        self.scale = config.alpha / config.rank

    def init(self, rng: jax.Array) -> dict:
        """Boxed adapters: A uniform in +-1/sqrt(fan_in) (as PEFT's Kaiming init), B zero, so the start is the base."""
        r, flat = self.config.rank, {}
        for i, (path, t) in enumerate(sorted(self.targets.items())):
            fan_in = int(np.prod(t.in_shape))
            a = jax.random.uniform(jax.random.fold_in(rng, i), (*t.lead_shape, *t.in_shape, r), jnp.float32,
                                   -1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in))
            b = jnp.zeros((*t.lead_shape, r, *t.out_shape), jnp.float32)
            flat[path] = {
                "a": nn.LogicallyPartitioned(a, (*t.lead_names, *t.in_names, None)),
                "b": nn.LogicallyPartitioned(b, (*t.lead_names, None, *t.out_names)),
            }
        return nest(flat)

    def merge(self, base, adapters, rng: jax.Array | None = None):
        """Base params with every target replaced by W + scale * A @ B (quantized targets dequantized first)."""
        flat = {path: lookup(adapters, path) for path in self.targets}

        def visit(path, w):
            p = path_str(path)
            if p not in flat:
                return w
            t, ad = self.targets[p], flat[p]
            a = self._dropped(p, t, ad["a"], rng)
            dense = w.dequantize(jnp.float32) if is_quantized(w) else w
            return (dense + self.scale * t.delta(a, ad["b"]).astype(dense.dtype)).astype(dense.dtype)

        return jax.tree_util.tree_map_with_path(visit, base, is_leaf=is_quantized)

    def _dropped(self, path: str, t: Target, a: jax.Array, rng: jax.Array | None) -> jax.Array:
        """A with whole rank components dropped (per lead slice) and the rest rescaled, when training with dropout."""
        if rng is None or not self.config.dropout:
            return a
        keep = 1.0 - self.config.dropout
        key = jax.random.fold_in(rng, sorted(self.targets).index(path))
        kept = jax.random.bernoulli(key, keep, (*t.lead_shape, a.shape[-1]))
        return a * (kept / keep).reshape(*t.lead_shape, *(1,) * t.n_in, -1).astype(a.dtype)

    def apply(self, variables, *args, rngs=None, **kwargs):
        """`model.apply` for params {"base", "lora"}; a "dropout" rng turns adapter dropout on."""
        params = variables["params"]
        flat = traverse_util.flatten_dict(jax.tree.map(jax.lax.stop_gradient, params["base"]))
        rng = None if rngs is None else rngs.get("dropout")
        for path, t in self.targets.items():
            ad = lookup(params["lora"], path)
            *parent, name = path.split("/")
            flat[(*parent, name + LORA_A)] = self._dropped(path, t, ad["a"], rng)
            flat[(*parent, name + LORA_B)] = self.scale * ad["b"]
        return self.model.apply({"params": traverse_util.unflatten_dict(flat)}, *args, **kwargs)

    @staticmethod
    def trainable(params) -> dict:
        """The optimizer mask: adapters train, the base is frozen (and holds no optimizer state)."""
        return {"base": jax.tree.map(lambda _: False, params["base"]),
                "lora": jax.tree.map(lambda _: True, params["lora"])}

    def make_params_fn(self, seed: int):
        """params() -> boxed {"base", "lora"}: a random base (quantized for QLoRA) and fresh adapters."""
        c = self.config

        def params():
            base_rng, lora_rng = jax.random.split(jax.random.key(seed))
            base = self.model.init(base_rng, jnp.zeros((1, 8), jnp.int32))["params"]
            if c.quantize != "none":  # boxed in, boxed out: codes and scales shard like their weights
                base = quantize_params(base, c.quantize, c.block_size)
            return {"base": base, "lora": self.init(lora_rng)}

        return params

    def abstract_params(self, seed: int = 0):
        return _strip(jax.eval_shape(self.make_params_fn(seed)))

    def make_init_fn(self, tx, seed: int):
        """init() -> TrainState for `sharded_init.abstract_state` / `materialize`, like `sharded_init.make_init_fn`."""
        from jaxlm.core.train_state import TrainState

        params_fn = self.make_params_fn(seed)

        def init():
            params = params_fn()
            train_rng = jax.random.fold_in(jax.random.key(seed), 1)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                              rng=jax.random.key_data(train_rng))

        return init


def _strip(tree):
    return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def lookup(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def save_adapters(directory: str, adapters, config: LoraConfig) -> None:
    """Writes adapters.safetensors (keys like "layers/attn/q/a") and adapters.json, each atomically."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    arrays = {k: np.asarray(jax.device_get(v)) for k, v in flatten(adapters).items()}
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as tmp:
        pass
    save_file(arrays, tmp.name)
    os.replace(tmp.name, os.path.join(directory, ADAPTER_FILE))
    meta = {"targets": list(config.targets), "rank": config.rank, "alpha": config.alpha, "dropout": config.dropout}
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        json.dump(meta, f, indent=2)
    os.replace(f.name, os.path.join(directory, ADAPTER_CONFIG))


def load_adapters(directory: str, lora: Lora) -> dict:
    """Reads adapters saved by `save_adapters`, checking that they fit `lora`'s targets and rank."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.path.join(directory, ADAPTER_FILE)
    try:
        arrays = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"cannot read LoRA adapters {path}: {e}") from None
    expected = {f"{p}/{ab}" for p in lora.targets for ab in "ab"}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ConfigError(f"adapters in {path} do not fit lora.targets: missing {missing[:4]}, unexpected {extra[:4]}; "
                          f"set lora.targets (and model.scan_layers) as when they were saved")
    r = lora.config.rank
    for p, t in lora.targets.items():
        want = {"a": (*t.lead_shape, *t.in_shape, r), "b": (*t.lead_shape, r, *t.out_shape)}
        for ab, shape in want.items():
            if arrays[f"{p}/{ab}"].shape != shape:
                raise ConfigError(f"adapter {p}/{ab} in {path} has shape {arrays[f'{p}/{ab}'].shape}, "
                                  f"expected {shape} (check lora.rank and the model config)")
    return nest({k: jnp.asarray(v) for k, v in arrays.items()})
