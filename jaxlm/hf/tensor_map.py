"""How a Hugging Face checkpoint's tensors lay out jaxlm's parameters: `TensorMap` and the helpers every
family's maps use (jaxlm/hf/families.py and the per-family modules beside it).

A `TensorMap` says how one Hugging Face tensor lays out one jaxlm parameter (per layer for layer tensors):
read the HF tensor row-major as the shape `view`, optionally pick one index of a fused axis (GPT-2 packs
q, k and v into one `c_attn`), then transpose the remaining view axes by `perm`. Mixture-of-experts
checkpoints store one tensor per expert ("{j}" in the name); the jaxlm parameter stacks them on a leading
expert axis. Import and export both use the same maps, so a round trip is exact by construction.
"""

from __future__ import annotations

import dataclasses
import math

from jaxlm.core.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf: str  # Hugging Face tensor name; "{i}" stands for the layer index, "{j}" for the expert index
    path: tuple[str, ...]  # jaxlm parameter path (inside a layer for layer tensors)
    hf_shape: tuple[int, ...]  # of one HF tensor (one expert's, for per-expert tensors)
    view: tuple[int, ...]  # hf_shape split row-major into these axes
    perm: tuple[int, ...]  # jaxlm axis j is view axis perm[j] (counted without the picked axis)
    pick: tuple[int, int] | None = None  # (view axis, index) of a fused tensor
    # > 0: one HF tensor per expert ("{j}" in `hf`); the jaxlm parameter stacks them on a leading axis of
    # this size, ahead of the axes `perm` orders.
    experts: int = 0
    moe: bool | None = None  # layer maps: of every layer (None), only MoE layers (True), only dense ones (False)
    # Layer maps: the params subtree holding the layers ("": the model's one stack; an encoder-decoder's
    # "encoder" or "decoder"), whose layer count `stack_depth` gives.
    stack: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        """The jaxlm shape (one layer)."""
        kept = [n for a, n in enumerate(self.view) if not self.pick or a != self.pick[0]]
        shape = tuple(kept[p] for p in self.perm)
        return (self.experts, *shape) if self.experts else shape

    def names(self, layer: int | None = None) -> list[str]:
        """The HF tensor names of this map (of `layer`): one, or one per expert."""
        if self.experts:
            return [self.hf.format(i=layer, j=j) for j in range(self.experts)]
        return [self.hf.format(i=layer)]


def layer_maps(c: ModelConfig, maps: list[TensorMap], layer: int) -> list[TensorMap]:
    """The per-layer maps that apply to layer `layer` (dense MLP or routed experts)."""
    moe = c.is_moe_layer(layer)
    return [m for m in maps if m.moe is None or m.moe == moe]


def stack_depth(c: ModelConfig, stack: str) -> int:
    """The layer count of a layer map's `stack`."""
    return c.resolved_decoder_layers if stack == "decoder" else c.num_layers


def all_layers(c: ModelConfig, maps: list[TensorMap]) -> list[tuple[TensorMap, int]]:
    """Every (layer map, layer index) of the model: stack by stack, layer by layer."""
    out = []
    for stack in dict.fromkeys(m.stack for m in maps):
        own = [m for m in maps if m.stack == stack]
        out += [(m, i) for i in range(stack_depth(c, stack)) for m in layer_maps(c, own, i)]
    return out


def layer_path(c: ModelConfig, m: TensorMap, layer: int) -> tuple[str, ...]:
    """The jaxlm path of layer map `m`'s parameter: in its stack, under "layers" (scanned: `layer` is then an
    index of its leading axis) or "layers_{layer}"."""
    return (*((m.stack,) if m.stack else ()), "layers" if c.scan_layers else f"layers_{layer}", *m.path)


def require(hf: dict, key: str, allowed, what: str) -> None:
    value = hf.get(key, allowed[0])
    if value not in allowed:
        raise ConfigError(f"config.json {key}={value!r} is not supported ({what}); expected one of {allowed}")


# The mixture-of-experts shape of a dense model (whatever `base` had).
DENSE = dict(num_experts=0, expert_mlp_dim=0, shared_expert_dim=0, shared_expert_gate=False, moe_first_layer=0,
             moe_every=1)


def view_groups(m: TensorMap) -> list[list[int]]:
    """For each HF axis, the view axes it splits into."""
    groups, axis = [], 0
    for size in m.hf_shape:
        group, prod = [], 1
        while prod < size or not group:
            group.append(axis)
            prod *= m.view[axis]
            axis += 1
        if prod != size:
            raise AssertionError(f"view {m.view} does not split {m.hf_shape} ({m.hf})")
        groups.append(group)
    assert axis == len(m.view) and math.prod(m.view) == math.prod(m.hf_shape)
    return groups
