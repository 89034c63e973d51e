"""Per-device memory of one training step: an analytic model, and XLA's compiled `memory_analysis()`.

The analytic model is exact for what is stored (parameters, optimizer state, batch: their shapes and
shardings come from the real model, optimizer and rule table through `jax.eval_shape`, on an abstract
mesh, so nothing is allocated or compiled). Activations, logits and gradients are counted by formula
from the remat policy and the per-device batch; a mixture of experts' layers count their router, their
dispatched assignments and the expert all-to-all's worst-case receive buffer. The compiled measure
builds the same train step (`training.assembly`) that `jaxlm train` runs, for the target's devices, and
asks XLA; a compile-time out-of-memory is reported as such.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from jaxlm.core import flops, mesh as mesh_lib, sharded_init
from jaxlm.core.config import Config
from jaxlm.core.sharding import BATCH_AXES, batch_sharding, logical_sharding, tree_shardings
from jaxlm.data.objective_rows import target_length
from jaxlm.model import architectures, attention, experts, pipeline
from jaxlm.model.pipeline import Pipeline
from jaxlm.training import assembly
from jaxlm.training.losses import resolve_chunks

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
GIB = 1 << 30


def batch_lengths(config: Config) -> dict[str, int]:
    """The training batch's keys and row lengths for the run's architecture and objective: an
    encoder-decoder's decoder rows are the targets' length (`objective_rows.target_length`); prefix-LM rows
    carry their prefix mask."""
    t = config.train
    if config.model.encoder_decoder:
        target = target_length(config)
        return {"inputs": t.seq_len, "positions": t.seq_len, "segment_ids": t.seq_len, "decoder_inputs": target,
                "decoder_positions": target, "decoder_segment_ids": target, "targets": target, "loss_mask": target}
    prefix = config.objective.kind == "prefix_lm" or config.objective.prefix_lm
    return {k: t.seq_len for k in (*BATCH_KEYS, *(("prefix_mask",) if prefix else ()))}


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device. `temporaries` is the largest transient (gradients, logits, recomputation)."""

    params: int
    optimizer: int
    batch: int
    activations: int  # saved for the backward pass, all layers
    temporaries: int
    method: str  # "analytic" or "compiled (<platform>)"
    # Parts of `params` and `optimizer` (not added again to the total), reported on their own row: the routed
    # experts' weights and their optimizer state, split over expert x fsdp x tensor. 0 for a dense model.
    expert_params: int = 0
    expert_optimizer: int = 0
    param_count: int = 0  # the model's parameters on all devices together, from the same eval_shape

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.batch + self.activations + self.temporaries


@dataclasses.dataclass(frozen=True)
class Compiled:
    """XLA's figures for the compiled step on one device, or the compiler's out-of-memory message."""

    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    oom: str | None = None
    platform: str = ""

    @property
    def total(self) -> int:
        # Donated state aliases the outputs, so it counts once.
        return self.argument + self.output - self.alias + self.temp


def _spec(config: Config) -> assembly.ModelSpec:
    # Initialised through the XLA attention path: the parameters do not depend on the kernel, and
    # flash kernels reject the short dummy sequence that `init` traces.
    return assembly.build(config, "xla")


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    axes = mesh_lib.AXES
    return AbstractMesh(tuple(sizes[a] for a in axes), axes, axis_types=(AxisType.Auto,) * len(axes))


def _local_bytes(abstract_tree, shardings) -> int:
    def one(a, s):
        return math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree.map(one, abstract_tree, shardings)))


def _expert_bytes(boxed_tree, mesh) -> int:
    """Local bytes of the leaves with an `expert` axis: the routed experts' weights (or their optimizer
    state, which inherits the weights' logical names)."""
    is_box = lambda leaf: isinstance(leaf, nn.LogicallyPartitioned)

    def one(leaf):
        if not is_box(leaf) or "expert" not in leaf.names:
            return 0
        shape = leaf.value.shape
        local = logical_sharding(leaf.names, shape, mesh).shard_shape(shape)
        return math.prod(local) * np.dtype(leaf.value.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree.map(one, boxed_tree, is_leaf=is_box)))


def _ways(name: str, size: int, mesh) -> int:
    """How many pieces the rule table splits a dimension of `size` named `name` into on `mesh`."""
    return size // logical_sharding((name,), (size,), mesh).shard_shape((size,))[0]


def local_rows(config: Config, sizes: dict[str, int]) -> int:
    """Sequences of a step's batch on one device (the batch is split over the batch axes)."""
    spec = PartitionSpec(tuple(a for a in BATCH_AXES if sizes[a] > 1) or None, None)
    t = config.train
    return NamedSharding(abstract_mesh(sizes), spec).shard_shape((t.batch_size, t.seq_len))[0]


def micro_tokens(config: Config, sizes: dict[str, int]) -> float:
    """Tokens one device computes per micro-batch: its rows over the accumulation steps, and its part of
    each row under context parallelism."""
    b = max(local_rows(config, sizes) // config.optim.grad_accum, 1)
    return b * config.train.seq_len / sizes["sequence"]


class _Ffn(NamedTuple):
    """A feed-forward block's bytes per device: all its activations at once, those a `dots` policy saves,
    and its weights gathered over FSDP in the compute dtype."""

    whole: float
    dots: float
    weights: float


def _dense_ffn(c, mesh, tokens: float, act: int) -> _Ffn:
    mlp = tokens * c.mlp_dim / _ways("mlp", c.mlp_dim, mesh) * act
    # SwiGLU keeps float32 intermediates when nothing is rematerialised (fitted to XLA's TPU programs).
    return _Ffn(12 * mlp, 2 * mlp, 3 * c.mlp_dim / _ways("mlp", c.mlp_dim, mesh) * c.d_model * act)


def _moe_ffn(c, mesh, tokens: float, act: int) -> _Ffn:
    """Routed experts: tokens x k assignments, sent to their experts' devices over an expert axis of ep
    devices. The all-to-all's receive buffer is sized for the worst case, all ep senders' assignments landing
    on one device (jaxlm/model/expert_parallel.py), and the expert matmuls run over that whole buffer."""
    d, e, f, fs = c.d_model, c.num_experts, c.resolved_expert_mlp_dim, c.shared_expert_dim
    ep = _ways("expert", e, mesh)
    assigned = tokens * c.experts_per_token
    rows = assigned * ep
    mlp = rows * f / _ways("mlp", f, mesh) * act  # one expert intermediate over the received rows
    received = rows * d * act  # inputs at the experts (the weight gradient needs them), then outputs
    returned = assigned * d * act  # gathered before dispatch, results back in token order
    router = tokens * e * 4  # float32 logits; the probabilities as much again
    shared = tokens * fs / _ways("mlp", fs, mesh) * act if fs else 0.0
    whole = 12 * mlp + 2 * received + 2 * returned + 2 * router + 12 * shared
    dots = 2 * mlp + received + router + 2 * shared  # the matmuls' outputs: gate, up, down, router logits
    weights = e / ep * 3 * d * f / _ways("mlp", f, mesh) * act + d * e * 4  # the router computes in float32
    if fs:
        weights += (3 * fs / _ways("mlp", fs, mesh) + c.shared_expert_gate) * d * act
    return _Ffn(whole, dots, weights)


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One layer's bytes per device: saved for the backward pass under the remat policy, all its
    activations at once (the backward's recomputation), and its weights gathered over FSDP."""

    saved: float
    whole: float
    weights: float


def _layer(config: Config, sizes: dict[str, int], tokens: float, impl: str, moe: bool) -> _Layer:
    c, seq, ring = config.model, config.train.seq_len, sizes["sequence"]
    mesh = abstract_mesh(sizes)
    act = np.dtype(c.dtype).itemsize
    tp_heads, tp_kv = _ways("heads", c.num_heads, mesh), _ways("kv_heads", c.num_kv_heads, mesh)
    h, d = c.resolved_head_dim, c.d_model
    q = tokens * c.num_heads * h / tp_heads * act
    kv = 2 * tokens * c.num_kv_heads * h / tp_kv * act
    x = tokens * d * act
    # Attention probabilities exist only for the XLA reference kernel (flash kernels keep O(T) state);
    # its query blocks each see the keys up to their end: about half the square plus the diagonal blocks.
    window = min(seq, c.sliding_window) if c.sliding_window else seq
    blocks = min(8, max(1, seq // 64))
    square = tokens * window * (0.5 + 0.5 / blocks) if impl == "xla" else 0.0
    if ring > 1:  # ring attention: one (T/2n x T/2n) zigzag sub-block of scores at a time, whatever the kernel
        square = tokens / 2 * min(window, seq / (2 * ring))
    scores = square * c.num_heads / tp_heads * 4  # float32
    # The ring's backward keeps every step's incoming key/value block: the whole row's keys and values.
    ring_kv = kv * (ring - 1)
    ffn = (_moe_ffn if moe else _dense_ffn)(c, mesh, tokens, act)
    whole = 6 * x + 4 * q + 2 * kv + ffn.whole + scores * (1 + act / 4) + ring_kv
    # Saved per layer for the backward pass (fitted to XLA's TPU programs: norms keep float32
    # intermediates when nothing is rematerialised).
    saved = {
        "full": x,
        "dots_no_batch": x,  # every activation matmul has a batch dimension: as good as full
        "save_attention_out": x + q,
        "dots": 6 * x + 2 * q + kv + ffn.dots + scores + ring_kv,
        "none": whole,
    }[c.remat]
    if not c.scan_layers and c.remat == "none":
        saved += x  # unrolled layers also keep their outputs
    # One layer's weights, all-gathered over FSDP into the compute dtype (sharded over tensor only).
    weights = (2 * c.num_heads * h / tp_heads + 2 * c.num_kv_heads * h / tp_kv) * d * act + ffn.weights
    if c.remat == "none" and sizes["fsdp"] > 1:
        saved += weights  # with nothing recomputed, XLA keeps the gathered copy for the backward
    return _Layer(saved, whole, weights)


def analytic(config: Config, sizes: dict[str, int], impl: str = "xla") -> Memory:
    """Per-device bytes on a mesh of `sizes` (axis -> total size, ICI x DCN), without compiling."""
    mesh = abstract_mesh(sizes)
    boxed = jax.eval_shape(_spec(config).init)
    shardings = tree_shardings(boxed, mesh)
    state = sharded_init.strip_boxes(boxed)
    params = _local_bytes(state.params, shardings.params)
    optimizer = _local_bytes(state.opt_state, shardings.opt_state)

    c, t, o = config.model, config.train, config.optim
    b_local, seq = local_rows(config, sizes), t.seq_len
    batch = len(BATCH_KEYS) * b_local * seq * 4
    tokens = micro_tokens(config, sizes)
    stages = sizes["stage"]
    chunks = resolve_chunks(t.loss_chunks, t.batch_size // o.grad_accum, seq, c.vocab_size, sizes)
    x = tokens * c.d_model * np.dtype(c.dtype).itemsize
    moe = flops.moe_layer_count(c)
    kinds = [(n, _layer(config, sizes, tokens, impl, is_moe))
             for n, is_moe in ((c.num_layers - moe, False), (moe, True)) if n]  # (layers of a kind, its bytes)
    # A stage saves its L/S layers' activations for all of its micro-batches: the whole local batch. Its
    # pipeline also keeps stage 0's buffer of micro-batches and each tick's input for the backward pass.
    activations = int(sum(n / stages * layer.saved for n, layer in kinds))
    if stages > 1:
        m = pipeline.microbatches_for(Pipeline(t.pipeline_microbatches, t.pipeline_repeats), stages,
                                      max(b_local // o.grad_accum, 1))
        activations += int(x * (2 + (m * t.pipeline_repeats + stages - 1) / m))

    # The transient peak is the larger of two phases of the backward pass. At the head: the float32
    # logits and their gradient (vocab sharded over tensor), plus the gradient accumulator when
    # accumulating. In the layers: the parameter gradients and one layer's recomputed activations (the
    # larger kind's, dense or MoE). Either way one layer's weights are all-gathered (FSDP) in the compute
    # dtype, forward and backward.
    grads = params
    tp_vocab = _ways("vocab", c.vocab_size, mesh)
    # With the loss tiled (train.loss_chunks), only one chunk's logits and their gradient exist at a time,
    # next to the float32 gradient of the head.
    head = tokens / chunks * c.vocab_size / tp_vocab * 8 + (grads if o.grad_accum > 1 else 0)
    if chunks > 1:
        head += c.vocab_size / tp_vocab * c.d_model / _ways("embed", c.d_model, mesh) * 4
    one_layer = max(layer.whole for _, layer in kinds)
    layers = grads * (2 if o.grad_accum > 1 else 1) + (one_layer if c.remat != "none" else 0)
    temporaries = int(max(head, layers) + 2 * max(layer.weights for _, layer in kinds))
    experts = _expert_bytes(boxed.params, mesh), _expert_bytes(boxed.opt_state, mesh)
    count = sum(int(a.size) for a in jax.tree.leaves(state.params))
    return Memory(params, optimizer, batch, activations, temporaries, "analytic", *experts, count)


def compiled(config: Config, devices) -> Compiled:
    """Compiles the real train step for `devices` (local CPU devices, or AOT TPU/GPU topology devices)."""
    platform = devices[0].platform
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    impl = attention.resolve(config.model.attention, platform)
    # The target's grouped matmul, not the compiling host's (a CPU host would pick the CPU one).
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, moe_matmul=experts.resolve_matmul(config.model.moe_matmul, platform)))
    spec = _spec(config)
    pipe = Pipeline(config.train.pipeline_microbatches, config.train.pipeline_repeats)
    model = architectures.build(config.model, impl, pipe)  # the step runs the target's attention kernel
    step_spec = dataclasses.replace(spec, model=model, apply_fn=model.apply)
    step = assembly.step_function(step_spec, assembly.objective(config, step_spec))
    t = config.train
    # The program `jaxlm train` compiles, whatever matmul precision the caller set globally (the tests
    # pin "highest" for exact CPU comparisons, which the TPU flash kernel rejects for bf16).
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        abstract = assembly.abstract_state(spec, mesh)
        sharding = batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct((t.batch_size, n), jnp.int32, sharding=sharding)
                 for k, n in batch_lengths(config).items()}
        try:
            exe = jax.jit(step, donate_argnums=0).lower(abstract, batch).compile()
        except Exception as e:  # noqa: BLE001 - XlaRuntimeError; anything but an OOM is re-raised
            text = str(e)
            if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
                line = next((l for l in text.splitlines() if "memory" in l.lower()), text.splitlines()[0])
                return Compiled(oom=line.strip()[:300], platform=platform)
            raise
    m = exe.memory_analysis()
    return Compiled(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                    m.temp_size_in_bytes, platform=platform)
