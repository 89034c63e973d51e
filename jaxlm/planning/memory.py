"""Per-device memory of one training step: an analytic model, and XLA's compiled `memory_analysis()`.

The analytic model is exact for what is stored (parameters, optimizer state, batch: their shapes and
shardings come from the real model, optimizer and rule table through `jax.eval_shape`, on an abstract
mesh, so nothing is allocated or compiled). Activations, logits and gradients are counted by formula
from the remat policy and the per-device batch. The compiled measure builds the same train step (`training.assembly`) that
`jaxlm train` runs, for the target's devices, and asks XLA; a compile-time out-of-memory is reported
as such.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from jaxlm.core import mesh as mesh_lib, sharded_init
from jaxlm.core.config import Config
from jaxlm.core.sharding import BATCH_AXES, batch_sharding, logical_sharding, tree_shardings
from jaxlm.model import attention, pipeline
from jaxlm.model.pipeline import Pipeline
from jaxlm.model.transformer import Transformer
from jaxlm.training import assembly
from jaxlm.training.losses import resolve_chunks

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device. `temporaries` is the largest transient (gradients, logits, recomputation)."""

    params: int
    optimizer: int
    batch: int
    activations: int  # saved for the backward pass, all layers
    temporaries: int
    method: str  # "analytic" or "compiled (<platform>)"

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


def analytic(config: Config, sizes: dict[str, int], impl: str = "xla") -> Memory:
    """Per-device bytes on a mesh of `sizes` (axis -> total size, ICI x DCN), without compiling."""
    mesh = abstract_mesh(sizes)
    boxed = jax.eval_shape(_spec(config).init)
    shardings = tree_shardings(boxed, mesh)
    state = sharded_init.strip_boxes(boxed)
    params = _local_bytes(state.params, shardings.params)
    optimizer = _local_bytes(state.opt_state, shardings.opt_state)

    c, t, o = config.model, config.train, config.optim
    batch_spec = PartitionSpec(tuple(a for a in BATCH_AXES if sizes[a] > 1) or None, None)
    b_global, seq = t.batch_size, t.seq_len
    b_local, _ = NamedSharding(mesh, batch_spec).shard_shape((b_global, seq))
    batch = len(BATCH_KEYS) * b_local * seq * 4
    b = max(b_local // o.grad_accum, 1)  # sequences per micro-batch on this device
    tokens = b * seq / sizes["sequence"]
    stages, ring = sizes["stage"], sizes["sequence"]
    chunks = resolve_chunks(t.loss_chunks, t.batch_size // o.grad_accum, seq, c.vocab_size, sizes)
    act = np.dtype(c.dtype).itemsize
    shard = lambda names, shape: math.prod(shape) // math.prod(logical_sharding(names, shape, mesh).shard_shape(shape))
    tp_heads = shard(("heads",), (c.num_heads,))
    tp_kv = shard(("kv_heads",), (c.num_kv_heads,))
    tp_mlp = shard(("mlp",), (c.mlp_dim,))
    tp_vocab = shard(("vocab",), (c.vocab_size,))
    h, d = c.resolved_head_dim, c.d_model
    q = tokens * c.num_heads * h / tp_heads * act
    kv = 2 * tokens * c.num_kv_heads * h / tp_kv * act
    mlp = tokens * c.mlp_dim / tp_mlp * act
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
    # Saved per layer for the backward pass (fitted to XLA's TPU programs: norms and SwiGLU keep
    # float32 intermediates when nothing is rematerialised).
    per_layer = {
        "full": x,
        "dots_no_batch": x,  # every activation matmul has a batch dimension: as good as full
        "save_attention_out": x + q,
        "dots": 6 * x + 2 * q + kv + 2 * mlp + scores + ring_kv,
        "none": 6 * x + 4 * q + 2 * kv + 12 * mlp + scores * (1 + act / 4) + ring_kv,
    }[c.remat]
    if not c.scan_layers and c.remat == "none":
        per_layer += x  # unrolled layers also keep their outputs
    # One layer's weights, all-gathered over FSDP into the compute dtype (sharded over tensor only).
    layer_weights = (2 * c.num_heads * h / tp_heads + 2 * c.num_kv_heads * h / tp_kv + 3 * c.mlp_dim / tp_mlp) * d * act
    if c.remat == "none" and sizes["fsdp"] > 1:
        per_layer += layer_weights  # with nothing recomputed, XLA keeps the gathered copy for the backward
    # A stage saves its L/S layers' activations for all of its micro-batches: the whole local batch. Its
    # pipeline also keeps stage 0's buffer of micro-batches and each tick's input for the backward pass.
    activations = int(c.num_layers / stages * per_layer)
    if stages > 1:
        m = pipeline.microbatches_for(Pipeline(t.pipeline_microbatches, t.pipeline_repeats), stages, b)
        activations += int(x * (2 + (m * t.pipeline_repeats + stages - 1) / m))

    # The transient peak is the larger of two phases of the backward pass. At the head: the float32
    # logits and their gradient (vocab sharded over tensor), plus the gradient accumulator when
    # accumulating. In the layers: the parameter gradients and one layer's recomputed activations.
    # Either way one layer's weights are all-gathered (FSDP) in the compute dtype, forward and backward.
    grads = params
    # With the loss tiled (train.loss_chunks), only one chunk's logits and their gradient exist at a time,
    # next to the float32 gradient of the head.
    head = tokens / chunks * c.vocab_size / tp_vocab * 8 + (grads if o.grad_accum > 1 else 0)
    if chunks > 1:
        head += c.vocab_size / tp_vocab * d / shard(("embed",), (d,)) * 4
    one_layer = 6 * x + 4 * q + 2 * kv + 12 * mlp + scores * (1 + act / 4) + ring_kv
    layers = grads * (2 if o.grad_accum > 1 else 1) + (one_layer if c.remat != "none" else 0)
    temporaries = int(max(head, layers) + 2 * layer_weights)  # gathered for the forward and the backward
    return Memory(params, optimizer, batch, activations, temporaries, "analytic")


def compiled(config: Config, devices) -> Compiled:
    """Compiles the real train step for `devices` (local CPU devices, or AOT TPU/GPU topology devices)."""
    platform = devices[0].platform
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    impl = attention.resolve(config.model.attention, platform)
    spec = _spec(config)
    model = Transformer(config.model, impl, spec.model.pipeline)  # the step runs the target's attention kernel
    step_spec = dataclasses.replace(spec, model=model, apply_fn=model.apply)
    step = assembly.step_function(step_spec, assembly.objective(config, step_spec))
    t = config.train
    # The program `jaxlm train` compiles, whatever matmul precision the caller set globally (the tests
    # pin "highest" for exact CPU comparisons, which the TPU flash kernel rejects for bf16).
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        abstract = assembly.abstract_state(spec, mesh)
        sharding = batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=sharding) for k in BATCH_KEYS}
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
